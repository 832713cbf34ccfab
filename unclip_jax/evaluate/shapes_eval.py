"""Caption accuracy of a text-to-image pipeline on the Shapes dataset, and
the paper's comparisons as one table.

    pipe = UnCLIPPipeline.from_pretrained(folder)
    captions = test_captions(500)                       # the Shapes TEST split's captions
    summary = caption_accuracy(pipe, captions, seed=0, num_images=2, batch_size=32)
    print(summary_markdown(summary))
    print(comparison_table(pipe, captions[:100]).markdown())

What is measured (:func:`caption_accuracy`): every caption gets ``num_images`` images from
``pipe.generate``; each image is judged against its caption by the exact judge
(:mod:`unclip_jax.evaluate.shapes_judge`), and the judge's accounting
(:func:`~unclip_jax.evaluate.shapes_judge.judge_batch`) gives the accuracy of one-object and of
two-object captions separately, each part of them (colour, shape, size, position; objects found,
relation, binding, ...) and the attribute binding the paper names as a limitation.

Diversity: the *layout* of an image is the set of (colour, 3 x 3 grid cell) of the objects the
judge finds in it. For each caption, its ``num_images`` samples have between 1 and
``num_images`` distinct layouts; ``diversity`` is the mean over captions of
``(distinct - 1) / (num_images - 1)``: 0 when every sample of a caption is laid out alike, 1 when
all differ (NaN with one image per caption). ``*/layouts`` is the mean number of distinct layouts.
A one-object caption fixes its cell, so a faithful model has one-object diversity 0; two-object
captions fix only the direction between the objects ("a red circle above a blue square" can sit
anywhere), so ``two/diversity`` is the number that shows whether samples vary or collapse.

Speed: ``images_per_s`` counts the images of every ``pipe.generate`` call but the first (which
includes compilation) over their wall time; when one call holds every caption, it is made a second
time (same seed) and that second call is timed. Captions are sent in
calls of ``batch_size // num_images`` prompts (the last call padded with repeats of its last
caption, whose images are dropped, so every call has one shape and compiles once). The images of
a caption therefore depend on ``seed``, ``batch_size`` and the caption's place in the list.

Optional image-set metrics, with reference images (e.g. :func:`test_set`'s ground-truth renders,
resized to the generated size): CLIP score of the images with their captions and FD-CLIP in the
pipeline's own CLIP space (when its CLIP has an image tower;
:mod:`unclip_jax.evaluate.image_metrics`), and FID with an Inception network
(:func:`unclip_jax.evaluate.inception.load_inception`).

:func:`comparison_table` runs :func:`caption_accuracy` over the comparisons of the paper on Shapes:
the diffusion prior vs the AR prior vs no prior (the decoder conditioned on z_t); a sweep of the
decoder's guidance scale; the decoder's sampler (DDPM, DDIM, DPM-Solver++) x its number of steps;
the prior's best-of-1 against best-of-2; the decoder with and without its caption tokens.

:func:`upsampler_accuracy` judges the upsampling stages alone: the test split's true images at the
decoder's size, upsampled by each stage, judged after each (what the upsamplers cost, apart from
what the prior and the decoder draw).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from unclip_jax.clip.text_encoder import CLIPTextEncoder
from unclip_jax.data import shapes
from unclip_jax.data.shapes import parse_caption
from unclip_jax.diffusion import SAMPLERS
from unclip_jax.errors import UserError
from unclip_jax.evaluate import image_metrics as im
from unclip_jax.evaluate.shapes_judge import find_objects, judge_batch
from unclip_jax.pipeline.pipeline import PipelineInfo

__all__ = ["ComparisonSetting", "Comparison", "EvalError", "caption_accuracy",
           "comparison_settings", "comparison_table", "diversity", "generate_for_captions",
           "layout", "score_images", "summary_markdown", "test_captions", "test_set",
           "upsampler_accuracy", "upsampler_markdown"]

DEFAULT_DATA_SEED = 0            # the seed of the Shapes dataset's default config
GUIDANCE_SCALES = (1.0, 3.0, 5.0, 8.0)
TABLE_SAMPLERS = ("ddpm", "ddim", "dpm++")  # the table's default: unclip_jax.diffusion.SAMPLERS
                                            # but 'unclip' (spelled here: --help imports no jax)
SAMPLER_STEPS = (10, 25, 50)
PRIORS = ("diffusion", "ar", "none")
BEST_OF = (1, 2)


class EvalError(UserError, ValueError):
    """An evaluation asked for with arguments it cannot use; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Captions and reference images
