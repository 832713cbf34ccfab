"""`unclip-jax demo`: the diffusion samplers and a tiny CLIP, each against a known answer (`make
demo` generates images with the bundled Shapes model instead).

Command:
  unclip-jax demo --config configs/demo.py --out out
  unclip-jax demo --config configs/demo.py:runlocal   # fewer samples and steps

Expected (2-core CPU, float32): about 45 s after installation (runlocal: about 20 s).
  1. Samplers on a 2-D mixture of 8 Gaussians (std 0.08) through its exact denoiser: every
     sampler puts 12.5% +- 1.5% of its samples on each mode; the spread around the mode is the
     true std within 1% for DDPM-1000, about 4% low for DDIM-50 and 13-17% low for the 20-25-step
     samplers (their last steps are coarse where a sharp mixture needs fine ones); sliced W1 to
     fresh true samples 0.008-0.017 against 0.006 between two true sample sets.
     Writes out/demo_samplers.png.
  2. A tiny CLIP trained contrastively from scratch on 18 captions ("a red circle", ...) of
     procedurally drawn images: the loss falls from log(18) = 2.9 to about 0.3 and zero-shot
     accuracy on 360 fresh images is about 93% (colour 100%; chance 1/18). Writes out/demo_clip.png.
"""
import ml_collections

from unclip_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Part 1: the diffusion samplers on a distribution with a known answer.
    c.mixture = ml_collections.ConfigDict(dict(modes=8, radius=0.7, std=0.08))
    c.num_samples = 1024 if arg.runlocal else 4096
    c.schedule = "cosine"
    c.num_train_steps = 1000
    c.samplers = ml_collections.ConfigDict(dict(
        ddpm=250 if arg.runlocal else 1000,  # ancestral, fixed-small variance
        unclip=25,                           # diffusers UnCLIPScheduler's respacing and step
        ddim=50,                             # eta = 0
        dpm_solver=20,                       # DPM-Solver++(2M)
    ))

    # Part 2: a tiny CLIP learning colour-and-shape captions contrastively.
    c.clip = ml_collections.ConfigDict(dict(
        preset="tiny",
        image_size=32,
        patch_size=4,
        context_length=16,         # a batch holds each of the 18 captions once
        steps=150 if arg.runlocal else 800,
        learning_rate=2e-3,
        weight_decay=0.01,
        eval_images=360,
    ))
    return c
