"""``unclip-jax demo``: a tour of two parts with a known answer (``make demo`` itself generates
images with the bundled Shapes model).

Two honest checks of what the package can already do, each with numbers and a picture:

1. :func:`sampler_demo`: every diffusion sampler draws from a 2-D mixture of Gaussians through the
   mixture's exact denoiser E[x0 | x_t] (closed form), so every error in the samples is the
   sampler's. Reported per sampler: the share of samples on each mode, the spread around the mode
   against the true std, and the sliced Wasserstein distance to fresh true samples (beside the
   distance between two true sample sets, the noise floor).
2. :func:`clip_demo`: a tiny CLIP (ViT + causal text Transformer + the real BPE tokenizer) learns
   "a {colour} {shape}" captions contrastively from scratch, then classifies fresh images
   zero-shot against all 18 captions.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw

from unclip_jax import diffusion
from unclip_jax.clip import CLIP, contrastive_loss, get_preset, get_tokenizer
from unclip_jax.clip.loss import l2_normalize
from unclip_jax.clip.preprocess import OPENAI_MEAN, OPENAI_STD

# --------------------------------------------------------------------------------------------
# Part 1: samplers on a Gaussian mixture with an exact denoiser
# --------------------------------------------------------------------------------------------


def mixture_modes(modes: int, radius: float) -> np.ndarray:
    """``modes`` centres evenly spaced on a circle, float32 [modes, 2]."""
    angle = 2 * np.pi * np.arange(modes) / modes
    return (radius * np.stack([np.cos(angle), np.sin(angle)], -1)).astype(np.float32)


def sample_mixture(rng: np.random.Generator, centres: np.ndarray, std: float, n: int) -> np.ndarray:
    """n draws from the equal-weight mixture of N(centre, std^2 I)."""
    which = rng.integers(len(centres), size=n)
    return (centres[which] + std * rng.standard_normal((n, 2))).astype(np.float32)


def mixture_denoiser(schedule: diffusion.Schedule, centres: np.ndarray, std: float):
    """The exact E[x0 | x_t, t] of the mixture, as a model_fn predicting x0 ('sample')."""
    centres = jnp.asarray(centres)

    def model_fn(x, t):
        a2 = schedule.alphas_cumprod[t][:, None, None]          # [B, 1, 1]
        a = jnp.sqrt(a2)
        var = a2 * std**2 + (1.0 - a2)                          # marginal variance per mode
        diff = x[:, None, :] - a * centres[None]                # [B, K, 2]
        logits = -0.5 * jnp.sum(diff**2, -1) / var[..., 0]      # equal weights and variances
        resp = jax.nn.softmax(logits, axis=-1)[..., None]
        x0_k = centres[None] + (a * std**2 / var) * diff
        return jnp.sum(resp * x0_k, axis=1)

    return model_fn


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 128, seed: int = 0) -> float:
    """Mean 1-Wasserstein distance over random 1-D projections (equal-size sets)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def mixture_stats(samples: np.ndarray, centres: np.ndarray) -> dict[str, float]:
    """Share of samples per mode (worst deviation from uniform) and spread around the mode."""
    d = np.linalg.norm(samples[:, None] - centres[None], axis=-1)
    nearest = d.argmin(1)
    shares = np.bincount(nearest, minlength=len(centres)) / len(samples)
    spread = float(np.sqrt(np.mean((samples - centres[nearest]) ** 2)))
    return {"worst_share_error": float(np.abs(shares - 1 / len(centres)).max()), "spread": spread}


def run_samplers(config, x_T: jax.Array, model_fn, rng: jax.Array):
    """{name: (samples, seconds, network evaluations)} for each sampler in ``config.samplers``."""
    steps = config.samplers
    spec = lambda sampler, n, **kw: diffusion.SamplerSpec(  # noqa: E731
        sampler=sampler, steps=n, prediction_type="sample", schedule=config.schedule,
        num_train_steps=config.num_train_steps, **kw)
    runs = {
        f"DDPM {steps.ddpm}": spec("ddpm", steps.ddpm),
        f"unCLIP {steps.unclip}": spec("unclip", steps.unclip),
        f"DDIM {steps.ddim}": spec("ddim", steps.ddim, spacing=f"ddim{steps.ddim}"),
        f"DPM-Solver++ {steps.dpm_solver}": spec("dpm++", steps.dpm_solver),
    }
    out = {}
    for name, s in runs.items():
        start = time.perf_counter()
        fn = jax.jit(lambda: diffusion.sample(model_fn, s, x_T, rng))  # noqa: B023
        samples = np.asarray(jax.block_until_ready(fn()))
        out[name] = (samples, time.perf_counter() - start, s.steps)
    return out


