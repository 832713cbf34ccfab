"""Data: input pipelines and what they do to examples on the host (tf.data / NumPy).

Modules
  degradations.py          corruptions of the upsamplers' low-resolution conditioning image:
                           `blur_downsample` (first upsampler: Gaussian blur, kernel 3, sigma 0.6)
                           and the building blocks (kernels, filtering, noise, JPEG)
  bsr.py                   the BSR degradation of BSRGAN for the second upsampler: `bsr_degrade`,
                           `bsr_steps` (each named step, for inspection); TensorFlow ops with a
                           stateless seed, usable inside tf.data.Dataset.map; and `degrade`
                           (dispatch on the input pipeline's config string: blur, bsr or none)
  synthetic_embeddings.py  a caption -> image-embedding task with a known answer (testing priors)
  input_pipeline.py        the trainer's input: `make_input(cfg, global_batch_size=, seed=, ...)`
                           -> `Input` (per-process NumPy batches, `.position`, `.counts()`),
                           `default_input_config()`; exact resume from a batch position
  readers.py               raw (key, image bytes, caption) records from webdataset tar shards,
                           TFRecords, tfds datasets and image folders; per-host sharding;
                           damage becomes counted markers, never an exception; size caps
  images.py                image headers read before decoding (size guard), decoding to RGB
                           (greyscale / RGBA / CMYK / 16-bit conversions, flagged), square
                           crop + antialiased resize to [-1, 1]

Submodules are imported explicitly (`from unclip_jax.data import degradations`), so that
importing the package does not import TensorFlow.
"""
