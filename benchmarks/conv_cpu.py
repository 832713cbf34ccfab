"""The convolutions of the mid decoder's train step alone: XLA's CPU convolutions against
torch's (oneDNN), same shapes, forward and both gradients.

    .venv/bin/python benchmarks/conv_cpu.py
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
        .venv/bin/python benchmarks/conv_cpu.py           # Eigen's convolutions, not YNNPACK's

It answers "how much of the train-step gap is the convolution library, and why": every forward
convolution of the step (found in its jaxpr, with its count) is timed on its own, as a jitted
forward + vjp (input and kernel gradients) on our side and as ``conv2d`` + ``backward()`` on
torch's, and the sums are weighted by how often each shape occurs in one step. The "busy
threads" columns (CPU seconds per wall second) show how many cores each side keeps busy: on
jaxlib 0.10 XLA runs some large convolutions (those with 64 output channels at 32x32, the mid
decoder's first level, and most 1x1 ones) on one thread, where torch's oneDNN uses every core.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def forward_convs(batch: int) -> collections.Counter:
    """(x shape NHWC, kernel shape HWIO, strides, padding) -> count, for the forward
    convolutions of the mid decoder's train step."""
    import train_step as ts
    from jax.extend import core as jcore
    unet, proj = common.diffusers_decoder("mid", seed=0, out_channels=3)
    with tempfile.TemporaryDirectory() as tmp:
        model = common.ours_decoder(unet, proj, tmp)
    jaxpr = ts.decoder_step_jaxpr(model, ts.decoder_batch("mid", batch))
    found = collections.Counter()

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "conv_general_dilated":
                dn = e.params["dimension_numbers"]
                if tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1):
                    found[(tuple(e.invars[0].aval.shape), tuple(e.invars[1].aval.shape),
                           tuple(e.params["window_strides"]),
                           tuple(map(tuple, e.params["padding"])))] += 1
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def time_ours(shape_x, shape_w, strides, padding, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape_x).astype(np.float32))
    w = jnp.asarray(rng.standard_normal(shape_w).astype(np.float32) * 0.05)
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fwd = jax.jit(conv)

    @jax.jit
    def fwd_bwd(x, w):
        y, pull = jax.vjp(conv, x, w)
        return pull(y)

    t_f = common.time_calls(lambda: jax.block_until_ready(fwd(x, w)), 2, repeats)
    t_fb = common.time_calls(lambda: jax.block_until_ready(fwd_bwd(x, w)), 2, repeats)
    busy = common.busy_threads(lambda: jax.block_until_ready(fwd_bwd(x, w)))
    return common.median(t_f), common.median(t_fb), busy


def time_torch(shape_x, shape_w, strides, padding, repeats):
    import numpy as np
    import torch
    import torch.nn.functional as F
    b, h, w_, c = shape_x
    kh, kw, ci, co = shape_w
    pads = [p[0] for p in padding]
    if any(p[0] != p[1] for p in padding):
        raise ValueError(f"asymmetric padding {padding} has no conv2d equivalent")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((b, c, h, w_)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((co, ci, kh, kw)).astype(np.float32) * 0.05)
    with torch.no_grad():
        t_f = common.time_calls(lambda: F.conv2d(x, w, stride=strides, padding=pads), 2, repeats)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd():
        y = F.conv2d(xr, wr, stride=strides, padding=pads)
        y.backward(y.detach())

    t_fb = common.time_calls(fwd_bwd, 2, repeats)
    return common.median(t_f), common.median(t_fb), common.busy_threads(fwd_bwd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    threads = common.match_torch_threads()
    common.preamble("the mid decoder train step's convolutions: XLA CPU vs torch (oneDNN)",
                    [f"torch intra-op threads {threads}",
                     "each distinct forward convolution of the step timed alone (median of "
                     "--repeats), weighted by its count in the step"])
    convs = forward_convs(args.batch)
    rows, tot = [], collections.Counter()
    for (sx, sw, st, pad), n in sorted(convs.items(), key=lambda kv: -kv[1] * kv[0][0][1]):
        of, ofb, obusy = time_ours(sx, sw, st, pad, args.repeats)
        tf, tfb, tbusy = time_torch(sx, sw, st, pad, args.repeats)
        tot.update(dict(of=n * of, ofb=n * ofb, tf=n * tf, tfb=n * tfb))
        rows.append([f"{sx} * {sw[:2]} {sw[2]}->{sw[3]}" + ("" if st == (1, 1) else f" /{st[0]}"),
                     n, f"{of * 1e3:.2f}", f"{tf * 1e3:.2f}", f"{tf / of:.2f}",
                     f"{ofb * 1e3:.2f}", f"{tfb * 1e3:.2f}", f"{tfb / ofb:.2f}",
                     f"{obusy:.2f}", f"{tbusy:.2f}"])
    rows.append(["all (weighted by count)", sum(convs.values()), f"{tot['of'] * 1e3:.1f}",
                 f"{tot['tf'] * 1e3:.1f}", f"{tot['tf'] / tot['of']:.2f}",
                 f"{tot['ofb'] * 1e3:.1f}", f"{tot['tfb'] * 1e3:.1f}",
                 f"{tot['tfb'] / tot['ofb']:.2f}", "", ""])
    print(common.table(["conv (NHWC x HWIO)", "count", "ours fwd ms", "torch fwd ms",
                        "torch/ours fwd", "ours fwd+bwd ms", "torch fwd+bwd ms",
                        "torch/ours fwd+bwd", "ours busy threads", "torch busy threads"], rows))
    print("\n'torch/ours' > 1 means ours is faster. 'all' sums count x median over the step. "
          "'busy threads' = process CPU seconds per wall second of fwd+bwd: 1.00 is one thread.")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
