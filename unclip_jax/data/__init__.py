"""Data: input pipelines and what they do to examples on the host (tf.data / NumPy).

Modules
  degradations.py          corruptions of the upsamplers' low-resolution conditioning image:
                           `blur_downsample` (first upsampler: Gaussian blur, kernel 3, sigma 0.6),
                           `degrade` (dispatch on a config string), and the building blocks
                           (kernels, filtering, noise, JPEG)
  bsr.py                   the BSR degradation of BSRGAN for the second upsampler: `bsr_degrade`,
                           `bsr_steps` (each named step, for inspection); TensorFlow ops with a
                           stateless seed, usable inside tf.data.Dataset.map
  synthetic_embeddings.py  a caption -> image-embedding task with a known answer (testing priors)

Submodules are imported explicitly (`from unclip_jax.data import degradations`), so that
importing the package does not import TensorFlow.
"""
