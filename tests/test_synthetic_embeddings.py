"""The synthetic prior task: seeded, well-formed, and its answer is the concept direction."""
import numpy as np

from unclip_jax.data.synthetic_embeddings import make_prior_task, sample_prior_batch


def test_batch_shapes_masks_and_known_answer():
    task = make_prior_task(num_concepts=8, dim=16, text_width=12, context_length=6)
    b = sample_prior_batch(task, np.random.default_rng(0), 64)
    assert b["text_tokens"].shape == (64, 6) and b["text_hidden"].shape == (64, 6, 12)
    for tokens, mask, c in zip(b["text_tokens"], b["text_mask"], b["concept"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert tokens[n - 1] == task.eot_id and (tokens[n:] == 0).all()
        concept_token = 1 + c
        assert concept_token in tokens[:n - 1]
    np.testing.assert_allclose(np.linalg.norm(b["image_embed"], axis=1), 1.0, rtol=1e-5)
    own = np.sum(b["image_embed"] * task.image_dirs[b["concept"]], 1)
    other = np.sum(b["image_embed"] * task.image_dirs[(b["concept"] + 1) % 8], 1)
    assert own.mean() > 0.8 and abs(other.mean()) < 0.3


def test_seeded():
    task = make_prior_task(seed=3)
    a = sample_prior_batch(task, np.random.default_rng(1), 8)
    b = sample_prior_batch(make_prior_task(seed=3), np.random.default_rng(1), 8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
