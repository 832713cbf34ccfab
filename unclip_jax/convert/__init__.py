"""Weight import from other implementations.

  hf_clip.py     Hugging Face transformers CLIPModel folders: from_pretrained, save_pretrained
  diffusers.py   diffusers / Karlo folders: load_prior, load_decoder, load_super_res
                 (the modules behind it: diffusers_prior.py, diffusers_unet.py)

The name-by-name checks they share live in unclip_jax/torch_weights.py; the safetensors reading
in unclip_jax/io/safetensors.py.
"""
