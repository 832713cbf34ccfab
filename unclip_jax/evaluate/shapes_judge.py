"""The exact judge of a Shapes image against its caption.

:func:`judge` parses the caption (:func:`unclip_jax.data.shapes.parse_caption`), finds the objects in
the image and compares them with what the caption asks for. :func:`judge_batch` averages over a
batch, separately for one-object and two-object captions.

Finding objects (:func:`find_objects`), for a uint8 image of any size >= 32:

1. *Colour of each pixel.* Anti-aliased edges are mixtures of a palette colour and the background,
   so every pixel ``p`` is projected onto each segment background -> palette colour ``c``:
   ``alpha = clip((p - bg) . (c - bg) / |c - bg|^2, 0, 1)``, with residual
   ``|p - bg - alpha (c - bg)|``. The pixel belongs to the colour with the smallest residual, if that
   residual is at most :data:`RESIDUAL_TOL` (RGB units) and its ``alpha`` at least
   :data:`ALPHA_MIN`; otherwise it is background (or an unknown colour, ignored). Measuring
   against the segment rather than the palette point keeps an edge pixel half blue, half background
   from being taken for cyan.
2. *Regions.* Pixels of one colour are grouped into 8-connected regions (``scipy.ndimage.label``).
   A region's area is the sum of its alphas (sub-pixel accurate). Regions smaller than
   :data:`MIN_AREA` of the canvas (a quarter of the smallest object) are specks and dropped.
3. *Geometry.* The region's width is the sum over columns of the largest alpha in each column (the
   coverage of an edge column is the fraction of it the shape spans), likewise its height; the
   bounding-box centre is the centroid of those column / row profiles. So the box is measured to a
   fraction of a pixel, which matters at 32 px where a small object is 6.4 px wide.
4. *Attributes.* Shape from the fraction of the bounding box the area fills: triangle ~1/2,
   circle ~pi/4, square ~1 (thresholds :data:`FILL_TRIANGLE_MAX`, :data:`FILL_CIRCLE_MAX`). A small
   triangle at 32 px loses its blurred corners and can fill up to ~0.71 of its measured box, so a
   second cue settles it: a triangle pointing up has its area centroid a sixth of its height below
   its box centre, circles and squares none (:data:`ASYM_TRIANGLE`). Size
   from the box side (small 20%, large 40%; threshold 30%); position from the 3 x 3 cell holding the
   box centre.

Judging a caption:

* One object ("a large red circle at the top left"): the judged object is the largest region of the
  caption's colour, or failing that the largest region of any colour (so shape, size and position
  are still judged when the colour is wrong). Parts: ``colour``, ``shape``, ``size``, ``position``,
  and ``count`` (exactly one object in the image).
* Two objects ("a red circle to the left of a blue square"): each caption object is looked up by its
  colour (the two colours differ). ``first_found`` / ``second_found``: a region of that colour exists
  and has the right shape. ``relation``: the relation holds between the two colours' regions, read
  as the dominant direction (the offset along the relation's axis has the right sign and is larger
  than the offset along the other axis; the dataset guarantees a margin). ``binding``: both objects
  found, i.e. each shape carries its own colour. ``colours_present`` / ``shapes_present``: both
  colours occur, and both shapes occur on some region; an image with both but ``binding`` false has
  its attributes swapped or mixed, the failure the paper names. ``count``: exactly two objects.
* ``correct``: every part true.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from unclip_jax.data.shapes import (
    BACKGROUND,
    COLOURS,
    SIZES,
    CaptionParseError,
    ParsedCaption,
    parse_caption,
    position_of,
)
from unclip_jax.errors import UserError

__all__ = ["Judgement", "Region", "CaptionParseError", "ImageError", "find_objects", "judge",
           "judge_batch", "parse_caption"]

ALPHA_MIN = 0.1            # pixels less covered than this count as background
RESIDUAL_TOL = 60.0        # RGB distance to the nearest background -> colour segment
MIN_AREA = 0.005           # regions smaller than this fraction of the canvas are specks
FILL_TRIANGLE_MAX = 0.64   # fill < this: triangle (ideal 0.5)
FILL_CIRCLE_MAX = 0.89     # fill < this: circle (ideal pi/4 = 0.785); else square (ideal 1)
ASYM_TRIANGLE = 0.07       # below FILL_CIRCLE_MAX, an area centroid this far (in heights) below
                           # the box centre also means triangle (ideal 1/6; circle, square 0)
SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
MIN_IMAGE_SIZE = 32

_NAMES = tuple(COLOURS)
_BG = np.asarray(BACKGROUND, np.float64)
_DIRS = np.asarray([COLOURS[c] for c in _NAMES], np.float64) - _BG        # [K, 3]


class ImageError(UserError, ValueError):
    """An image the judge cannot read (wrong shape, too small)."""


@dataclasses.dataclass(frozen=True)
class Region:
    """An object found in an image; ``cx``, ``cy``, ``side``, ``area`` are canvas fractions."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    width: float
    height: float
    area: float
    fill: float

    @property
    def side(self) -> float:
        return max(self.width, self.height)

    @property
    def position(self) -> str:
        return position_of(self.cx, self.cy)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """How an image matches its caption. Parts that do not apply to the caption's kind are None."""

    caption: str
    kind: str                       # "one" or "two"
    correct: bool
    count: bool                     # exactly as many objects as the caption names
    objects: tuple[Region, ...]     # every object found
    # One object.
    colour: bool | None = None
    shape: bool | None = None
    size: bool | None = None
    position: bool | None = None
    # Two objects.
    first_found: bool | None = None
    second_found: bool | None = None
    relation: bool | None = None
    binding: bool | None = None
    colours_present: bool | None = None
    shapes_present: bool | None = None

    @property
    def parts(self) -> dict[str, bool]:
        """The parts that apply to this caption, name -> passed."""
        names = (("colour", "shape", "size", "position", "count") if self.kind == "one" else
                 ("first_found", "second_found", "relation", "binding", "colours_present",
                  "shapes_present", "count"))
        return {n: bool(getattr(self, n)) for n in names}

    @property
    def failed(self) -> list[str]:
        return [n for n, ok in self.parts.items() if not ok]


