"""The train-step and sampling comparisons on one NVIDIA GPU in bfloat16, and the MFU of the
decoder's training step at Karlo's size (0.89B parameters, 64x64).

    .venv/bin/python benchmarks/gpu.py                      # needs jax[cuda] and torch with CUDA
    .venv/bin/python benchmarks/gpu.py --mfu-batch 32 --remat
    .venv/bin/python benchmarks/gpu.py --check              # no GPU: plan, sizes, lowering
    .venv/bin/python benchmarks/gpu.py --sweep              # the MFU levers, one process each
    .venv/bin/python benchmarks/gpu.py --sweep --variants b32/remat=dots_saveable/attn=cudnn

The MFU levers (``--sweep``): each variant of Karlo's decoder train step runs in its own
process (XLA's flags are per process) and prints its row as soon as it is measured, so a run
cut short keeps what it measured. A variant is ``b<batch>`` followed by any of
``/remat=<jax.checkpoint_policies name>`` (rematerialise every residual and attention block
under that policy), ``/attn=cudnn`` (cuDNN's fused attention through
``jax.nn.dot_product_attention``), ``/flags=<set>`` (XLA GPU flags, ``XLA_GPU_FLAG_SETS``).
Buffers are donated and the step has no host sync but the loss read that ends each timed call.
``--torch-compile`` adds torch.compile'd modules as a second peer to the train rows;
``--karlo-prior`` adds the diffusion prior's train step at Karlo's size (1.0B).

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


# XLA GPU flag sets the sweep can name (flags=...): the latency-hiding scheduler overlaps
# independent kernels; Triton GEMM off leaves every matrix product to cuBLAS.
XLA_GPU_FLAG_SETS = {
    "none": "",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "cublas": "--xla_gpu_enable_triton_gemm=false",
    "lhs+cublas": "--xla_gpu_enable_latency_hiding_scheduler=true "
                  "--xla_gpu_enable_triton_gemm=false",
}
# The default sweep, most informative first (each costs a ~2 min compile on an H100).
DEFAULT_VARIANTS = (
    "b16/attn=cudnn",
    "b32/remat=dots_with_no_batch_dims_saveable/attn=cudnn",
    "b32/remat=dots_with_no_batch_dims_saveable/attn=cudnn/flags=lhs",
    "b64/remat=nothing_saveable/attn=cudnn",
    "b32/remat=dots_saveable/attn=cudnn/flags=lhs+cublas",
)


class NoGPU(RuntimeError):
    pass


def _batches(text: str) -> tuple:
    """'4,16' -> (4, 16): positive batch sizes (argparse type)."""
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 4 or 4,16, got "
                                         f"{text!r}")
    return out


def parse_variant(spec: str) -> dict:
    """'b32/remat=dots_saveable/attn=cudnn/flags=lhs' -> dict(batch, remat, remat_policy,
    attention_impl, flags); ValueError naming what is wrong."""
    from unclip_jax.models.transformer import REMAT_POLICIES
    from unclip_jax.models.unet_blocks import ATTENTION_IMPLS
    head, *parts = spec.strip().split("/")
    if not (head.startswith("b") and head[1:].isdigit() and int(head[1:]) > 0):
        raise ValueError(f"variant {spec!r}: must start with b<batch>, e.g. b32")
    out = dict(spec=spec, batch=int(head[1:]), remat=False, remat_policy="nothing_saveable",
               attention_impl="xla", flags="none")
    for part in parts:
        key, _, value = part.partition("=")
        if key == "remat" and value in REMAT_POLICIES:
            out.update(remat=True, remat_policy=value)
        elif key == "attn" and value in ATTENTION_IMPLS:
            out["attention_impl"] = value
        elif key == "flags" and value in XLA_GPU_FLAG_SETS:
            out["flags"] = value
        else:
            raise ValueError(f"variant {spec!r}: cannot use {part!r} (remat= one of "
                             f"{REMAT_POLICIES}; attn= one of {ATTENTION_IMPLS}; flags= one of "
                             f"{tuple(XLA_GPU_FLAG_SETS)})")
    return out


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
    if args.karlo_prior and not args.skip_train:
        lines.append(f"prior train step, bf16, Karlo size (1.0B), batch {args.prior_batch}")
    if args.torch_compile and not args.skip_train:
        lines.append("torch.compile'd modules as a second peer in the train rows")
    lines.append("sampling per stage, bf16, Karlo size, batch "
                 f"{' and '.join(map(str, args.sample_batch))}, steps 25/25/7, guidance 4/8/-, "
                 "compile s per stage"
                 if not args.skip_sampling else "sampling skipped (--skip-sampling)")
    return lines


def sweep_plan(args) -> list[dict]:
    return [parse_variant(v) for v in (args.variants.split(",") if args.variants
                                        else DEFAULT_VARIANTS)]


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
    variants = sweep_plan(args)
    print("sweep (--sweep), one process each:")
    for v in variants:
        print(f"  - {v['spec']}: XLA_FLAGS={XLA_GPU_FLAG_SETS[v['flags']]!r}")
    check_variants(variants)
    return 0


def check_variants(variants: list[dict]) -> None:
    """Build the mid-size decoder with each variant's remat policy and trace its train step to
    a jaxpr (on CPU, with XLA attention: cuDNN's lowers on NVIDIA GPUs only), so that a GPU run
    does not find a broken variant; prints the model FLOPs of each."""
    import train_step as ts
    from unclip_jax.train.metrics import model_flops
    unet, proj = common.diffusers_decoder("mid", seed=0, out_channels=3)
    batch = ts.decoder_batch("mid", 2)
    seen = set()
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            key = (v["remat"], v["remat_policy"])
            if key in seen:
                continue
            seen.add(key)
            model = common.ours_decoder(unet, proj, os.path.join(tmp, str(len(seen))),
                                        dtype="bfloat16", remat=v["remat"],
                                        remat_policy=v["remat_policy"])
            jaxpr = ts.decoder_step_jaxpr(model, batch)
            print(f"  traced: remat={v['remat']} policy={v['remat_policy']}: mid decoder "
                  f"batch 2, {model_flops(jaxpr) / 1e9:.1f} GFLOP/step in its jaxpr "
                  "(recomputation included; MFU uses the step without remat)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="no GPU needed: print the plan only")
    p.add_argument("--train-size", default="mid", choices=list(common.SIZES))
    p.add_argument("--decoder-batch", type=int, default=64)
    p.add_argument("--prior-batch", type=int, default=256)
    p.add_argument("--mfu-batch", type=int, default=16)
    p.add_argument("--remat", action="store_true", help="rematerialise blocks (ours only)")
    p.add_argument("--sample-batch", type=_batches, default=(4,),
                   help="sampling batch size(s), comma-separated, e.g. 4,16 (default 4)")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--skip-train", action="store_true",
                   help="sampling only (no train-step or MFU rows)")
    p.add_argument("--skip-mid", action="store_true",
                   help="no mid-size train rows (Karlo's MFU row and sampling only)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="override the card's bf16 peak")
    p.add_argument("--sweep", action="store_true",
                   help="the MFU levers on Karlo's decoder step, one process per variant")
    p.add_argument("--variants", help="comma-separated variants for --sweep / --check "
                   "(default: DEFAULT_VARIANTS)")
    p.add_argument("--variant", help=argparse.SUPPRESS)   # one variant, in its own process
    p.add_argument("--variant-timeout", type=int, default=420,
                   help="seconds one --sweep variant may take (compile included)")
    p.add_argument("--torch-compile", action="store_true",
                   help="torch.compile'd modules as a second peer in the train rows")
    p.add_argument("--karlo-prior", action="store_true",
                   help="also the prior's train step at Karlo's size")
    args = p.parse_args(argv)
    if args.variants:
        try:
            sweep_plan(args)
        except ValueError as e:
            p.error(str(e))
    if args.check:
        return check(args)
    try:
        name = find_gpu()
    except NoGPU as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    peak = peak_flops(name, args.peak_tflops and args.peak_tflops * 1e12)
    if args.variant:
        return run_variant(parse_variant(args.variant), args, peak)
    if args.sweep:
        return sweep(args, name, peak)
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
    if args.torch_compile:
        headers, keys = headers + ts.COMPILED_HEADERS, keys + ts.COMPILED_KEYS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            train_rows(args, ts, bf16, headers, keys, rows, tmp)
        if not args.skip_sampling:
            torch.cuda.empty_cache()
            import sampling_stages as ss
            for batch in args.sample_batch:   # each batch's table prints as it is done
                srows = ss.run_stages("karlo", batch, dict(ss.KARLO_STEPS),
                                      list(ss.KARLO_STEPS), 3, os.path.join(tmp, f"s{batch}"),
                                      device="cuda", dtype="bfloat16",
                                      autocast_dtype=torch.bfloat16, distinct_last=True)
                print()
                print(common.table(ss.HEADERS, srows), flush=True)
                torch.cuda.empty_cache()
    return 0


SWEEP_HEADERS = ["variant", "XLA flags", "batch", "ours s/step med (min-max)", "ex/s",
                 "model GFLOP/step", "TFLOP/s", "MFU", "compile s", "peak GPU GiB"]
SWEEP_KEYS = ["spec", "flags", "batch", "ours_s", "ex_s", "gflop", "tflops", "mfu", "compile_s",
              "peak_gib"]


def _model_flops_without_remat(unet, proj, folder: str, batch: dict) -> float:
    """The step's model FLOPs: rematerialisation's recomputed products are hardware work, not
    model work, so MFU counts the step traced without remat (a jaxpr, nothing compiled)."""
    import train_step as ts
    from unclip_jax.train.metrics import model_flops
    model = common.ours_decoder(unet, proj, folder, dtype="bfloat16")
    return model_flops(ts.decoder_step_jaxpr(model, batch))


def run_variant(v: dict, args, peak) -> int:
    """One sweep variant (this process's XLA_FLAGS were set by the caller): our Karlo decoder
    step only; prints 'ROW <json>'."""
    import json

    import jax
    import train_step as ts
    common.count_model_flops()
    unet, proj = common.diffusers_decoder("karlo", seed=0, out_channels=3)
    batch = ts.decoder_batch("karlo", v["batch"])
    with tempfile.TemporaryDirectory() as tmp:
        flops = None
        if v["remat"]:
            flops = _model_flops_without_remat(unet, proj, os.path.join(tmp, "plain"), batch)
        model = common.ours_decoder(unet, proj, os.path.join(tmp, "v"), dtype="bfloat16",
                                    remat=v["remat"], remat_policy=v["remat_policy"],
                                    attention_impl=v["attention_impl"])
        del unet, proj
        step, step_flops, compile_s = ts.ours_decoder_step(model, batch)
        flops = flops or step_flops
        del model
        times = common.time_calls(step, warmup=2, repeats=args.repeats)
    med = common.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    row = dict(spec=v["spec"], flags=XLA_GPU_FLAG_SETS[v["flags"]] or "-", batch=v["batch"],
               ours_s=common.spread(times), ex_s=v["batch"] / med,
               gflop=None if flops is None else flops / 1e9,
               tflops=None if flops is None else flops / med / 1e12,
               mfu=None if not (flops and peak) else f"{100 * flops / med / peak:.1f}%",
               compile_s=compile_s,
               peak_gib=stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None)
    print("ROW " + json.dumps(row), flush=True)
    return 0


def sweep(args, name: str, peak) -> int:
    """Each variant in a child process with its XLA flags; the table grows as rows arrive."""
    import json
    import subprocess
    common.preamble("GPU: MFU levers, Karlo decoder train step (0.89B, 64x64), bf16, ours",
                    [f"GPU {name}, bf16 dense peak "
                     f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}",
                     "model FLOPs from the step's jaxpr (as in the train rows); one process "
                     "per variant; warm-up 2 steps, then --repeats steps"])
    rows = []
    for v in sweep_plan(args):
        env = dict(os.environ)
        flags = XLA_GPU_FLAG_SETS[v["flags"]]
        env["XLA_FLAGS"] = " ".join(x for x in (env.get("XLA_FLAGS", ""), flags) if x)
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v["spec"],
               "--repeats", str(args.repeats)]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                 timeout=args.variant_timeout)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
            if lines:
                rows.append(json.loads(lines[-1][4:]))
            else:
                tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                rows.append(dict(spec=v["spec"], flags=flags or "-", batch=v["batch"],
                                 ours_s="failed: " + " | ".join(tail)[-300:]))
        except subprocess.TimeoutExpired:
            rows.append(dict(spec=v["spec"], flags=flags or "-", batch=v["batch"],
                             ours_s=f"timed out after {args.variant_timeout} s"))
        print(common.table(SWEEP_HEADERS, [[r.get(k) for k in SWEEP_KEYS] for r in rows]),
              flush=True)
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
                                             3, os.path.join(tmp, "d"),
                                             torch_compile=args.torch_compile, **bf16)))
        rows.append(_compiled(ts.run_prior(args.train_size, args.prior_batch, args.repeats, 3,
                                           os.path.join(tmp, "p"),
                                           torch_compile=args.torch_compile, **bf16)))
        print(common.table(headers, [[r.get(k) for k in keys] for r in rows]), flush=True)
        torch.cuda.empty_cache()
    karlo = ts.run_decoder("karlo", args.mfu_batch, args.repeats, 3,
                           os.path.join(tmp, "k"), remat=args.remat,
                           torch_compile=args.torch_compile, **bf16)
    karlo = _compiled(karlo)
    karlo["stage"] += " (Karlo 0.89B)"
    rows.append(karlo)
    if args.karlo_prior:
        torch.cuda.empty_cache()
        prior = _compiled(ts.run_prior("karlo", args.prior_batch, args.repeats, 3,
                                       os.path.join(tmp, "kp"), remat=args.remat,
                                       torch_compile=args.torch_compile, **bf16))
        prior["stage"] += " (Karlo)"
        rows.append(prior)
    print()
    print(common.table(headers, [[r.get(k) for k in keys] for r in rows]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
