"""The unCLIP diffusion prior: caption (z_t + encoded tokens) -> CLIP image embedding z_i.

Commands:
  unclip-jax config --config configs/diffusion_prior.py:size=karlo   # print the resolved config
  unclip-jax train  --config configs/diffusion_prior.py:size=paper --workdir runs/prior \
      --config.input.paths=data/emb
      (data/emb: `unclip-jax precompute --hidden` output of a CLIP ViT-H/16)
  unclip-jax train  --config configs/diffusion_prior.py:runlocal --workdir runs/prior_tiny
      (rerun the same command to resume; launch/README.md for pods and clusters)

Sizes (unclip_jax.models.diffusion_prior.PRESETS):
  paper  Table 3: ViT-H/16 embeddings (1024), 2048 wide, 24 layers, 32 heads x 64, 256 text
         tokens, z_i scaled by 17.2, a learned null caption for guidance; about 1.2B parameters.
  karlo  Karlo v1.0-alpha / diffusers PriorTransformer: ViT-L/14 (768), 20 layers, 32 heads x 64,
         77 tokens, per-dimension mean/std normalisation; about 1.0B parameters. Released
         weights load with unclip_jax.convert.diffusers.load_prior(folder).
  tiny   the synthetic caption -> z_i task (unclip_jax.data.synthetic_embeddings).
Optimizer: AdamW per Table 3 (lr 1.1e-4, beta2 0.96, eps 1e-6, weight decay 6e-2), EMA 0.9999,
batch 4096 for 600K steps; text conditioning dropped 10% of the time; sampling with DDIM, 64
steps, best of 2 by dot product with z_t.

Expected: paper size, 600K steps on the full data: MS-COCO zero-shot FID 10.39 with the paper's
decoder (Table 2) -- not reproduced here. runlocal (tiny, synthetic task, 2-core CPU): about
400 steps in under a minute; sampled z_i reach a cosine of about 0.85 with the true z_i against
about 0.05 with an unrelated caption's (tests/test_diffusion_prior_stage.py checks this).
"""
import dataclasses

import ml_collections

from unclip_jax.config import add_trainer_sections, parse_arg
from unclip_jax.data.input_pipeline import input_config
from unclip_jax.models.diffusion_prior import get_preset


def get_config(arg=None):
    arg = parse_arg(arg, size="paper", runlocal=False)
    size = "tiny" if arg.runlocal else arg.size
    c = ml_collections.ConfigDict()
    c.stage = "diffusion_prior"
    c.seed = 0

    overrides = dict(learned_null=size != "karlo")  # karlo keeps the diffusers layout
    model = dataclasses.asdict(get_preset(size, **overrides))
    c.model = ml_collections.ConfigDict(model)
    c.model.preset = size

    c.diffusion = ml_collections.ConfigDict(dict(num_train_steps=1000, schedule="cosine",
                                                 cond_drop_prob=0.1))
    c.sampling = ml_collections.ConfigDict(dict(  # SamplerSpec fields + guidance_scale, best_of
        sampler="ddim", steps=16 if arg.runlocal else 64, spacing=None, best_of=2,
        guidance_scale=1.0 if size == "tiny" else 4.0,
        clip_range=5.0 if size == "karlo" else None,  # Karlo: UnCLIPScheduler clip_sample_range 5
        eta=0.0, num_train_steps=1000, schedule="cosine"))

    c.batch_size = 64 if arg.runlocal else 4096
    c.total_steps = 400 if arg.runlocal else 600_000
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3 if arg.runlocal else 1.1e-4, b1=0.9,
        b2=0.99 if arg.runlocal else 0.96, eps=1e-6,
        weight_decay=0.0 if arg.runlocal else 6.0e-2, warmup_steps=0 if arg.runlocal else 10_000,
        grad_clip_norm=0.0, lr_schedule="constant" if arg.runlocal else "cosine"))
    c.ema_decay = 0.99 if arg.runlocal else 0.9999
    if size == "tiny":
        c.data = ml_collections.ConfigDict(dict(name="synthetic_embeddings", num_concepts=8,
                                                dim=32, text_width=32, context_length=8))
    c.log_every = 50 if arg.runlocal else 500
    if size == "tiny":
        c.input = ml_collections.ConfigDict(dict(
            kind="synthetic_prior", num_concepts=8, dim=32, text_width=32, context_length=8,
            task_seed=0))
    else:  # precomputed CLIP embeddings (unclip_jax.data.input_pipeline)
        c.input = input_config(kind="embeddings", context_length=0)  # --config.input.paths=DIR
    add_trainer_sections(c, checkpoint_every=100 if arg.runlocal else 10_000,
                         eval_every=200 if arg.runlocal else 10_000)
    return c
