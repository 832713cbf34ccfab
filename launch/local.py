"""Start N processes of ``unclip-jax train`` on this machine, as a multi-host run would.

    python launch/local.py --processes 2 --devices-per-process 4 -- \
        --config configs/diffusion_prior.py:runlocal --workdir runs/prior_2proc

Each process gets K simulated CPU devices (``--xla_force_host_platform_device_count``), the
coordinator on 127.0.0.1 (a free port) and gloo collectives, so N processes x K devices run
the same program a pod with N hosts would. Output of process i is prefixed ``[i]``. Waits for
all; if one fails the others are stopped. Exit status: the first non-zero status, else 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="arguments of `unclip-jax train` (after --)")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    address = f"127.0.0.1:{free_port()}"
    procs, threads = [], []
    for i in range(args.processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
        cmd = [args.python, "-m", "unclip_jax.cli", "train", *train_args,
               "--coordinator-address", address, "--num-processes", str(args.processes),
               "--process-id", str(i)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] "), daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)

    def forward(signum, frame):
        del frame
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    status = 0
    pending = list(procs)
    while pending:
        for p in list(pending):
            try:
                rc = p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            pending.remove(p)
            if rc != 0 and status == 0:
                status = rc
                for q in pending:      # one failed: the others would wait forever on it
                    q.terminate()
    for t in threads:
        t.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
