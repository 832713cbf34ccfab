"""CLIP: the model sizes, and contrastive training from scratch.

Commands:
  unclip-jax config --config configs/clip.py:size=ViT-L/14   # print the resolved config
  unclip-jax train  --config configs/clip.py:size=small --workdir runs/clip_small \
      --config.input.paths='["shards/*.tar"]'
      (webdataset shards of image + caption, e.g. from img2dataset; rerun to resume)
  unclip-jax export --workdir runs/clip_small --hf-out runs/clip_small_hf
      (a Hugging Face CLIPModel folder: what `unclip-jax precompute --clip` reads)
  unclip-jax shapes --config tiny --data-dir data/tfds
  unclip-jax train  --config configs/clip.py:runlocal --workdir runs/clip_tiny
      (runlocal reads the tiny Shapes dataset the line above builds)

Sizes are the presets of `unclip_jax.clip.model.PRESETS`: tiny, small (the Shapes demo's CLIP),
ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14-336 (OpenAI) and ViT-H/14 (open_clip, LAION-2B). Any
preset field can be overridden, e.g. --config.model.vision_layers=4. Released weights are not
trained here: load them with `unclip_jax.convert.hf_clip.from_pretrained(hf_folder)`.

Optimiser defaults follow OpenAI CLIP (AdamW, beta2 0.98, eps 1e-6, weight decay 0.2, warmup then
cosine). `runlocal` shrinks everything for a laptop: the tiny preset, batch 16, 20 steps, on the
tiny Shapes dataset (64 images) in data/tfds.

Expected: no run at a released size here (OpenAI's ViT-L/14: 400M pairs, 32 epochs). The Shapes
CLIP of the bundled model (configs/shapes.py, stage clip: a 64-wide ViT, 563 steps x 128 in 15
minutes on 2 CPU cores) reaches an in-batch accuracy of about 0.75. runlocal: 20 steps in about
half a minute on 2 CPU cores, mostly compilation; the loss stays near log(16) = 2.8 (a smoke test).
"""
import dataclasses

import ml_collections

from unclip_jax.clip.model import get_preset
from unclip_jax.config import add_trainer_sections, parse_arg
from unclip_jax.data.input_pipeline import input_config


def get_config(arg=None):
    arg = parse_arg(arg, size="small", runlocal=False)
    size = "tiny" if arg.runlocal else arg.size
    c = ml_collections.ConfigDict()
    c.stage = "clip"
    c.seed = 0
    c.negative_weight = 1.0   # the focused hard-negative term, with input.negative_captions

    preset = dataclasses.asdict(get_preset(size))
    preset["text_mlp_dim"] = preset["text_mlp_dim"] or 4 * preset["text_width"]
    preset["vision_mlp_dim"] = preset["vision_mlp_dim"] or 4 * preset["vision_width"]
    c.model = ml_collections.ConfigDict(preset)
    c.model.preset = size

    c.batch_size = 16 if arg.runlocal else 1024
    c.total_steps = 20 if arg.runlocal else 50_000
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
        grad_clip_norm=1.0))
    c.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=2 if arg.runlocal else 2000))
    c.log_every = 1 if arg.runlocal else 50
    if arg.runlocal:  # unclip-jax shapes --config tiny --data-dir data/tfds
        c.input = input_config(kind="tfds", tfds_name="shapes/tiny", data_dir="data/tfds",
                               image_size=c.model.image_size,
                               context_length=c.model.context_length)
    else:  # --config.input.paths='["shards/*.tar"]' (or kind=tfds ...)
        c.input = input_config(kind="webdataset", image_size=c.model.image_size,
                               context_length=c.model.context_length)
    add_trainer_sections(c, checkpoint_every=10 if arg.runlocal else 5_000,
                         eval_every=0 if arg.runlocal else 0)
    return c
