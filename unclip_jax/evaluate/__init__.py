"""Evaluation metrics.

  prior_metrics.py   prior cosine similarities (to the true z_i, to z_t, to an unrelated z_i)
  shapes_judge.py    the exact judge of a Shapes image against its caption
  image_metrics.py   FID, FD-CLIP (Frechet distance in CLIP image-embedding space), CLIP score;
                     frechet_distance / feature_stats for precomputed statistics
  inception.py       pytorch-fid's FID Inception-v3 in Flax NNX; load_inception(path) reads its
                     weights from a user-supplied .safetensors or pytorch-fid .pth
"""
