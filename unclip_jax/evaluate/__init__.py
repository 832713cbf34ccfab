"""Evaluation metrics: prior cosine similarities (prior_metrics.py); Shapes caption accuracy,
CLIP score and FID-style distances arrive with their issues."""
