"""unclip-jax: unCLIP (DALL-E 2) in JAX and Flax NNX.

Subpackages (imports flow downwards only):
  clip/       CLIP encoders, tokenizer, contrastive loss, Hugging Face import
  diffusion/  schedules, forward process, losses, samplers, guidance (pure functions)
  models/     Flax NNX modules for the priors, decoder and upsamplers
  io/         the pipeline folder format; the one safetensors reader and writer
  config.py   the ml_collections config loader shared by every command
  cli.py      the `unclip-jax` command

Importing the package appends an XLA CPU flag to ``XLA_FLAGS`` (Eigen rather than YNNPACK
convolutions) unless the user set it or ``UNCLIP_JAX_CPU_FLAGS=0``; ``cpu_flags.py`` says
which, why and when.
"""
from unclip_jax import cpu_flags as _cpu_flags

__version__ = "0.1.0"
_cpu_flags.apply()
