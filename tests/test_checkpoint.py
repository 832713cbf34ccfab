"""Checkpoints: restore onto another mesh; mismatched or diverging runs never touch the last one."""
import os

import jax
import numpy as np
import pytest

from unclip_jax.config import load_config
from unclip_jax.train import checkpoint as ckpt
from unclip_jax.train import sharding as sh
from unclip_jax.train.trainer import NonFiniteError, build_setup, state_shardings, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["mesh.min_shard_bytes=0", "model.num_layers=1", "log_every=2", "eval_every=0",
        "checkpoint.every_steps=2"]


def _config(*extra):
    return load_config(os.path.join(REPO, "configs", "diffusion_prior.py") + ":runlocal",
                       TINY + list(extra))


def _snapshot(workdir):
    root = ckpt.checkpoint_dir(workdir)
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ckpt"))
    summary = train(_config("total_steps=4"), workdir, progress=False)
    assert summary["step"] == 4
    return workdir


def test_restore_onto_another_mesh(trained):
    saved, meta = ckpt.load_arrays(trained)
    assert meta["step"] == 4 and meta["data_position"] == 4
    assert meta["config"]["stage"] == "diffusion_prior"
    assert set(saved) >= {"params", "opt_state", "ema", "rest", "step"}
    config = _config("total_steps=4")
    setup = build_setup(config)
    for sizes, devices in (({"data": 2, "fsdp": 1, "tensor": 1}, 2),
                           ({"data": 1, "fsdp": 2, "tensor": 1}, 2)):
        mesh = sh.make_mesh(sizes, jax.devices()[:devices])
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              setup["abstract"], state_shardings(setup["abstract"], mesh,
                                                                 None, 0))
        manager = ckpt.make_manager(trained)
        state, _ = ckpt.restore(manager, 4, target)
        manager.close()
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
            assert a.sharding.mesh.devices.size == 2
            np.testing.assert_array_equal(np.asarray(a), b)


def test_mismatched_checkpoint_is_refused_before_anything_is_written(trained):
    before = _snapshot(trained)
    with pytest.raises(ckpt.CheckpointMismatch, match="does not match this config's model"):
        train(_config("total_steps=6", "model.num_layers=2"), trained, progress=False)
    assert _snapshot(trained) == before


def test_nan_stops_and_keeps_the_last_good_checkpoint(trained):
    before = _snapshot(trained)
    with pytest.raises(NonFiniteError, match=r"diverged at step \d+: .*(loss|grad_norm)"):
        train(_config("total_steps=12", "optimizer.learning_rate=1e30"), trained, progress=False)
    assert _snapshot(trained) == before
    manager = ckpt.make_manager(trained)
    assert manager.latest_step() == 4
    manager.close()
