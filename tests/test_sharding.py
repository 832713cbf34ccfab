"""Mesh sizes, logical -> mesh rules, and parameters + optimizer state created sharded (FSDP)."""
import os

import jax
import numpy as np
import pytest

from unclip_jax.config import load_config
from unclip_jax.train import sharding as sh
from unclip_jax.train.trainer import build_setup, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_resolves_minus_one_and_refuses_bad_sizes():
    assert sh.mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1)
    assert sh.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(sh.MeshError, match="needs a multiple of 3"):
        sh.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(sh.MeshError, match="Only one mesh axis"):
        sh.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_physical_spec_follows_rules_divisibility_and_size():
    mesh = sh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = sh.parse_rules(sh.DEFAULT_RULES)
    assert sh.physical_spec(("embed", "mlp"), (64, 128), mesh, rules) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sh.physical_spec(("embed", "mlp"), (6, 128), mesh, rules) == jax.sharding.PartitionSpec(None, "tensor")
    # 'embed' of size 6 does not divide by 8: fsdp moves to the largest divisible axis
    fsdp8 = sh.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    assert sh.physical_spec(("embed", "mlp"), (6, 128), fsdp8, rules) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sh.physical_spec((None,), (64,), mesh, rules, min_shard_bytes=1024) == jax.sharding.PartitionSpec()
    with pytest.raises(sh.MeshError, match="not a mesh axis"):
        sh.parse_rules("embed=model")


def test_params_and_optimizer_state_are_created_sharded_over_8_devices():
    config = load_config(os.path.join(REPO, "configs", "diffusion_prior.py") + ":runlocal",
                         ["mesh.min_shard_bytes=0", "model.num_layers=1"])
    setup = build_setup(config)
    mesh = sh.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    shardings = state_shardings(setup["abstract"], mesh, config.mesh.rules, 0)
    state = jax.jit(setup["init_fn"], out_shardings=shardings)()
    mu = state["opt_state"][0].mu
    checked = 0
    for tree in (state["params"], mu, state["ema"]):
        for x in jax.tree.leaves(tree):
            if x.ndim == 2 and x.size >= 1024:     # every large matrix
                per_device = {s.device: s.data.nbytes for s in x.addressable_shards}
                assert len(per_device) == 8
                assert max(per_device.values()) * 8 == x.nbytes, x.sharding
                checked += 1
    assert checked >= 3 * 6
    per_device = sh.bytes_per_device({"p": state["params"], "o": state["opt_state"]})
    total = sum(x.nbytes for x in jax.tree.leaves((state["params"], state["opt_state"])))
    assert max(per_device.values()) < 0.2 * total   # ~1/8 plus the small replicated leaves
    # the same values as an unsharded init
    plain = jax.jit(setup["init_fn"])()
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(state["params"])[3]),
                                  np.asarray(jax.tree.leaves(plain["params"])[3]))
