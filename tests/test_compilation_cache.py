"""The persistent compilation cache: a second identical process loads every program from disk."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = """
from unclip_jax import compilation_cache as cc
folder = cc.enable()
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((32, 32))).block_until_ready()
print(folder, cc.counts()["hits"], cc.counts()["misses"])
"""


def _run(env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "UNCLIP_JAX_COMPILATION_CACHE")}
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                         cwd=ROOT, env={**base, **env}, check=True)
    folder, hits, misses = out.stdout.split()
    return folder, int(hits), int(misses)


def test_second_identical_process_compiles_nothing(tmp_path):
    env = {"UNCLIP_JAX_CACHE": str(tmp_path)}
    folder, hits, misses = _run(env)
    assert folder == str(tmp_path / "jax") and misses >= 1 and hits == 0
    assert os.listdir(folder), "compiled programs were written"
    _, hits, misses = _run(env)
    assert misses == 0 and hits >= 1


def test_opt_out_and_user_folder(tmp_path):
    folder, hits, misses = _run({"UNCLIP_JAX_CACHE": str(tmp_path),
                                 "UNCLIP_JAX_COMPILATION_CACHE": "0"})
    assert folder == "None" and not os.listdir(tmp_path)
    folder, _, _ = _run({"UNCLIP_JAX_CACHE": str(tmp_path),
                         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})
    assert folder == str(tmp_path / "mine")