# --------------------------------------------------------------------------------------------
# Finding objects
# --------------------------------------------------------------------------------------------

def _as_uint8_rgb(image: Any) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ImageError(f"The judge takes one RGB image [H, W, 3], got shape {x.shape}.")
    if min(x.shape[:2]) < MIN_IMAGE_SIZE:
        raise ImageError(f"Images must be at least {MIN_IMAGE_SIZE} x {MIN_IMAGE_SIZE} pixels for "
                         f"the judge to tell shapes apart, got {x.shape[0]} x {x.shape[1]}.")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):   # the decoder's output range [-1, 1]
        return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    raise ImageError(f"Images must be uint8 [0, 255] or float [-1, 1], got dtype {x.dtype}.")


def colour_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: (label [H, W] int, -1 = background / unknown, else an index into the palette
    colour names; alpha [H, W] float, how much of that colour the pixel holds)."""
    d = image.astype(np.float32).reshape(-1, 3) - _BG.astype(np.float32)       # [N, 3]
    dirs = _DIRS.astype(np.float32)
    norms = (dirs ** 2).sum(-1)                                                # [K]
    proj = d @ dirs.T                                                          # [N, K]
    alpha = np.clip(proj / norms, 0.0, 1.0)
    # |d - alpha v|^2 = |d|^2 - 2 alpha (d . v) + alpha^2 |v|^2
    sq = (d ** 2).sum(-1, keepdims=True) - 2 * alpha * proj + alpha ** 2 * norms
    resid = np.sqrt(np.maximum(sq, 0.0))
    # The nearest segment is chosen among all colours first: a faint pixel is close (in absolute
    # terms) to every segment, but closest to its own.
    label = resid.argmin(-1)
    best_resid = np.take_along_axis(resid, label[..., None], -1)[..., 0]
    best_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    ok = (best_resid <= RESIDUAL_TOL) & (best_alpha >= ALPHA_MIN)
    shape = image.shape[:2]
    return (np.where(ok, label, -1).reshape(shape),
            np.where(ok, best_alpha, 0.0).astype(np.float64).reshape(shape))


def _classify_shape(fill: float, asym: float) -> str:
    if fill >= FILL_CIRCLE_MAX:
        return "square"
    if fill < FILL_TRIANGLE_MAX or asym > ASYM_TRIANGLE:
        return "triangle"
    return "circle"


def find_objects(image: Any) -> list[Region]:
    """Every object (coloured region larger than a speck) in the image, largest first."""
    image = _as_uint8_rgb(image)
    h, w = image.shape[:2]
    label, alpha = colour_alpha(image)
    regions = []
    structure = np.ones((3, 3), bool)
    for k in np.unique(label[label >= 0]):
        name = _NAMES[k]
        mask = label == k
        comp, n = ndimage.label(mask, structure=structure)
        for sl_i, sl in enumerate(ndimage.find_objects(comp), start=1):
            a = np.where(comp[sl] == sl_i, alpha[sl], 0.0)
            area = a.sum()
            if area < MIN_AREA * h * w:
                continue
            cols, rows = a.max(axis=0), a.max(axis=1)
            # Both estimates of each extent fall short of the truth on blurred corners (the
            # profile of maxima, and the widest row / tallest column's coverage): take the larger.
            width = max(cols.sum(), a.sum(axis=1).max())
            height = max(rows.sum(), a.sum(axis=0).max())
            xs, ys = np.arange(len(cols)) + 0.5, np.arange(len(rows)) + 0.5
            box_y = (rows * ys).sum() / rows.sum()
            cx = (sl[1].start + (cols * xs).sum() / cols.sum()) / w
            cy = (sl[0].start + box_y) / h
            asym = float(((a.sum(axis=1) * ys).sum() / area - box_y) / height)
            fill = float(area / (width * height))
            side = max(width / w, height / h)
            regions.append(Region(
                colour=name, shape=_classify_shape(fill, asym),
                size="small" if side < SIZE_THRESHOLD else "large",
                cx=float(cx), cy=float(cy), width=float(width / w), height=float(height / h),
                area=float(area / (h * w)), fill=fill))
    regions.sort(key=lambda r: -r.area)
    return regions


# --------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------

def _largest(regions: Sequence[Region], colour: str | None = None) -> Region | None:
    for r in regions:   # sorted largest first
        if colour is None or r.colour == colour:
            return r
    return None


def relation_holds(a: Region, b: Region, relation: str) -> bool:
    """Whether ``a {relation} b`` holds as the dominant direction between the box centres."""
    dx, dy = b.cx - a.cx, b.cy - a.cy      # from a to b; y grows downwards
    main, perp = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                  "above": (dy, dx), "below": (-dy, dx)}[relation]
    return bool(main > 0 and main > abs(perp))


def _judge_one(caption: str, spec: ParsedCaption, regions: list[Region]) -> Judgement:
    colour, shape = spec.objects[0]
    target = _largest(regions, colour)
    colour_ok = target is not None
    if target is None:
        target = _largest(regions)
    count = len(regions) == 1
    if target is None:
        return Judgement(caption, "one", False, count, tuple(regions), colour=False, shape=False,
                         size=False, position=False)
    shape_ok = target.shape == shape
    size_ok = target.size == spec.size
    pos_ok = target.position == spec.position
    correct = colour_ok and shape_ok and size_ok and pos_ok and count
    return Judgement(caption, "one", correct, count, tuple(regions), colour=colour_ok,
                     shape=shape_ok, size=size_ok, position=pos_ok)


def _judge_two(caption: str, spec: ParsedCaption, regions: list[Region]) -> Judgement:
    (ca, sa), (cb, sb) = spec.objects
    ra, rb = _largest(regions, ca), _largest(regions, cb)
    first = ra is not None and ra.shape == sa
    second = rb is not None and rb.shape == sb
    colours_present = ra is not None and rb is not None
    found_shapes = [r.shape for r in regions]
    shapes_present = (sa in found_shapes and sb in found_shapes
                      and (sa != sb or found_shapes.count(sa) >= 2))
    relation = colours_present and relation_holds(ra, rb, spec.relation)
    count = len(regions) == 2
    binding = first and second
    correct = binding and relation and count
    return Judgement(caption, "two", correct, count, tuple(regions), first_found=first,
                     second_found=second, relation=relation, binding=binding,
                     colours_present=colours_present, shapes_present=shapes_present)


def judge(image: Any, caption: str) -> Judgement:
    """Judge one image (uint8 [H, W, 3], or float in [-1, 1]; H, W >= 32) against its caption."""
    spec = parse_caption(caption)
    regions = find_objects(image)
    if spec.kind == "one":
        return _judge_one(caption, spec, regions)
    return _judge_two(caption, spec, regions)


def _mean(values: list[bool]) -> float:
    return float(np.mean(values)) if values else math.nan


def judge_batch(images: Any, captions: Sequence[str]) -> dict[str, float]:
    """Accuracy over a batch, as a flat dict (NaN where a kind has no captions):

    ``n``, ``accuracy``; ``one/n``, ``one/accuracy``, ``one/colour``, ``one/shape``, ``one/size``,
    ``one/position``, ``one/count``; ``two/n``, ``two/accuracy``, ``two/found`` (per object),
    ``two/relation``, ``two/binding``, ``two/colours_present``, ``two/shapes_present``,
    ``two/count``, and ``two/binding_given_parts``: binding among the images where both colours and
    both shapes are present (how often present attributes are bound to the right objects).
    """
    if len(images) != len(captions):
        raise ValueError(f"judge_batch got {len(images)} images but {len(captions)} captions.")
    results = [judge(img, cap) for img, cap in zip(images, captions)]
    one = [r for r in results if r.kind == "one"]
    two = [r for r in results if r.kind == "two"]
    out: dict[str, float] = {"n": float(len(results)),
                             "accuracy": _mean([r.correct for r in results])}
    out["one/n"] = float(len(one))
    out["one/accuracy"] = _mean([r.correct for r in one])
    for part in ("colour", "shape", "size", "position", "count"):
        out[f"one/{part}"] = _mean([getattr(r, part) for r in one])
    out["two/n"] = float(len(two))
    out["two/accuracy"] = _mean([r.correct for r in two])
    out["two/found"] = _mean([f for r in two for f in (r.first_found, r.second_found)])
    for part in ("relation", "binding", "colours_present", "shapes_present", "count"):
        out[f"two/{part}"] = _mean([getattr(r, part) for r in two])
    out["two/binding_given_parts"] = _mean(
        [r.binding for r in two if r.colours_present and r.shapes_present])
    return out
