"""unCLIP end to end (caption -> CLIP text encoding -> prior -> z_i -> decoder -> upsamplers).

  settings.py  the sampling settings: Karlo's defaults, the Shapes preset, validation
  runtime.py   Runtime: device mesh, placement, split model state, compiled-function cache;
               default_dtype() (bfloat16 on accelerators)
  stages.py    the stage functions (text, diffusion prior, AR prior, decoder, upsampler)
  sources.py   what from_pretrained accepts: 'shapes', folders, diffusers folders, Hub ids
  pipeline.py  UnCLIPPipeline, the facade (see its module docstring), UnCLIPPipelineOutput
"""
from unclip_jax.pipeline.pipeline import UnCLIPPipeline, UnCLIPPipelineOutput
from unclip_jax.pipeline.runtime import Runtime, default_dtype
from unclip_jax.pipeline.settings import (DEFAULT_SETTINGS, PRIORS, SAMPLING_PRESETS,
                                          SHAPES_SAMPLING, STAGES, PipelineError, check_stage,
                                          merge_settings, stage_spec)
from unclip_jax.pipeline.stages import TextInputs, decoder_model_fn, resize_bicubic, to_uint8

__all__ = ["DEFAULT_SETTINGS", "PRIORS", "PipelineError", "Runtime", "SAMPLING_PRESETS",
           "SHAPES_SAMPLING", "STAGES", "TextInputs", "UnCLIPPipeline", "UnCLIPPipelineOutput",
           "check_stage", "decoder_model_fn", "default_dtype", "merge_settings", "resize_bicubic",
           "stage_spec", "to_uint8"]
