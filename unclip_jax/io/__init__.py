"""Files unclip-jax reads and writes.

  paths.py            the one path layer: local paths and gs:// (etils.epath) alike
  atomic.py           atomic_write: a file replaced only once its new content is complete
  safetensors.py      the one .safetensors reader (TensorFiles, read) and writer (write)
  pipeline_folder.py  the pipeline folder: manifest (unclip.json) + one safetensors per component

Nothing is imported here, so ``unclip_jax.io.safetensors`` loads without flax or the models.
"""