# --------------------------------------------------------------------------------------------

def test_captions(n: int, seed: int = DEFAULT_DATA_SEED, *, start: int = 0) -> list[str]:
    """The captions of examples ``start`` .. ``start + n - 1`` of the Shapes TEST split (the ones
    ``unclip_jax.data.shapes.generate(seed, 'test', n, start)`` draws, without rendering)."""
    if int(n) < 1:
        raise EvalError(f"Ask for at least one test caption, got n={n}.")
    return [shapes.sample_scene(shapes.scene_rng(seed, "test", i)).caption
            for i in range(int(start), int(start) + int(n))]


test_captions.__test__ = False   # not a pytest test, whatever imports it


def test_set(n: int, seed: int = DEFAULT_DATA_SEED, *, size: int = 128, start: int = 0
             ) -> tuple[np.ndarray, list[str]]:
    """Ground-truth renders (uint8 [n, size, size, 3]) and captions of the Shapes TEST split."""
    if int(n) < 1:
        raise EvalError(f"Ask for at least one test example, got n={n}.")
    images, scenes = shapes.generate(int(seed), "test", int(n), start=int(start), size=int(size))
    return images, [s.caption for s in scenes]


test_set.__test__ = False


# --------------------------------------------------------------------------------------------
# Layouts and diversity
# --------------------------------------------------------------------------------------------

def layout(image) -> tuple:
    """The layout of an image: sorted (colour, grid cell) of every object the judge finds."""
    return tuple(sorted((r.colour, r.position) for r in find_objects(image)))


def diversity(layouts: Sequence[Sequence[tuple]]) -> tuple[float, float]:
    """(diversity, mean distinct layouts) over captions, each given the layouts of its samples.

    diversity = mean over captions of (distinct - 1) / (samples - 1); NaN when no caption has
    two samples."""
    scores, counts = [], []
    for group in layouts:
        k = len(set(group))
        counts.append(k)
        if len(group) > 1:
            scores.append((k - 1) / (len(group) - 1))
    return (float(np.mean(scores)) if scores else math.nan,
            float(np.mean(counts)) if counts else math.nan)


# --------------------------------------------------------------------------------------------
# Generation and scoring
# --------------------------------------------------------------------------------------------

def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise EvalError("captions must be a list of Shapes captions, not one string.")
    captions = list(captions)
    if not captions:
        raise EvalError("No captions given: pass at least one Shapes caption "
                        "(e.g. shapes_eval.test_captions(500)).")
    for c in captions:
        parse_caption(c)    # a CaptionParseError (a UserError) names the bad one
    return captions


def _batch_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1)[0])


