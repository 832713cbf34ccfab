"""The autoregressive prior (Ramesh et al. 2022, section 2.1; Table 3): sizes and training.

Commands:
  unclip-jax config --config configs/ar_prior.py:size=paper   # print the resolved config
  unclip-jax train  --config configs/ar_prior.py:size=paper --workdir runs/ar_prior \
      --config.input.paths=data/emb
      (data/emb: `unclip-jax precompute --hidden` output of a CLIP ViT-H/16)
  unclip-jax train  --config configs/ar_prior.py:runlocal --workdir runs/ar_prior_tiny
      (rerun the same command to resume; the quantiser is fitted before step 0 and saved)

Sizes are the presets of `unclip_jax.models.ar_prior.PRESETS`:
  paper  Table 3's latent decoder: 384 positions (63 caption + z_t + dot + 319 z_i tokens),
         width 1664, depth 24, 26 heads; 319 of 1024 PCA components, 1024 buckets each;
         ~807M parameters (the paper's 1B also counts its own 256-token text encoder, replaced
         here by CLIP's text hidden states).
  tiny   the synthetic embedding task of unclip_jax.data.synthetic_embeddings (32-dim, 16
         components, 32 buckets); what `runlocal` uses.
Training follows Table 3: AdamW (beta1 0.9, beta2 0.91, eps 1e-10, weight decay 4e-2), lr
1.6e-4, batch 4096, 1M iterations, EMA 0.999, text dropped 10% of the time for guidance. The
PCA / bucket fit uses `quantizer.fit_examples` training z_i before step 0 and is saved with the
model. Sampling: dot-product token at the 50th percentile (the paper's best; 70/85/95 also
compared), best of 2 by z_i . z_t; the paper gives no guidance scale for this prior.

Expected: paper size, no measured run yet (paper: MS-COCO zero-shot FID 10.63 with the unCLIP
decoder). runlocal, tiny synthetic task on 2 CPU cores: about 1 minute for 400 steps at batch
64, lr 3e-3; the sampled z_i reach a cosine of about 0.9 with the true concept direction against
about 0.06 for the unconditional model (tests/test_ar_prior_stage.py).
"""
import ml_collections

from unclip_jax.config import add_trainer_sections, parse_arg
from unclip_jax.data.input_pipeline import input_config
from unclip_jax.models.ar_prior import PRESETS


def get_config(arg=None):
    arg = parse_arg(arg, size="paper", runlocal=False)
    size = "tiny" if arg.runlocal else arg.size
    if size not in PRESETS:
        raise ValueError(f"Unknown AR prior size {size!r}; choose one of {', '.join(PRESETS)}.")
    local = size == "tiny"
    c = ml_collections.ConfigDict()
    c.stage = "ar_prior"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(PRESETS[size], dropout=0.0, dtype="float32",
                                             param_dtype="float32", remat=not local))
    c.model.preset = size
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic" if local else "precomputed_embeddings"))

    c.quantizer = ml_collections.ConfigDict(dict(
        fit_examples=2048 if local else 1_000_000,   # training z_i used for the PCA and edges
        max_quantile_samples=1 << 17))

    c.batch_size = 64 if local else 4096
    c.total_steps = 400 if local else 1_000_000
    c.text_drop_prob = 0.1
    c.ema_decay = 0.999
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=3e-3 if local else 1.6e-4, b1=0.9, b2=0.91, eps=1e-10,
        weight_decay=4e-2, grad_clip_norm=0.0))  # 0: no clipping (none in the paper)
    c.schedule = ml_collections.ConfigDict(dict(
        name="warmup_cosine", warmup_steps=20 if local else 10_000))

    c.sample = ml_collections.ConfigDict(dict(
        guidance_scale=1.0, temperature=1.0, top_p=1.0, dot_percentile=50.0, best_of=2))
    c.log_every = 50 if local else 100
    if local:
        c.input = ml_collections.ConfigDict(dict(
            kind="synthetic_prior", num_concepts=16, dim=PRESETS[size]["embed_dim"],
            text_width=PRESETS[size]["text_width"], context_length=PRESETS[size]["text_context"],
            task_seed=0))
    else:  # precomputed CLIP embeddings (unclip_jax.data.input_pipeline)
        c.input = input_config(kind="embeddings", context_length=0)  # --config.input.paths=DIR
    add_trainer_sections(c, checkpoint_every=100 if arg.runlocal else 10_000,
                         eval_every=0 if arg.runlocal else 10_000)
    return c
