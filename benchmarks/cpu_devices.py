"""Training steps per second on a CPU host with one CPU device against one per usable core
(``mesh.cpu_devices`` 0 and -1), the same command otherwise, in one run.

    .venv/bin/python benchmarks/cpu_devices.py --data-dir data/tfds --emb-dir data/emb
    .venv/bin/python benchmarks/cpu_devices.py --stage sr64 --data-dir data/tfds
    .venv/bin/python benchmarks/cpu_devices.py --check         # the tiny dataset, a few steps

Why: XLA's CPU convolutions (YNNPACK in jaxlib 0.10) run the large ones on one thread
(``benchmarks/conv_cpu.py``'s "busy threads" columns), so a one-device process leaves the other
cores idle through most of a UNet's step. Several CPU devices, each with its rows of the batch,
run them side by side (unclip_jax.train.distributed).

Each setting is one ``unclip-jax train`` process on ``configs/shapes.py:stage=STAGE`` in a
temporary workdir, ``--steps`` steps, logging every 25; the figure is the median of the
trainer's own steps/s over the logged windows after the first (which holds the warm-up). The
data is the Shapes recipe's (configs/shapes.py steps 1-4: ``unclip-jax shapes``, CLIP,
``precompute``); the upsamplers need only the dataset. ``--check`` makes the tiny dataset and
trains ``runlocal`` for a few steps, to show the script works: its figures mean nothing.
There is no peer here: this compares two settings of ours, so its ratio sizes a config choice
and is not a comparison with diffusers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def train_once(stage: str, cpu_devices: int, workdir: str, args) -> dict:
    """One training process; its steps/s (median over the logged windows after the first)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=" ".join(flags))
    arg = f"stage={stage},data_dir={args.data_dir},emb_dir={args.emb_dir}"
    if args.check:
        arg += ",runlocal=True"
    cmd = [sys.executable, "-m", "unclip_jax.cli", "train", "--no-progress",
           "--config", os.path.join(common.REPO, "configs", "shapes.py") + ":" + arg,
           "--workdir", workdir, f"--config.mesh.cpu_devices={cpu_devices}",
           f"--config.total_steps={args.steps}", f"--config.log_every={args.log_every}",
           "--config.eval_every=0", f"--config.checkpoint.every_steps={args.steps}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"training with mesh.cpu_devices={cpu_devices} failed:\n"
                         + done.stderr[-2000:])
    devices = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["steps_per_s"] for r in map(json.loads, f) if "steps_per_s" in r]
    with open(os.path.join(workdir, "train.log")) as f:
        for line in f:
            if " devices (" in line:
                devices = line.split(" devices (")[0].split()[-1]
    timed = rates[1:] or rates
    return dict(rate=statistics.median(timed), low=min(timed), high=max(timed),
                windows=len(timed), wall=wall, devices=devices)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="decoder", choices=["decoder", "sr64", "sr128"])
    p.add_argument("--data-dir", default="data/tfds")
    p.add_argument("--emb-dir", default="data/emb")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--check", action="store_true",
                   help="The tiny dataset and runlocal, a few steps: shows the script works.")
    args = p.parse_args(argv)
    if args.check and args.stage == "decoder":
        p.error("--check trains an upsampler on the tiny dataset (the decoder needs the recipe's "
                "CLIP embeddings): pass --stage sr64 with it.")
    if args.check:
        args.steps, args.log_every = 6, 2
    common.preamble("training steps/s with one CPU device against one per core (mesh.cpu_devices)",
                    [f"configs/shapes.py:stage={args.stage}, {args.steps} steps, median of the "
                     f"trainer's steps/s over the {args.log_every}-step windows after the first"])
    with tempfile.TemporaryDirectory() as tmp:
        if args.check:
            args.data_dir = os.path.join(tmp, "data")
            subprocess.run([sys.executable, "-m", "unclip_jax.cli", "shapes", "--config", "tiny",
                            "--data-dir", args.data_dir], check=True, capture_output=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        rows, rates = [], {}
        for setting in (0, -1):
            r = train_once(args.stage, setting, os.path.join(tmp, f"run{setting}"), args)
            rates[setting] = r["rate"]
            rows.append([f"{setting} ({'one device' if setting == 0 else 'one per core'})",
                         r["devices"], f"{r['rate']:.3f} ({r['low']:.3f}-{r['high']:.3f})",
                         r["windows"], f"{r['wall']:.1f}"])
    print(common.table(["mesh.cpu_devices", "devices", "steps/s med (min-max)", "windows",
                        "whole command s"], rows))
    print(f"\none per core / one device: {rates[-1] / rates[0]:.2f}x the steps/s")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
