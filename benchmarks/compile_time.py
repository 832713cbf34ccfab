"""Compile time of each stage's sampling function for 10, 25 and 100 steps.

    .venv/bin/python benchmarks/compile_time.py                 # mid size, batch 1
    .venv/bin/python benchmarks/compile_time.py --steps 10,25,100,250 --stages decoder

Every sampling loop of unclip-jax is a lax.scan, so the network is traced and compiled once
whatever the number of steps: compile time and program size must stay flat as steps grow. The
functions are exactly those benchmarks/sampling_stages.py times (prior: sample_prior with the
unCLIP sampler and guidance 4; decoder: guided_decoder_fn + unclip_sample, guidance 8;
super-res: resize_low_res + a lax.scan of unclip_step + the last step with super_res_last).
Columns: trace + lower seconds, XLA compile seconds, and the size of the lowered StableHLO text.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import sampling_stages as ss  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mid", choices=list(common.SIZES))
    p.add_argument("--steps", default="10,25,100", help="comma-separated step counts")
    p.add_argument("--stages", default="prior,decoder,super_res")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if min(steps) < 2:
        p.error("step counts must be at least 2 (super-res splits off its last step)")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - set(ss.KARLO_STEPS):
        p.error("stages must be a subset of prior,decoder,super_res")
    common.preamble(f"compile time of the sampling functions, {args.size} size, batch "
                    f"{args.batch}", ["nothing is run, only traced, lowered and compiled; one "
                                      "fresh jax.jit per (stage, steps)"])
    import numpy as np
    inputs = common.text_inputs(args.batch, seed=3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            if stage == "prior":
                model = common.ours_prior(common.diffusers_prior(args.size, 10), tmp)
                build = lambda n: ss.ours_prior(model, inputs, args.batch, n,  # noqa: E731
                                                ss.GUIDANCE["prior"])
            elif stage == "decoder":
                model = common.ours_decoder(*common.diffusers_decoder(args.size, 20), tmp)
                build = lambda n: ss.ours_decoder(model, inputs, args.batch, n,  # noqa: E731
                                                  ss.GUIDANCE["decoder"])
            else:
                model = common.ours_super_res(common.diffusers_super_res(args.size, 30), tmp)
                low = common.SIZES[args.size]["decoder"]["sample_size"]
                low = np.zeros((args.batch, low, low, 3), np.float32)
                size = common.SIZES[args.size]["super_res"]["sample_size"]
                build = lambda n: ss.ours_super_res(model, model, low, n, size)  # noqa: E731
            for n in steps:
                _, _, (calls, _) = build(n)
                c = ss.LAST_COMPILE
                rows.append([stage, n, calls, c["trace_lower_s"], c["compile_s"],
                             c["trace_lower_s"] + c["compile_s"], c["hlo_chars"] // 1000])
                print(common.table(HEADERS, rows[-1:]), flush=True)
            del model
    print()
    print(common.table(HEADERS, rows))
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r[0], []).append(r)
    for stage, rs in by_stage.items():
        print(f"{stage}: compile {rs[-1][5] / rs[0][5]:.2f}x from {rs[0][1]} to {rs[-1][1]} steps "
              f"({rs[-1][1] / rs[0][1]:.0f}x the steps); program size "
              f"{rs[-1][6] / max(rs[0][6], 1):.2f}x")
    return 0


HEADERS = ["stage", "steps", "network calls per run", "trace+lower s", "compile s", "total s",
           "StableHLO kchars"]

if __name__ == "__main__":
    sys.exit(main())