def _scatter_panel(points: np.ndarray, centres: np.ndarray, title: str, size: int = 256,
                   colour=(30, 70, 220)) -> Image.Image:
    panel = Image.new("RGB", (size, size + 20), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    draw.text((6, 4), title, fill=(0, 0, 0))
    draw.rectangle([0, 20, size - 1, size + 19], outline=(180, 180, 180))

    def to_px(p):  # [-1, 1]^2 -> pixels, y up
        return (p[..., 0] + 1) / 2 * (size - 1), 20 + (1 - p[..., 1]) / 2 * (size - 1)

    xs, ys = to_px(np.clip(points, -1, 1))
    for x, y in zip(xs, ys):
        draw.point((float(x), float(y)), fill=colour)
    cx, cy = to_px(centres)
    for x, y in zip(cx, cy):
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(220, 30, 30))
    return panel


def sampler_demo(config, out_dir: str) -> dict[str, dict[str, float]]:
    """Part 1. Returns per-sampler statistics and writes ``demo_samplers.png``."""
    m = config.mixture
    centres = mixture_modes(m.modes, m.radius)
    np_rng = np.random.default_rng(config.seed)
    n = config.num_samples
    truth, truth2 = (sample_mixture(np_rng, centres, m.std, n) for _ in range(2))
    schedule = diffusion.get_schedule(config.schedule, config.num_train_steps)
    model_fn = mixture_denoiser(schedule, centres, m.std)
    rng = jax.random.key(config.seed)
    x_T = jax.random.normal(jax.random.fold_in(rng, 1), (n, 2))

    print(f"\n== 1. Diffusion samplers: {m.modes}-mode Gaussian mixture (std {m.std}), "
          f"exact denoiser, {n} samples, {config.schedule} schedule of {config.num_train_steps}")
    floor = sliced_wasserstein(truth, truth2)
    results = {"true samples": (truth2, 0.0, 0)}
    results.update(run_samplers(config, x_T, model_fn, jax.random.fold_in(rng, 2)))
    header = f"{'sampler':<20} {'NFE':>5} {'seconds':>8} {'worst mode share err':>21} " \
             f"{'spread/std':>11} {'sliced W1':>10}"
    print(header + "\n" + "-" * len(header))
    stats, panels = {}, [_scatter_panel(truth, centres, "truth", colour=(30, 160, 50))]
    for name, (samples, seconds, nfe) in results.items():
        s = mixture_stats(samples, centres)
        s["sliced_w1"] = sliced_wasserstein(truth, samples)
        s["spread_ratio"] = s["spread"] / m.std
        stats[name] = s
        print(f"{name:<20} {nfe:>5} {seconds:>8.2f} {s['worst_share_error']:>21.4f} "
              f"{s['spread_ratio']:>11.3f} {s['sliced_w1']:>10.4f}")
        if name != "true samples":
            panels.append(_scatter_panel(samples, centres, f"{name} ({nfe} NFE)"))
    print(f"(uniform share per mode: {1 / m.modes:.4f}; sliced W1 between two true sample sets: "
          f"{floor:.4f}; seconds include compilation)")
    grid = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), (255, 255, 255))
    x = 0
    for p in panels:
        grid.paste(p, (x, 0))
        x += p.width
    path = os.path.join(out_dir, "demo_samplers.png")
    grid.save(path)
    print(f"wrote {path}")
    return stats