def generate_for_captions(pipe, captions: Sequence[str], *, seed: int = 0, num_images: int = 1,
                          batch_size: int = 16, progress: Callable[[int], Any] | None = None,
                          **generate_kwargs) -> tuple[np.ndarray, float]:
    """Images for every caption, uint8 [len(captions) * num_images, H, W, 3] (caption-major),
    and the speed in images per second (see the module docstring). ``generate_kwargs`` go to
    ``pipe.generate`` (``prior``, ``prior_settings``, ``decoder_settings``,
    ``super_res_settings``, ``upsample``). ``progress(k)`` is called after each call with the
    number of images it kept."""
    captions = _check_captions(captions)
    if int(num_images) < 1:
        raise EvalError(f"num_images must be at least 1, got {num_images}.")
    if int(batch_size) < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}.")
    num_images = int(num_images)
    per_call = min(max(1, int(batch_size) // num_images), len(captions))
    chunks, times = [], []
    for start in range(0, len(captions), per_call):
        chunk = captions[start:start + per_call]
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))
        t0 = time.perf_counter()
        images = np.asarray(pipe.generate(padded, num_images=num_images,
                                          seed=_batch_seed(seed, start), **generate_kwargs))
        times.append(time.perf_counter() - t0)
        kept = images[:len(chunk) * num_images]
        if kept.dtype != np.uint8 or kept.ndim != 4 or len(kept) != len(chunk) * num_images:
            raise EvalError(f"pipe.generate returned {images.dtype} {images.shape} for "
                            f"{len(padded)} prompts x {num_images} images; expected uint8 "
                            f"[{len(padded) * num_images}, H, W, 3].")
        chunks.append(kept)
        if progress is not None:
            progress(len(kept))
    if len(times) == 1:   # the one call compiled: time it again, warm
        t0 = time.perf_counter()
        np.asarray(pipe.generate(padded, num_images=num_images, seed=_batch_seed(seed, 0),
                                 **generate_kwargs))
        times.append(time.perf_counter() - t0)
    # Every call makes per_call * num_images images (padding included): that is the rate.
    counted = times[1:]
    speed = len(counted) * per_call * num_images / max(sum(counted), 1e-9)
    return np.concatenate(chunks), float(speed)


def score_images(images, captions: Sequence[str], num_images: int = 1) -> dict[str, float]:
    """Judge caption-major images (``num_images`` per caption): :func:`judge_batch`'s summary
    plus ``diversity`` / ``layouts`` overall and per kind (``one/``, ``two/``)."""
    captions = _check_captions(captions)
    images = np.asarray(images)
    if len(images) != len(captions) * int(num_images):
        raise EvalError(f"{len(images)} images for {len(captions)} captions x {num_images} "
                        "images each; pass exactly that many, caption-major.")
    k = int(num_images)
    rows = [c for c in captions for _ in range(k)]
    out = judge_batch(images, rows)
    lays = [layout(im) for im in images]
    groups = {"one": [], "two": []}
    for i, c in enumerate(captions):
        groups[parse_caption(c).kind].append(lays[i * k:(i + 1) * k])
    out["diversity"], out["layouts"] = diversity(groups["one"] + groups["two"])
    for kind, g in groups.items():
        out[f"{kind}/diversity"], out[f"{kind}/layouts"] = diversity(g)
    out["num_captions"] = float(len(captions))
    out["num_images"] = float(k)
    return out


