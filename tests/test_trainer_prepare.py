"""Stages whose model needs data before training (the diffusion prior's mean/std embedding
statistics, the AR prior's PCA quantiser) get it from the trainer, and it is checkpointed."""
import os

import numpy as np
import pytest

from unclip_jax.config import load_config
from unclip_jax.train import checkpoint as ckpt
from unclip_jax.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["mesh.min_shard_bytes=0", "total_steps=2", "log_every=1", "eval_every=0",
          "checkpoint.every_steps=2"]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


@pytest.mark.parametrize("config, overrides, buffer", [
    ("diffusion_prior.py:runlocal", ["model.num_layers=1", "model.embed_norm=mean_std"],
     "clip_std"),
    ("ar_prior.py:runlocal", ["schedule.warmup_steps=0"], None),
])
def test_prepare_sets_buffers_that_the_checkpoint_keeps(tmp_path, config, overrides, buffer):
    cfg = load_config(os.path.join(REPO, "configs", config), COMMON + overrides)
    summary = train(cfg, str(tmp_path), progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
    state, _ = ckpt.load_arrays(str(tmp_path))
    rest = dict(_leaves(state["rest"]))
    assert rest, "the checkpoint holds the non-parameter state"
    if buffer is not None:  # fitted statistics, not the constructor's ones
        std = [v for k, v in rest.items() if buffer in k]
        assert std and not np.allclose(std[0], 1.0)
    else:  # the AR prior's quantiser was fitted (it is built unfitted: zeros, fitted=0)
        fitted = [v for k, v in rest.items() if k.split("/")[-2:-1] == ["fitted"]
                  or k.endswith("/fitted")]
        assert fitted and all(int(v) == 1 for v in fitted), sorted(rest)
        assert any(v.dtype.kind == "f" and np.any(v != 0) for v in rest.values())
