"""Flax NNX modules of unCLIP. Import the module you need; nothing here imports them all.

  layers.py          logical axis names for parameters, abstract (shape-only) construction
  presets.py         named presets and dtype checks of the model config dataclasses
  transformer.py     the one pre-LN Transformer block, stacked layers run by lax.scan, the causal
                     text Transformer (CLIP's text tower, the decoder's GLIDE-style encoder)
  diffusion_prior.py the diffusion prior (diffusers PriorTransformer / Karlo layout)
  prior_sampling.py  sampling the diffusion prior: guidance, best-of-K, any diffusion sampler
  pca_quantizer.py   the AR prior's PCA + per-component bucket quantiser (fitted state as buffers)
  ar_prior.py        the autoregressive prior: causal Transformer, KV-cached guided sampling
  unet_blocks.py     ADM UNet building blocks (residual blocks, attention with context tokens)
  decoder.py         the 64x64 decoder conditioned on z_i (and the caption), Karlo layout
  upsampler.py       the attention-free super-resolution UNets
"""
