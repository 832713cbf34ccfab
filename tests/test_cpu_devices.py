"""mesh.cpu_devices: how many CPU devices a CPU training run makes (one per usable core with -1,
limited to a count whose mesh splits the batch), the environment winning over the config, and
the ``train`` command applying it before JAX starts (a subprocess, since this process's backend
already has the suite's 8 devices)."""
import os
import subprocess
import sys

import jax

from unclip_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_count_follows_the_config_the_cores_and_the_batch():
    count = distributed.cpu_device_count
    assert count(0, 64, cores=2) is None                  # JAX's default
    assert count(3, 64, cores=2) == 3                     # asked for: what the user said
    assert count(-1, 64, cores=2) == 2                    # one per core
    assert count(-1, 63, cores=2) == 1                    # 63 rows do not split in two
    assert count(-1, 6, cores=4) == 3                     # the most that divides the batch
    assert count(-1, 64, accum_steps=16, cores=8) == 4    # 64 rows = 16 microbatches x 4
    assert count(-1, 8, mesh_sizes={"tensor": 2}, cores=3) == 2   # the mesh needs an even count
    assert count(-1, 64, num_processes=2, cores=8) == 8   # 2 x 8 devices split 64 rows
    assert count(-1, 48, num_processes=2, cores=8) == 8   # 48 / 16 = 3 rows per device
    assert count(-1, 40, num_processes=2, cores=8) == 5   # 40 / 10


def test_the_environment_wins_and_a_started_backend_is_said():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert "XLA_FLAGS" in distributed.set_cpu_devices(2, env=env)
    assert "JAX_NUM_CPU_DEVICES" in distributed.set_cpu_devices(2, env={"JAX_NUM_CPU_DEVICES": "4"})
    assert distributed.set_cpu_devices(None, env={}) is None
    jax.devices()                                          # this process's backend exists
    assert "already started" in distributed.set_cpu_devices(2, env={})


def test_train_command_makes_the_devices_it_is_asked_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "unclip_jax.cli", "train", "--no-progress",
           "--config", os.path.join(REPO, "configs", "diffusion_prior.py") + ":runlocal",
           "--workdir", str(workdir), "--config.mesh.cpu_devices=2", "--config.total_steps=1",
           "--config.model.num_layers=1", "--config.eval_every=0", "--config.log_every=1",
           "--config.batch_size=4"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (workdir / "train.log").read_text()
    assert "2 devices (cpu)" in log, log
