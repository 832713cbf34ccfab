"""What every benchmark shares: the machine report, timing, tables, and the models on both sides.

Each benchmark builds the diffusers modules with every parameter random, writes them with
``save_pretrained`` into a temporary folder, and loads that folder into our modules with
``unclip_jax.convert.diffusers`` (``load_prior`` / ``load_decoder`` / ``load_super_res``), so
both sides run the same weights on the same inputs. Sizes:

  mid    something a 2-core CPU runs in seconds: decoder 64 channels (1,2,3,4) at 32x32 with
         attention at 16/8/4, prior 8 heads x 64 (width 512) x 6 layers, super-res 64 channels
         32 -> 64; CLIP width 768 and 77 text tokens as Karlo's.
  karlo  Karlo v1.0-alpha as diffusers' conversion script builds it: prior 1.0B (20 layers x
         2048), decoder 0.89B (320 channels, 64x64), super-res 0.69B (256x256).

Nothing is downloaded: the weights are random (timing does not depend on their values).
"""
from __future__ import annotations

import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/x.py` from a checkout without `pip install -e .`
    sys.path.insert(1, REPO)

# --------------------------------------------------------------------------------------------
# Sizes (diffusers constructor arguments; our configs come from the saved config.json files)
# --------------------------------------------------------------------------------------------

CLIP_DIM = 768          # CLIP ViT-L/14, as Karlo
TEXT_LEN = 77

_DECODER_BLOCKS = dict(
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type="identity",
    resnet_time_scale_shift="scale_shift", in_channels=3)
_SR_BLOCKS = dict(down_block_types=("ResnetDownsampleBlock2D",) * 4,
                  up_block_types=("ResnetUpsampleBlock2D",) * 4, add_attention=False,
                  in_channels=6, out_channels=3)

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "mid": dict(
        prior=dict(num_attention_heads=8, attention_head_dim=64, num_layers=6,
                   embedding_dim=CLIP_DIM, num_embeddings=TEXT_LEN, additional_embeddings=4),
        decoder=dict(_DECODER_BLOCKS, sample_size=32, block_out_channels=(64, 128, 192, 256),
                     layers_per_block=2, attention_head_dim=64, cross_attention_dim=256,
                     out_channels=6),
        super_res=dict(_SR_BLOCKS, sample_size=64, block_out_channels=(64, 128, 192, 256),
                       layers_per_block=2),
    ),
    "karlo": dict(
        prior=dict(),  # PriorTransformer's defaults are Karlo's prior
        decoder=dict(_DECODER_BLOCKS, sample_size=64, block_out_channels=(320, 640, 960, 1280),
                     layers_per_block=3, attention_head_dim=64, cross_attention_dim=1536,
                     out_channels=6),
        super_res=dict(_SR_BLOCKS, sample_size=256, block_out_channels=(320, 640, 960, 1280),
                       layers_per_block=3),
    ),
}


# --------------------------------------------------------------------------------------------
# The machine, the versions, the command
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    from unclip_jax.train.distributed import usable_cores
    return usable_cores()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 (a benchmark reports what it finds)
            out[name] = "absent"
    return out


def machine_lines() -> list[str]:
    lines = [f"CPU: {cpu_model()}, {cpu_cores()} cores usable ({os.cpu_count()} online), "
             f"{platform.system()} {platform.release()}",
             "XLA_FLAGS: " + (os.environ.get("XLA_FLAGS") or "(none)")]
    try:
        load = os.getloadavg()
        lines.append(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                     "(figures from a busy machine are noisier and slower)")
    except OSError:
        pass
    try:
        import jax
        devs = jax.devices()
        lines.append(f"jax devices: {len(devs)} x {devs[0].device_kind} ({devs[0].platform})")
    except Exception as e:  # noqa: BLE001
        lines.append(f"jax devices: unavailable ({e})")
    try:
        import torch
        if torch.cuda.is_available():
            lines.append(f"torch cuda: {torch.cuda.get_device_name(0)}")
        lines.append(f"torch threads: {torch.get_num_threads()}")
    except Exception:  # noqa: BLE001
        pass
    return lines


def command() -> str:
    """The command that reproduces this run (environment knobs that matter included)."""
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in
                   ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"cd {REPO} && {env + ' ' if env else ''}.venv/bin/python {script} {args}".rstrip()


def preamble(title: str, notes: Sequence[str] = ()) -> None:
    print(f"# {title}")
    print("command:  " + command())
    for line in machine_lines():
        print("machine:  " + line)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    for note in notes:
        print("note:     " + note)
    print(flush=True)


# --------------------------------------------------------------------------------------------
# Threads, timing, tables, FLOPs
# --------------------------------------------------------------------------------------------

def match_torch_threads(n: int | None = None) -> int:
    """Give torch as many intra-op threads as XLA's CPU backend uses (one per usable core), and
    flush denormals to zero as XLA does on CPU (Adam's second moments of random-weight gradients
    are denormal floats, which make torch's optimizer step several times slower otherwise)."""
    import torch
    n = n or cpu_cores()
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    with contextlib.suppress(RuntimeError):  # only settable before torch's first parallel op
        torch.set_num_interop_threads(1)
    return n


def time_calls(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones. ``fn`` must
    wait for its own result (``jax.block_until_ready``; torch on CPU is synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def busy_threads(fn: Callable[[], Any], min_seconds: float = 0.5) -> float:
    """Process CPU seconds per wall second over calls of ``fn`` lasting ``min_seconds`` or more
    (the process clock ticks in 10 ms): about how many cores the call keeps busy (1.0 = one
    thread; the machine's other jobs do not count)."""
    start, wall = os.times(), time.perf_counter()
    while time.perf_counter() - wall < min_seconds:
        fn()
    end, wall = os.times(), time.perf_counter() - wall
    return (end.user + end.system - start.user - start.system) / wall


def same_work(what: str, ours: Any, theirs: Any, theirs_layout: str = "NCHW") -> tuple:
    """The shape both sides produced, after checking it is the same (ours NHWC, torch's NCHW
    images transposed): a benchmark whose two sides do unequal work stops here, loudly.
    ``ours`` may be a pytree: its largest array is compared."""
    import jax
    import numpy as np
    leaves = [x for x in jax.tree_util.tree_leaves(ours) if hasattr(x, "shape")]
    o = tuple(max(leaves, key=lambda x: int(np.prod(x.shape))).shape)
    t = tuple(theirs.shape)
    if len(t) == 4 and theirs_layout == "NCHW":
        t = (t[0], t[2], t[3], t[1])
    if o != t:
        raise SystemExit(f"{what}: ours returns shape {o}, diffusers {t} (as NHWC): the two sides "
                         "do not do the same work, so no time of this row would mean anything.")
    return o


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """'median (min-max)' in seconds."""
    return f"{median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


FLOP_LOG: list[tuple[float | None, float | None]] = []
"""(model FLOPs counted on the jaxpr, XLA's count of the compiled program) of each
``compiled_flops`` call made after ``count_model_flops()``."""


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function: XLA's count of the compiled program (the
    trainer's own count), or, after ``count_model_flops()``, the matrix-product and convolution
    FLOPs of its jaxpr (``unclip_jax.train.metrics.model_flops``)."""
    from unclip_jax.train.metrics import compiled_flops as count
    xla = count(compiled)
    if not hasattr(compiled, "_model_flops"):
        return xla
    FLOP_LOG.append((compiled._model_flops, xla))
    return compiled._model_flops if compiled._model_flops is not None else xla


def count_model_flops() -> None:
    """From now on every ``jit(f).lower(...).compile()`` carries the model FLOPs of ``f``
    (``model_flops`` of its jaxpr) for ``compiled_flops``.

    XLA's count of the compiled GPU program leaves out the library calls that do nearly all the
    work (cuBLAS matrix products, cuDNN convolutions): on an H100 (jax 0.11.2) it gave 134
    GFLOP for the mid decoder step at batch 64, where the CPU's count (114 at batch 8) scales
    to ~910, and ``Lowered.cost_analysis`` gave the same GPU number."""
    from jax._src import stages

    from unclip_jax.train.metrics import model_flops
    if getattr(stages.Traced.lower, "_counts_flops", False):
        return
    lower, compile_ = stages.Traced.lower, stages.Lowered.compile

    def counting_lower(self, *args, **kwargs):
        lowered = lower(self, *args, **kwargs)
        try:
            lowered._model_flops = model_flops(self.jaxpr) or None
        except Exception:  # noqa: BLE001 (a benchmark reports what it finds)
            lowered._model_flops = None
        return lowered

    def counting_compile(self, *args, **kwargs):
        compiled = compile_(self, *args, **kwargs)
        if hasattr(self, "_model_flops"):
            compiled._model_flops = self._model_flops
        return compiled

    counting_lower._counts_flops = True
    stages.Traced.lower, stages.Lowered.compile = counting_lower, counting_compile


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (right-aligned numbers)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
        return f"{x:.3e}"
    return "-" if x is None else str(x)


# --------------------------------------------------------------------------------------------
# Random diffusers modules, saved and loaded into ours
# --------------------------------------------------------------------------------------------

def randomize_(module, seed: int) -> None:
    """Every parameter random in place (diffusers zero-initialises output layers and the
    prior's statistics; random values make both sides compute something non-trivial)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "clip_std":
                p.copy_(0.5 + noise.abs() * 0.1)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
                p.copy_(noise * (0.5 / fan_in ** 0.5))


def diffusers_prior(size: str, seed: int = 0):
    from diffusers import PriorTransformer
    with _quiet():
        model = PriorTransformer(**SIZES[size]["prior"])
    randomize_(model, seed)
    return model.eval()


def diffusers_decoder(size: str, seed: int = 0, **overrides):
    """(UNet2DConditionModel, UnCLIPTextProjModel) in Karlo's decoder layout."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    spec = dict(SIZES[size]["decoder"], **overrides)
    with _quiet():
        unet = UNet2DConditionModel(**spec)
        proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=CLIP_DIM,
                                   time_embed_dim=4 * spec["block_out_channels"][0],
                                   cross_attention_dim=spec["cross_attention_dim"])
    randomize_(unet, seed)
    randomize_(proj, seed + 1)
    return unet.eval(), proj.eval()


def diffusers_super_res(size: str, seed: int = 0):
    from diffusers import UNet2DModel
    with _quiet():
        model = UNet2DModel(**SIZES[size]["super_res"])
    randomize_(model, seed)
    return model.eval()


def ours_prior(torch_prior, folder: str, **kw):
    from unclip_jax.convert.diffusers import load_prior
    torch_prior.save_pretrained(os.path.join(folder, "prior"))
    return load_prior(os.path.join(folder, "prior"), **kw)


def ours_decoder(unet, proj, folder: str, **kw):
    from unclip_jax.convert.diffusers import load_decoder
    unet.save_pretrained(os.path.join(folder, "decoder"))
    proj.save_pretrained(os.path.join(folder, "text_proj"))
    return load_decoder(folder, **kw)


def ours_super_res(torch_sr, folder: str, name: str = "super_res_first", **kw):
    from unclip_jax.convert.diffusers import load_super_res
    torch_sr.save_pretrained(os.path.join(folder, name))
    return load_super_res(os.path.join(folder, name), **kw)


def param_count(torch_module) -> int:
    return sum(p.numel() for p in torch_module.parameters())


@contextlib.contextmanager
def _quiet():
    """diffusers logs deprecation notes for the unCLIP classes; keep the tables readable."""
    try:
        from diffusers.utils import logging as dlog
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        yield
        return
    try:
        yield
    finally:
        dlog.set_verbosity(level)


# --------------------------------------------------------------------------------------------
# Inputs shared by both sides
# --------------------------------------------------------------------------------------------

def text_inputs(batch: int, seed: int = 0, real_tokens: int = 12):
    """Random CLIP-like conditioning as NumPy: z_t [B, 768], hidden [B, 77, 768], mask [B, 77]
    (the first ``real_tokens`` real), and the 'empty caption' one (2 real tokens) for guidance."""
    import numpy as np
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    mask = np.zeros((batch, TEXT_LEN), bool)
    mask[:, :real_tokens] = True
    null_mask = np.zeros((batch, TEXT_LEN), bool)
    null_mask[:, :2] = True
    return dict(text_embed=f32(batch, CLIP_DIM), text_hidden=f32(batch, TEXT_LEN, CLIP_DIM),
                text_mask=mask, null_text_embed=f32(batch, CLIP_DIM),
                null_text_hidden=f32(batch, TEXT_LEN, CLIP_DIM), null_text_mask=null_mask,
                image_embed=f32(batch, CLIP_DIM))