# --------------------------------------------------------------------------------------------
# Part 2: a tiny CLIP learning colour-and-shape captions
# --------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (150, 50, 190), "cyan": (20, 190, 200)}
SHAPES = ("circle", "square", "triangle")
CAPTIONS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def draw_shapes(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: shape ``labels % 3`` in colour ``labels // 3`` on light grey,
    at a random position and a random size (a quarter to a half of the canvas)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = np.full((len(labels), size, size, 3), 240, np.uint8)
    palette = np.array(list(COLOURS.values()), np.uint8)
    for i, label in enumerate(labels):
        half = rng.uniform(0.125, 0.25) * size
        cx, cy = rng.uniform(half, size - half, 2)
        shape = SHAPES[label % len(SHAPES)]
        if shape == "circle":
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
        elif shape == "square":
            inside = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
        else:  # triangle pointing up: apex at the top centre, base at the bottom
            depth = (yy - (cy - half)) / (2 * half)
            inside = (depth >= 0) & (depth <= 1) & (np.abs(xx - cx) <= depth * half)
        images[i][inside] = palette[label // len(SHAPES)]
    return images


def _normalise(images: np.ndarray) -> np.ndarray:
    return ((images / 255.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)).astype(np.float32)


def clip_demo(config, out_dir: str) -> dict[str, float]:
    """Part 2. Returns the final loss and the zero-shot accuracy; writes ``demo_clip.png``."""
    c = config.clip
    cfg = get_preset(c.preset, image_size=c.image_size, patch_size=c.patch_size,
                     context_length=c.context_length)
    tokens = get_tokenizer()(CAPTIONS, context_length=c.context_length)
    caption_ids = jnp.asarray(tokens.ids)
    print(f"\n== 2. CLIP from scratch: '{c.preset}' preset, {c.image_size}x{c.image_size} images, "
          f"{len(CAPTIONS)} captions such as {CAPTIONS[0]!r} -> {tokens.ids[0][tokens.mask[0]].tolist()}")

    model = CLIP(cfg, rngs=nnx.Rngs(config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.steps // 10, c.steps),
                     weight_decay=c.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, ids, pixels):
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(ids, pixels)
            return contrastive_loss(out["text_embeds"], out["image_embeds"], out["logit_scale"])

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    @jax.jit
    def zero_shot(params, pixels):
        m = nnx.merge(graphdef, params, rest)
        text, _ = m.encode_text(caption_ids)
        sims = l2_normalize(m.encode_image(pixels)) @ l2_normalize(text).T
        return jnp.argmax(sims, axis=-1)

    np_rng = np.random.default_rng(config.seed)
    losses, start = [], time.perf_counter()
    for step in range(c.steps):
        # Every caption once per batch, so each image's only positive is its own caption.
        labels = np_rng.permutation(len(CAPTIONS))
        images = draw_shapes(np_rng, labels, c.image_size)
        params, opt_state, metrics = train_step(params, opt_state, caption_ids[labels],
                                                jnp.asarray(_normalise(images)))
        losses.append(float(metrics["loss"]))
        if step % max(1, c.steps // 8) == 0 or step == c.steps - 1:
            print(f"  step {step:4d}  loss {losses[-1]:.4f}  i2t acc "
                  f"{float(metrics['accuracy_i2t']):.2f}  scale {float(metrics['scale']):.1f}")
    train_seconds = time.perf_counter() - start

    labels = np.arange(c.eval_images) % len(CAPTIONS)
    images = draw_shapes(np.random.default_rng(config.seed + 1), labels, c.image_size)
    predicted = np.asarray(zero_shot(params, jnp.asarray(_normalise(images))))
    accuracy = float(np.mean(predicted == labels))
    colour_acc = float(np.mean(predicted // len(SHAPES) == labels // len(SHAPES)))
    shape_acc = float(np.mean(predicted % len(SHAPES) == labels % len(SHAPES)))
    print(f"trained {c.steps} steps in {train_seconds:.1f} s (with compilation); zero-shot on "
          f"{c.eval_images} fresh images: {accuracy:.1%} (colour {colour_acc:.1%}, shape "
          f"{shape_acc:.1%}; chance {1 / len(CAPTIONS):.1%})")
    path = os.path.join(out_dir, "demo_clip.png")
    _clip_figure(images[:24], labels[:24], predicted[:24], losses).save(path)
    print(f"wrote {path}")
    return {"final_loss": float(np.mean(losses[-10:])), "zero_shot_accuracy": accuracy,
            "colour_accuracy": colour_acc, "shape_accuracy": shape_acc}


def _clip_figure(images, labels, predicted, losses, cell: int = 96) -> Image.Image:
    """Loss curve on the left; fresh images with the caption CLIP picked (red when wrong)."""
    cols, rows = 6, (len(images) + 5) // 6
    width, height = 320 + cols * cell, max(240, rows * (cell + 16))
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    draw.text((10, 4), "contrastive loss per step", fill=(0, 0, 0))
    box = (30, 24, 310, 220)
    draw.rectangle(box, outline=(180, 180, 180))
    top = max(losses)
    pts = [(box[0] + (box[2] - box[0]) * i / max(1, len(losses) - 1),
            box[3] - (box[3] - box[1]) * v / top) for i, v in enumerate(losses)]
    draw.line(pts, fill=(30, 70, 220), width=1)
    draw.text((2, box[1]), f"{top:.1f}", fill=(0, 0, 0))
    draw.text((10, box[3]), "0", fill=(0, 0, 0))
    for k, (img, lab, pred) in enumerate(zip(images, labels, predicted)):
        x, y = 320 + (k % cols) * cell, (k // cols) * (cell + 16)
        fig.paste(Image.fromarray(img).resize((cell - 8, cell - 8), Image.NEAREST), (x, y))
        draw.text((x, y + cell - 8), CAPTIONS[pred][2:],
                  fill=(0, 0, 0) if pred == lab else (220, 30, 30))
    return fig


def run_demo(config, out_dir: str = "out") -> dict:
    """Both parts; returns their statistics."""
    os.makedirs(out_dir, exist_ok=True)
    print("unclip-jax demo: the diffusion samplers on a distribution with a known answer, and "
          "CLIP trained from scratch (`unclip-jax generate` draws images from captions).")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))")
    start = time.perf_counter()
    result = {"samplers": sampler_demo(config, out_dir), "clip": clip_demo(config, out_dir)}
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return result
