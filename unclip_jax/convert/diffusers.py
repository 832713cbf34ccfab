"""Import Karlo's unCLIP weights from diffusers folders (safetensors only).

  load_prior(path)      a PriorTransformer.save_pretrained folder (or a pipeline's prior/)
                        -> unclip_jax.models.diffusion_prior.DiffusionPrior, clip_mean/std included
  load_decoder(path)    an UnCLIPPipeline folder (its decoder/ and text_proj/ subfolders)
                        -> unclip_jax.models.decoder.Decoder
  load_super_res(path)  a UNet2DModel folder (Karlo's super_res_first / super_res_last)
                        -> unclip_jax.models.upsampler.SuperRes

Each refuses a folder whose tensors do not match the model its config describes, listing every
missing, unexpected and misshapen tensor (unclip_jax.torch_weights.CheckpointMismatchError).
"""
from .diffusers_prior import load_prior
from .diffusers_unet import load_decoder, load_super_res

__all__ = ["load_decoder", "load_prior", "load_super_res"]
