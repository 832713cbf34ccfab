"""The train-step and sampling comparisons on one NVIDIA GPU in bfloat16, and the MFU of the
decoder's training step at Karlo's size (0.89B parameters, 64x64).

    .venv/bin/python benchmarks/gpu.py                      # needs jax[cuda] and torch with CUDA
    .venv/bin/python benchmarks/gpu.py --mfu-batch 32 --remat
    .venv/bin/python benchmarks/gpu.py --check              # no GPU: plan + model sizes only

Precision: ours run with bfloat16 compute and float32 parameters (the models' ``dtype``), torch
under ``torch.autocast(dtype=torch.bfloat16)`` with float32 parameters: the same mixed precision.
MFU = the model FLOPs of our step (2 x the multiply-adds of every matrix product and convolution
in its jaxpr, ``unclip_jax.train.metrics.model_flops``) / median step time / the card's dense
bf16 peak (H100 SXM and H200: 989 TFLOP/s; H100 PCIe: 756). torch's MFU uses the same FLOP
count. XLA's count of the compiled GPU program is shown beside it but not used: it leaves out
the cuBLAS and cuDNN calls (on an H100 it was 7-26x too small).
Everything else is as in train_step.py and sampling_stages.py (whose functions this calls).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

# Both frameworks share the card: keep XLA from reserving 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PEAK_BF16 = (  # dense bf16 tensor-core peak, FLOP/s; first match on the device name wins
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
)


class NoGPU(RuntimeError):
    pass


def peak_flops(device_name: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a device by name (e.g. 'NVIDIA H100 80GB HBM3'), or ``override``."""
    if override:
        return override
    for key, value in PEAK_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def find_gpu() -> str:
    """The GPU's name when both jax and torch see one; NoGPU with what is missing otherwise."""
    problems = []
    try:
        import jax
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            problems.append(f"jax sees no GPU (its devices: {jax.devices()}; install "
                            "jax[cuda12] and unset JAX_PLATFORMS=cpu)")
    except RuntimeError as e:
        problems.append(f"jax could not start a GPU backend ({e})")
    import torch
    if not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} has no CUDA device (install a CUDA build "
                        "of torch)")
    if problems:
        raise NoGPU("benchmarks/gpu.py needs an NVIDIA GPU visible to jax and torch: "
                    + "; ".join(problems) + ". Run benchmarks/train_step.py and "
                    "benchmarks/sampling_stages.py for the CPU comparison, or "
                    "`benchmarks/gpu.py --check` to see the plan without a GPU.")
    return torch.cuda.get_device_name(0)


def plan(args) -> list[str]:
    lines = []
    if not (args.skip_train or args.skip_mid):
        lines.append(f"train step, bf16, {args.train_size} size: decoder batch "
                     f"{args.decoder_batch}, prior batch {args.prior_batch} (ours vs "
                     "diffusers+torch, examples/s, TFLOP/s, MFU)")
    if not args.skip_train:
        lines.append(f"decoder train step, bf16, Karlo size (0.89B, 64x64), batch "
                     f"{args.mfu_batch}{' with remat' if args.remat else ''}: MFU of ours "
                     "and of torch")
    lines.append("sampling per stage, bf16, Karlo size, batch "
                 f"{args.sample_batch}, steps 25/25/7, guidance 4/8/-"
                 if not args.skip_sampling else "sampling skipped (--skip-sampling)")
    return lines


