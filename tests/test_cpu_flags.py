"""The XLA CPU flags the package appends at import (unclip_jax/cpu_flags.py): added only on the
jaxlib releases known to have them, never over a flag the user set, never when switched off."""
import os
import subprocess
import sys

from unclip_jax import cpu_flags

OURS = [f"--{k}={v}" for k, v in cpu_flags.FLAGS.items()]


def test_added_on_a_supported_jaxlib():
    assert cpu_flags.flags_to_add("", (0, 10)) == OURS
    assert cpu_flags.flags_to_add("--xla_force_host_platform_device_count=8", (0, 10)) == OURS


def test_never_on_an_unknown_jaxlib():
    # An unknown flag makes XLA abort the whole process, so nothing outside the known releases.
    assert cpu_flags.flags_to_add("", (0, 11)) == []
    assert cpu_flags.flags_to_add("", (1, 0)) == []
    assert cpu_flags.flags_to_add("", None) == []


def test_a_flag_the_user_set_wins():
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert cpu_flags.flags_to_add(mine, (0, 10)) == []
    assert cpu_flags.flags_to_add(mine + " --xla_cpu_use_onednn=true", (0, 10)) == []
    bare = "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type"
    assert cpu_flags.flags_to_add(bare, (0, 10)) == []


def _flags_after_import(**env):
    code = "import os, unclip_jax; print(os.environ.get('XLA_FLAGS', ''))"
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "UNCLIP_JAX_CPU_FLAGS")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return out.stdout.strip()


def test_import_appends_them_and_the_switch_turns_them_off():
    flags = _flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    supported = cpu_flags._jaxlib_release() in cpu_flags.SUPPORTED_JAXLIB
    assert flags.startswith("--xla_force_host_platform_device_count=2")
    assert all((f in flags) == supported for f in OURS)
    off = _flags_after_import(XLA_FLAGS="--xla_cpu_use_onednn=false", UNCLIP_JAX_CPU_FLAGS="0")
    assert off == "--xla_cpu_use_onednn=false"
    kept = _flags_after_import(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot")
    assert kept == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_nothing_once_a_backend_runs(monkeypatch):
    import jax
    jax.devices()  # the test session's backend is up
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("UNCLIP_JAX_CPU_FLAGS", raising=False)
    assert cpu_flags.apply() == []
    assert os.environ["XLA_FLAGS"] == ""