def _resize_like(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, h, w, 3] -> [N, *size, 3]: a box filter when shrinking (the area downsample
    the Shapes renders use), bicubic when enlarging; unchanged when the size already matches."""
    if images.ndim != 4 or tuple(images.shape[1:3]) == tuple(size):
        return images
    h, w = size
    method = Image.BOX if images.shape[1] >= h else Image.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), method)) for im in images])


def caption_accuracy(pipe, captions: Sequence[str], *, seed: int = 0, num_images: int = 1,
                     batch_size: int = 16, reference_images=None, clip_metrics: bool = False,
                     inception=None, progress: Callable[[int], Any] | None = None,
                     **generate_kwargs) -> dict[str, float]:
    """Generate ``num_images`` images per caption with ``pipe`` and judge them.

    Returns a flat dict of floats: :func:`score_images`' keys (``accuracy``, ``one/accuracy``,
    ``two/accuracy``, every part, ``two/binding``, ``two/binding_given_parts``, ``diversity``,
    ...), ``images_per_s`` and ``seconds`` (the whole generation). With ``clip_metrics``:
    ``clip_score`` (the pipeline's CLIP, which must have an image tower) and, given
    ``reference_images`` (uint8 [M, h, w, 3], any size), ``fd_clip``; with ``inception`` (a
    loaded Inception-v3) and reference images, ``fid``. Reference images of another size are
    resized to the generated images' (box filter down, bicubic up), so both sets are compared at
    one resolution. ``generate_kwargs`` go to
    ``pipe.generate`` (e.g. ``prior='ar'``, ``decoder_settings={'steps': 25}``)."""
    captions = _check_captions(captions)
    if (clip_metrics or inception is not None) and reference_images is not None:
        if len(captions) * int(num_images) < 2 or len(reference_images) < 2:
            raise EvalError("Frechet distances need at least 2 generated and 2 reference "
                            "images; evaluate more captions.")
    if clip_metrics:
        if getattr(pipe, "clip", None) is None or isinstance(pipe.clip, CLIPTextEncoder):
            raise EvalError("CLIP score and FD-CLIP need the pipeline's CLIP image tower, but this "
                            "pipeline ships only CLIP's text encoder; leave clip_metrics "
                            "(--clip-metrics) off.")
    t0 = time.perf_counter()
    images, speed = generate_for_captions(pipe, captions, seed=seed, num_images=num_images,
                                          batch_size=batch_size, progress=progress,
                                          **generate_kwargs)
    seconds = time.perf_counter() - t0
    out = score_images(images, captions, num_images)
    out["images_per_s"] = speed
    out["seconds"] = float(seconds)
    if clip_metrics or inception is not None:
        if reference_images is not None:
            reference_images = _resize_like(np.asarray(reference_images), images.shape[1:3])
        if clip_metrics:
            rows = [c for c in captions for _ in range(int(num_images))]
            out["clip_score"] = im.clip_score(images, rows, pipe.clip, pipe.tokenizer)
            if reference_images is not None:
                out["fd_clip"] = im.fd_clip(np.asarray(reference_images), images, pipe.clip)
        if inception is not None and reference_images is not None:
            out["fid"] = im.fid(np.asarray(reference_images), images, inception)
    return out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100.0 * x:.1f}%"


def _num(x: float, digits: int = 2) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


_SUMMARY_ROWS = (
    ("all captions: accuracy", "accuracy", _pct),
    ("one object: captions x images", "one/n", lambda x: _num(x, 0)),
    ("one object: accuracy", "one/accuracy", _pct),
    ("one object: colour", "one/colour", _pct),
    ("one object: shape", "one/shape", _pct),
    ("one object: size", "one/size", _pct),
    ("one object: position", "one/position", _pct),
    ("one object: exactly one object", "one/count", _pct),
    ("two objects: captions x images", "two/n", lambda x: _num(x, 0)),
    ("two objects: accuracy", "two/accuracy", _pct),
    ("two objects: object found (colour + shape)", "two/found", _pct),
    ("two objects: relation", "two/relation", _pct),
    ("two objects: binding", "two/binding", _pct),
    ("two objects: binding when both colours and shapes are present",
     "two/binding_given_parts", _pct),
    ("two objects: both colours present", "two/colours_present", _pct),
    ("two objects: both shapes present", "two/shapes_present", _pct),
    ("two objects: exactly two objects", "two/count", _pct),
    ("diversity, two objects (0 = samples alike, 1 = all differ)", "two/diversity", _num),
    ("distinct layouts per caption, two objects", "two/layouts", _num),
    ("diversity, one object (a faithful model: 0)", "one/diversity", _num),
    ("CLIP score", "clip_score", _num),
    ("FD-CLIP vs test images", "fd_clip", _num),
    ("FID vs test images", "fid", _num),
    ("images / s (after compilation)", "images_per_s", _num),
    ("seconds (all generation)", "seconds", lambda x: _num(x, 1)),
)


def summary_markdown(summary: dict[str, float]) -> str:
    """A two-column markdown table of :func:`caption_accuracy`'s summary."""
    lines = ["| metric | value |", "|---|---|"]
    for label, key, fmt in _SUMMARY_ROWS:
        if key in summary:
            lines.append(f"| {label} | {fmt(summary[key])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The comparison table
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ComparisonSetting:
    """One row: its group ("prior", "decoder guidance", "decoder sampler"), its name, and the
    keyword arguments of ``pipe.generate`` it runs with."""

    group: str
    name: str
    kwargs: dict


@dataclasses.dataclass
class Comparison:
    """The rows of :func:`comparison_table`: (setting, caption_accuracy summary)."""

    rows: list

    COLUMNS = (("one-object acc", "one/accuracy", _pct), ("two-object acc", "two/accuracy", _pct),
               ("binding", "two/binding", _pct), ("diversity (2 obj)", "two/diversity", _num),
               ("images/s", "images_per_s", lambda x: _num(x, 2)))

    def markdown(self) -> str:
        head = "| comparison | setting | " + " | ".join(c for c, _, _ in self.COLUMNS) + " |"
        lines = [head, "|---|---|" + "---:|" * len(self.COLUMNS)]
        for setting, summary in self.rows:
            cells = [fmt(summary.get(key, math.nan)) for _, key, fmt in self.COLUMNS]
            lines.append(f"| {setting.group} | {setting.name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    __str__ = markdown


def _base_prior(pipe) -> str:
    if getattr(pipe, "prior", None) is not None:
        return "diffusion"
    if getattr(pipe, "ar_prior", None) is not None:
        return "ar"
    return "none"


def comparison_settings(pipe, *, priors: Sequence[str] = PRIORS,
                        guidance_scales: Sequence[float] = GUIDANCE_SCALES,
                        samplers: Sequence[str] = TABLE_SAMPLERS,
                        steps: Sequence[int] = SAMPLER_STEPS,
                        best_of: Sequence[int] = BEST_OF,
                        base: dict | None = None) -> list[ComparisonSetting]:
    """The paper's comparisons as rows, for the priors ``pipe`` has:

    * prior: each of ``priors`` ('none' = the decoder conditioned on z_t), the decoder at its
      defaults;
    * prior best-of: the base prior drawing each of ``best_of`` z_i candidates and keeping the
      one closest to z_t (the paper's 2 against 1);
    * decoder caption tokens: with and without them (the decoder's ``caption_tokens`` setting;
      z_i and z_t condition both rows), when the decoder has caption tokens (CLIP's text states
      or its own text Transformer's);
    * decoder guidance: each scale, with the pipeline's first prior (diffusion, else AR);
    * decoder sampler: each sampler x number of steps, same prior.

    ``base``: generate keyword arguments every row starts from (e.g. ``{'upsample': 0}``); a
    row's ``decoder_settings`` are merged over ``base['decoder_settings']``; ``base['prior']``
    (default: diffusion if the pipeline has it, else AR) is the prior of the guidance and
    sampler rows, and ``base['prior_settings']`` apply to rows with that prior only."""
    base = dict(base or {})
    base_dec = dict(base.pop("decoder_settings", None) or {})
    have = {"diffusion": getattr(pipe, "prior", None) is not None,
            "ar": getattr(pipe, "ar_prior", None) is not None, "none": True}
    unknown = [p for p in priors if p not in PRIORS]
    if unknown:
        raise EvalError(f"Unknown prior(s) {unknown}; choose from {PRIORS}.")
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        raise EvalError(f"Unknown sampler(s) {bad}; choose from {SAMPLERS}.")
    prior = base.pop("prior", None) or _base_prior(pipe)
    rows = []

    def row(group, name, p, prior_settings=None, **dec):
        kw = dict(base, prior=p, decoder_settings={**base_dec, **dec})
        if p != prior:              # base prior settings belong to the base prior only
            kw.pop("prior_settings", None)
        if prior_settings:
            kw["prior_settings"] = {**(kw.get("prior_settings") or {}), **prior_settings}
        rows.append(ComparisonSetting(group, name, kw))

    for p in priors:
        if have[p]:
            row("prior", {"none": "none (decoder on z_t)"}.get(p, p), p)
    for k in best_of:
        if int(k) < 1:
            raise EvalError(f"best_of must be at least 1, got {k}.")
        row("prior best-of", f"{prior} prior, best of {int(k)}", prior,
            prior_settings={"best_of": int(k)})
    decoder = getattr(pipe, "decoder", None)
    if getattr(getattr(decoder, "config", None), "text_encoder", "none") != "none":
        row("decoder caption tokens", "with caption tokens", prior, caption_tokens=True)
        row("decoder caption tokens", "without caption tokens (z_i and z_t only)", prior,
            caption_tokens=False)
    for g in guidance_scales:
        row("decoder guidance", f"{g:g} ({prior} prior)", prior, guidance_scale=float(g))
    for s in samplers:
        for n in steps:
            row("decoder sampler", f"{s} {int(n)} steps", prior, sampler=s, steps=int(n))
    return rows


def comparison_table(pipe, captions: Sequence[str], *, seed: int = 0, num_images: int = 2,
                     batch_size: int = 16, settings: Sequence[ComparisonSetting] | None = None,
                     progress: Callable[[int], Any] | None = None, **settings_kwargs
                     ) -> Comparison:
    """:func:`caption_accuracy` for every row of ``settings`` (default
    :func:`comparison_settings` ``(pipe, **settings_kwargs)``), on the same captions and seed.
    ``Comparison.markdown()`` is the table: one-object accuracy, two-object accuracy, binding,
    two-object diversity, images/s."""
    captions = _check_captions(captions)
    if settings is None:
        settings = comparison_settings(pipe, **settings_kwargs)
    elif settings_kwargs:
        raise EvalError("Pass either settings or the arguments of comparison_settings, not both.")
    rows = []
    for s in settings:
        summary = caption_accuracy(pipe, captions, seed=seed, num_images=num_images,
                                   batch_size=batch_size, progress=progress, **s.kwargs)
        rows.append((s, summary))
    return Comparison(rows)


# --------------------------------------------------------------------------------------------
# The upsamplers alone
# --------------------------------------------------------------------------------------------

def upsampler_accuracy(pipe, n: int, *, seed: int = 0, data_seed: int = DEFAULT_DATA_SEED,
                       batch_size: int = 16, upsample: int | None = None,
                       progress: Callable[[int], Any] | None = None) -> list[tuple[str, dict]]:
    """What the upsampling stages cost, apart from what the prior and the decoder draw.

    The first ``n`` TEST examples, rendered exactly and box-downsampled to the decoder's size,
    are judged as they are (the best a decoder could draw at that size), then upsampled by each
    stage in turn (the pipeline's own settings: its start step, sampler and steps; seed
    ``seed``), and judged again after each. Rows: ``(label, score_images summary)``, the first
    the true images at the decoder's size. ``upsample`` stops after that many stages (default:
    all the pipeline has)."""
    info = PipelineInfo.of(pipe)
    stages = info.upsample_stages if upsample is None else info.upsample_stages[:int(upsample)]
    if upsample is not None and int(upsample) > len(info.upsample_stages):
        raise EvalError(f"upsample={upsample}, but this pipeline has "
                        f"{len(info.upsample_stages)} upsampling stage(s) with their models.")
    truth, captions = test_set(n, data_seed)
    low = _resize_like(truth, (info.decoder_size, info.decoder_size))
    rows = [(f"true images at {info.decoder_size} px (box-downsampled)",
             score_images(low, captions))]
    x = low.astype(np.float32) / 127.5 - 1.0
    batch_size = max(1, int(batch_size))
    for k, index in enumerate(stages):
        outs = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            pad = batch_size - len(chunk)   # one shape per call: compiled once
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            rng = jax.random.fold_in(jax.random.key(seed), k * 1_000_003 + start)
            out = np.asarray(pipe.upsample(chunk, rng, index=index))[:batch_size - pad]
            outs.append(out)
            if progress is not None:
                progress(batch_size - pad)
        x = np.concatenate(outs)
        images = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        rows.append((f"after upsampling stage {k + 1} ({images.shape[1]} px)",
                     score_images(images, captions)))
    rows.append((f"true images at {truth.shape[1]} px", score_images(truth, captions)))
    return rows


def upsampler_markdown(rows: list[tuple[str, dict]]) -> str:
    """The table of :func:`upsampler_accuracy`: one-object accuracy and its shape, size and
    position parts; two-object accuracy and relation."""
    cols = (("one-object acc", "one/accuracy"), ("shape", "one/shape"), ("size", "one/size"),
            ("position", "one/position"), ("two-object acc", "two/accuracy"),
            ("relation", "two/relation"))
    lines = ["| images | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, s in rows:
        lines.append(f"| {label} | " + " | ".join(_pct(s.get(k, math.nan)) for _, k in cols)
                     + " |")
    return "\n".join(lines)