def check(args) -> int:
    """What runs without a GPU: the plan, and the sizes of Karlo's models (abstract, no memory)."""
    from unclip_jax.convert.diffusers_unet import decoder_config_from_diffusers
    from unclip_jax.models.decoder import abstract_decoder
    from unclip_jax.models.diffusion_prior import count_params, get_preset
    from unclip_jax.models.upsampler import abstract_super_res, count_params as count
    from unclip_jax.models.upsampler import SuperResConfig
    spec = common.SIZES["karlo"]["decoder"]
    unet_cfg = dict(spec, block_out_channels=list(spec["block_out_channels"]),
                    down_block_types=list(spec["down_block_types"]),
                    up_block_types=list(spec["up_block_types"]))
    from unclip_jax.convert import diffusers_unet
    unet_cfg = {**diffusers_unet._COND_DEFAULTS, **unet_cfg}
    dec = decoder_config_from_diffusers(unet_cfg, dict(clip_extra_context_tokens=4,
                                                       clip_embeddings_dim=common.CLIP_DIM))
    sr = SuperResConfig(channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                        scale_shift=False, dtype="bfloat16")
    print("plan:")
    for line in plan(args):
        print("  - " + line)
    print(f"Karlo sizes (abstract): prior {count_params(get_preset('karlo')) / 1e9:.3f}B, "
          f"decoder {count(abstract_decoder(dec)) / 1e9:.3f}B, "
          f"super-res {count(abstract_super_res(sr)) / 1e9:.3f}B")
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200"):
        print(f"peak bf16 for {name!r}: {peak_flops(name) / 1e12:.0f} TFLOP/s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="no GPU needed: print the plan only")
    p.add_argument("--train-size", default="mid", choices=list(common.SIZES))
    p.add_argument("--decoder-batch", type=int, default=64)
    p.add_argument("--prior-batch", type=int, default=256)
    p.add_argument("--mfu-batch", type=int, default=16)
    p.add_argument("--remat", action="store_true", help="rematerialise blocks (ours only)")
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--skip-train", action="store_true",
                   help="sampling only (no train-step or MFU rows)")
    p.add_argument("--skip-mid", action="store_true",
                   help="no mid-size train rows (Karlo's MFU row and sampling only)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="override the card's bf16 peak")
    args = p.parse_args(argv)
    if args.check:
        return check(args)
    try:
        name = find_gpu()
    except NoGPU as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    peak = peak_flops(name, args.peak_tflops and args.peak_tflops * 1e12)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    common.preamble("GPU: train step and sampling, bfloat16, unclip-jax vs diffusers + torch",
                    [f"GPU {name}, bf16 dense peak "
                     f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"]
                    + plan(args))
    import train_step as ts
    bf16 = dict(device="cuda", dtype="bfloat16", autocast_dtype=torch.bfloat16,
                peak_flops=peak)
    # XLA's GPU count of the compiled step misses cuBLAS / cuDNN calls: count the jaxpr's
    common.count_model_flops()
    headers = [h.replace("(XLA)", "(model)") for h in ts.HEADERS] + [
        "ours MFU", "torch MFU", "GFLOP/step (XLA, compiled)"]
    keys = ts.KEYS + ["ours_mfu", "torch_mfu", "gflop_compiled"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            train_rows(args, ts, bf16, headers, keys, rows, tmp)
        if not args.skip_sampling:
            torch.cuda.empty_cache()
            import sampling_stages as ss
            srows = ss.run_stages("karlo", args.sample_batch, dict(ss.KARLO_STEPS),
                                  list(ss.KARLO_STEPS), 3, os.path.join(tmp, "s"),
                                  device="cuda", dtype="bfloat16",
                                  autocast_dtype=torch.bfloat16, distinct_last=True)
            print()
            print(common.table(ss.HEADERS, srows))
    return 0


def _compiled(row: dict) -> dict:
    """The row with XLA's count of the compiled step (the GPU one, library calls uncounted)."""
    if common.FLOP_LOG and common.FLOP_LOG[-1][1] is not None:
        row["gflop_compiled"] = common.FLOP_LOG[-1][1] / 1e9
    return row


def train_rows(args, ts, bf16, headers, keys, rows, tmp) -> None:
    """The train-step rows (mid size unless --skip-mid, then Karlo's decoder), printed as they
    come."""
    import torch
    if not args.skip_mid:
        rows.append(_compiled(ts.run_decoder(args.train_size, args.decoder_batch, args.repeats,
                                             3, os.path.join(tmp, "d"), **bf16)))
        rows.append(_compiled(ts.run_prior(args.train_size, args.prior_batch, args.repeats, 3,
                                           os.path.join(tmp, "p"), **bf16)))
        print(common.table(headers, [[r.get(k) for k in keys] for r in rows]), flush=True)
        torch.cuda.empty_cache()
    karlo = ts.run_decoder("karlo", args.mfu_batch, args.repeats, 3,
                           os.path.join(tmp, "k"), remat=args.remat, **bf16)
    karlo = _compiled(karlo)
    karlo["stage"] += " (Karlo 0.89B)"
    rows.append(karlo)
    print()
    print(common.table(headers, [[r.get(k) for k in keys] for r in rows]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
