"""unclip-jax: unCLIP (DALL-E 2) in JAX and Flax NNX.

Subpackages (imports flow downwards only):
  clip/       CLIP encoders, tokenizer, contrastive loss, Hugging Face import
  diffusion/  schedules, forward process, losses, samplers, guidance (pure functions)
  models/     Flax NNX modules for the priors, decoder and upsamplers
  io/         the pipeline folder format; the one safetensors reader and writer
  config.py   the ml_collections config loader shared by every command
  cli.py      the `unclip-jax` command
"""
__version__ = "0.1.0"
