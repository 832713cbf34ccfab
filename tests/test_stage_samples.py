"""The trainer's periodic sample hooks (decoder and upsampler sample grids) run under jit, as the
trainer calls them (model merged inside the jitted function)."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from unclip_jax.config import load_config
from unclip_jax.train import step as step_lib
from unclip_jax.train.registry import get_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(name, c, n=2, tokens=8):
    rng = np.random.default_rng(0)
    u = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)  # noqa: E731
    m = c.model
    if name == "upsampler":
        return {"image": u(n, c.image_size, c.image_size, 3),
                "low_res": u(n, c.low_res_size, c.low_res_size, 3)}
    return {"image": u(n, m.image_size, m.image_size, 3), "image_embed": u(n, m.clip_dim),
            "text_embed": u(n, m.clip_dim), "text_hidden": u(n, tokens, m.text_width),
            "text_mask": np.arange(tokens)[None].repeat(n, 0) < 5}


@pytest.mark.parametrize("name", ["decoder", "upsampler"])
def test_sample_hook_runs_jitted(name):
    c = load_config(os.path.join(REPO, "configs", f"{name}.py:runlocal"),
                    ["sampling.steps=2"] if name == "decoder" else [])
    stage = get_stage(c.stage)
    graphdef, params, rest = step_lib.split_model(stage.build_model(c, nnx.Rngs(0)))
    batch = _batch(name, c)
    assert set(stage.batch_keys(c)) <= set(batch)

    @jax.jit
    def sample(params, rest, batch, key):
        return stage.sample(nnx.merge(graphdef, params, rest), c, batch, key)

    scalars, images = sample(params, rest, batch, jax.random.key(0))
    assert np.isfinite(float(scalars["sample_mse_to_data"]))
    assert images.shape[1:] == batch["image"].shape[1:] and np.all(np.isfinite(images))
