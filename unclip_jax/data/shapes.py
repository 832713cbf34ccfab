"""The Shapes dataset: procedural images of coloured shapes with exact captions.

Every scene is drawn on a 128 x 128 RGB canvas with background (240, 240, 240):

* colours (RGB): red (220, 30, 30), green (30, 160, 50), blue (30, 70, 220), yellow (235, 200, 20),
  purple (150, 50, 190), cyan (20, 190, 200);
* shapes: circle, square (axis-aligned), triangle (pointing up: apex at the top centre of the
  bounding box, base along its bottom edge); flat fill, no outline;
* sizes: small (bounding-box side 20% of the canvas) and large (40%).

One-object scenes put the object in a cell of a 3 x 3 grid: the centre of its bounding box is the
cell centre (1/6, 1/2 or 5/6 of the width and height) plus a uniform jitter of up to 4% of the
canvas per axis. A large object in an edge cell would then stick out of the canvas, so every centre
is finally clamped to keep the bounding box one percent of the canvas inside the edges (the centre
stays well inside its cell). Caption: "a {size} {colour} {shape} at the {position}", or
"a {size} {colour} {shape} in the center".

Two-object scenes hold two small objects of different colours (shapes may repeat). Their centres
are apart by at least 25% of the canvas along the axis of the relation ("to the left of",
"to the right of", "above", "below"), and that axis dominates: the offset along the other axis is
at least 8% of the canvas smaller. The boxes therefore never overlap (they are at least 5% of the
canvas apart). Caption: "a {colour} {shape} {relation} a {colour} {shape}", the first object being
the one the relation describes ("a red circle above a blue square": the red circle is higher).

Half the scenes have one object, half two (each draw is a fair coin).

Determinism: example ``i`` of a split depends only on (seed, split, i); its random numbers come from
``numpy.random.default_rng(SeedSequence([seed, crc32(split), i]))``, so any subset can be made in any
order, on any host, and is identical.

Rendering (:func:`render`): each pixel of the 128 x 128 canvas is split into 4 x 4 sub-pixels, each
sub-pixel centre is tested against the exact shape, and the pixel takes
``background + coverage * (colour - background)``, rounded. So edges are anti-aliased (area
sampling) while every pixel fully inside a shape is exactly its palette colour. Smaller sizes (64,
32, any divisor of 128) are the block mean of the 128 render, rounded: an area downsample, as the
lower cascade stages use. Other sizes are rendered directly with the same supersampling.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import zlib
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from unclip_jax.errors import UserError

CANVAS = 128
BACKGROUND = (240, 240, 240)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (150, 50, 190),
    "cyan": (20, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.2, "large": 0.4}   # bounding-box side, canvas fraction
GRID_CENTRES = (1 / 6, 1 / 2, 5 / 6)
JITTER = 0.04
EDGE_MARGIN = 0.01            # bounding boxes stay this far inside the canvas
# POSITIONS[row][col], row 0 = top, col 0 = left.
POSITIONS = (("top left", "top", "top right"),
             ("left", "center", "right"),
             ("bottom left", "bottom", "bottom right"))
POSITION_NAMES = tuple(name for row in POSITIONS for name in row)
RELATIONS = ("to the left of", "to the right of", "above", "below")
MIN_SEPARATION = 0.25         # along the relation's axis, between the two centres
DOMINANCE_MARGIN = 0.08       # |offset along the other axis| <= |offset along the axis| - this
SUPERSAMPLE = 4
KINDS = ("one", "two")

__all__ = [
    "BACKGROUND", "CANVAS", "COLOURS", "KINDS", "POSITIONS", "POSITION_NAMES", "RELATIONS", "SHAPES",
    "SIZES", "CaptionParseError", "Example", "Obj", "ParsedCaption", "Scene", "all_captions",
    "HARD_NEGATIVES", "hard_negative",
    "caption_for", "example", "generate", "iterate", "one_object_captions", "parse_caption",
    "position_of", "render", "sample_scene", "scene_rng", "two_object_captions",
]


class CaptionParseError(UserError, ValueError):
    """A caption that is not in the Shapes grammar."""


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object. ``cx``, ``cy``: centre of its bounding box and ``side``: the box's side, all as
    fractions of the canvas (x to the right, y downwards)."""

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene: its objects (one or two), its caption, and the relation (``None`` for one object).

    For two objects, ``objects[0]`` is the caption's first object: ``objects[0] {relation}
    objects[1]`` holds.
    """

    objects: tuple[Obj, ...]
    caption: str
    relation: str | None = None

    @property
    def kind(self) -> str:
        return "one" if len(self.objects) == 1 else "two"

    @property
    def position(self) -> str | None:
        """The grid cell of a one-object scene ("top left", ..., "center"); ``None`` for two."""
        return position_of(self.objects[0].cx, self.objects[0].cy) if len(self.objects) == 1 else None


class Example(NamedTuple):
    image: np.ndarray   # uint8 [size, size, 3]
    scene: Scene


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def position_of(cx: float, cy: float) -> str:
    """Name of the 3 x 3 grid cell holding the point (cx, cy) (canvas fractions)."""
    col = min(max(int(np.floor(cx * 3)), 0), 2)
    row = min(max(int(np.floor(cy * 3)), 0), 2)
    return POSITIONS[row][col]


def _one_caption(size: str, colour: str, shape: str, position: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {size} {colour} {shape} {where}"


def _two_caption(a: tuple[str, str], relation: str, b: tuple[str, str]) -> str:
    return f"a {a[0]} {a[1]} {relation} a {b[0]} {b[1]}"


def caption_for(objects: Sequence[Obj], relation: str | None = None) -> str:
    """The caption of a scene with these objects (and relation, for two objects)."""
    if len(objects) == 1:
        o = objects[0]
        return _one_caption(o.size, o.colour, o.shape, position_of(o.cx, o.cy))
    if len(objects) == 2 and relation in RELATIONS:
        a, b = objects
        return _two_caption((a.colour, a.shape), relation, (b.colour, b.shape))
    raise ValueError(f"A Shapes scene has one object, or two and a relation in {RELATIONS}; got "
                     f"{len(objects)} objects and relation {relation!r}.")


_TURN = {"to the left of": "above", "above": "to the right of", "to the right of": "below",
         "below": "to the left of"}   # the relation turned a quarter


HARD_NEGATIVES = 3   # kinds of hard_negative, each caption gets one of each


def hard_negative(caption: str, variant: int = 0) -> str | None:
    """A caption of another scene that differs from a two-object ``caption`` only in how its
    parts are put together: CLIP's hard negative for it (``input.negative_captions='shapes'``
    gives each caption all ``HARD_NEGATIVES`` of them). In-batch negatives almost never hold
    these, so without them a contrastive CLIP learns which objects a picture holds but hardly
    which is where. ``variant`` picks, modulo ``HARD_NEGATIVES``:

      0  the objects exchanged:  "a blue square above a red circle"
      1  the relation turned a quarter: "a red circle to the right of a blue square"
      2  the shapes exchanged:   "a red square above a blue circle" (if both shapes are the
         same, the relation turned the other way)

    for "a red circle above a blue square". None for a one-object caption (or text outside the
    grammar)."""
    try:
        p = parse_caption(caption)
    except CaptionParseError:
        return None
    if p.kind != "two":
        return None
    (ca, sa), (cb, sb) = p.objects
    rel = p.relation
    kind = int(variant) % HARD_NEGATIVES
    if kind == 0:
        return _two_caption((cb, sb), rel, (ca, sa))
    if kind == 2 and sa != sb:
        return _two_caption((ca, sb), rel, (cb, sa))
    turned = _TURN[rel] if kind == 1 else _TURN[_TURN[_TURN[rel]]]
    return _two_caption((ca, sa), turned, (cb, sb))


def one_object_captions() -> list[str]:
    """Every one-object caption (2 sizes x 6 colours x 3 shapes x 9 positions = 324)."""
    return [_one_caption(size, colour, shape, pos)
            for size, colour, shape, pos in itertools.product(SIZES, COLOURS, SHAPES, POSITION_NAMES)]


def two_object_captions() -> list[str]:
    """Every two-object caption (6 x 3 first objects x 5 x 3 second objects x 4 relations = 1080)."""
    out = []
    for ca, sa, rel, cb, sb in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES):
        if ca != cb:
            out.append(_two_caption((ca, sa), rel, (cb, sb)))
    return out


def all_captions() -> list[str]:
    """Every caption the dataset can produce (1404): one-object ones first."""
    return one_object_captions() + two_object_captions()


class ParsedCaption(NamedTuple):
    """What a caption asks for. ``objects``: (colour, shape) pairs in caption order; ``size`` and
    ``position``: for one-object captions (else ``None``); ``relation``: for two-object ones."""

    objects: tuple[tuple[str, str], ...]
    size: str | None = None
    position: str | None = None
    relation: str | None = None

    @property
    def kind(self) -> str:
        return "one" if len(self.objects) == 1 else "two"


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_ONE_RE = re.compile(rf"a (?P<size>small|large) (?P<colour>{_C}) (?P<shape>{_S}) "
                     rf"(?:at the (?P<pos>{'|'.join(p for p in POSITION_NAMES if p != 'center')})"
                     rf"|in the (?P<center>center))")
_TWO_RE = re.compile(rf"a (?P<ca>{_C}) (?P<sa>{_S}) (?P<rel>{'|'.join(RELATIONS)}) "
                     rf"a (?P<cb>{_C}) (?P<sb>{_S})")


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a Shapes caption (case and surrounding spaces/full stop are ignored).

    Raises :class:`CaptionParseError` for text outside the grammar.
    """
    text = " ".join(str(caption).lower().strip().rstrip(".").split())
    m = _ONE_RE.fullmatch(text)
    if m:
        pos = m.group("pos") or "center"
        return ParsedCaption(((m.group("colour"), m.group("shape")),), size=m.group("size"),
                             position=pos)
    m = _TWO_RE.fullmatch(text)
    if m:
        return ParsedCaption(((m.group("ca"), m.group("sa")), (m.group("cb"), m.group("sb"))),
                             relation=m.group("rel"))
    raise CaptionParseError(
        f"{caption!r} is not a Shapes caption. Expected 'a {{small|large}} {{colour}} {{shape}} at "
        "the {position}' (or 'in the center'), or 'a {colour} {shape} {relation} a {colour} "
        f"{{shape}}', with colours {list(COLOURS)}, shapes {list(SHAPES)}, relations "
        f"{list(RELATIONS)}; see unclip_jax.data.shapes.all_captions().")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def _clamp_centre(c: float, side: float) -> float:
    lo = side / 2 + EDGE_MARGIN
    return float(min(max(c, lo), 1.0 - lo))


def _sample_one(rng: np.random.Generator) -> Scene:
    size = str(rng.choice(list(SIZES)))
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    row, col = int(rng.integers(3)), int(rng.integers(3))
    side = SIZES[size]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2)
    obj = Obj(colour, shape, size, _clamp_centre(GRID_CENTRES[col] + jx, side),
              _clamp_centre(GRID_CENTRES[row] + jy, side), side)
    return Scene((obj,), caption_for((obj,)), None)


def _sample_two(rng: np.random.Generator) -> Scene:
    side = SIZES["small"]
    ca, cb = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    sa, sb = (str(s) for s in rng.choice(SHAPES, size=2))
    relation = str(rng.choice(RELATIONS))
    lo, hi = side / 2 + EDGE_MARGIN, 1 - side / 2 - EDGE_MARGIN
    # Direction from object a to object b, in canvas coordinates (y down): b is to the right of a
    # when a is "to the left of" b, etc.
    axis, sign = {"to the left of": (0, 1), "to the right of": (0, -1),
                  "above": (1, 1), "below": (1, -1)}[relation]
    for _ in range(1000):
        a = rng.uniform(lo, hi, size=2)
        b = rng.uniform(lo, hi, size=2)
        main = sign * (b[axis] - a[axis])
        perp = abs(b[1 - axis] - a[1 - axis])
        if main >= MIN_SEPARATION and perp <= main - DOMINANCE_MARGIN:
            break
    else:  # pragma: no cover - acceptance is about 20%, so 1000 failures never happen
        raise RuntimeError("could not place two objects")
    oa = Obj(ca, sa, "small", float(a[0]), float(a[1]), side)
    ob = Obj(cb, sb, "small", float(b[0]), float(b[1]), side)
    return Scene((oa, ob), caption_for((oa, ob), relation), relation)


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """Draw a scene. ``kind``: "one", "two", or ``None`` for a fair coin between them."""
    if kind is None:
        kind = "one" if rng.random() < 0.5 else "two"
    if kind == "one":
        return _sample_one(rng)
    if kind == "two":
        return _sample_two(rng)
    raise ValueError(f"kind must be 'one', 'two' or None, got {kind!r}.")


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example ``index`` of ``split``: a function of (seed, split, index) only."""
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}.")
    split_key = zlib.crc32(str(split).encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(seed), split_key, int(index)]))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    h = side / 2
    if shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if shape == "triangle":  # apex (cx, cy - h), base y = cy + h from cx - h to cx + h
        depth = y - (cy - h)
        return (depth >= 0) & (depth <= side) & (np.abs(x - cx) <= depth / 2)
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _render_direct(scene: Scene, size: int) -> np.ndarray:
    ss = SUPERSAMPLE
    image = np.empty((size, size, 3), np.float64)
    image[:] = BACKGROUND
    for obj in scene.objects:
        h = obj.side / 2
        # Pixel rows/cols the bounding box touches (one extra each side for safety).
        x0 = max(int(np.floor((obj.cx - h) * size)) - 1, 0)
        x1 = min(int(np.ceil((obj.cx + h) * size)) + 1, size)
        y0 = max(int(np.floor((obj.cy - h) * size)) - 1, 0)
        y1 = min(int(np.ceil((obj.cy + h) * size)) + 1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / (size * ss)
        ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / (size * ss)
        inside = _inside(obj.shape, xs[None, :], ys[:, None], obj.cx, obj.cy, obj.side)
        cover = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]
        patch = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = patch + cover * (np.asarray(obj.rgb, np.float64) - patch)
    return np.round(image).astype(np.uint8)


def area_downsample(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, H, 3] -> uint8 [size, size, 3] by block means (``H`` a multiple of ``size``)."""
    h = image.shape[0]
    if h % size:
        raise ValueError(f"area_downsample needs the size ({size}) to divide {h}.")
    k = h // size
    blocks = image.astype(np.float64).reshape(size, k, size, k, image.shape[-1]).mean(axis=(1, 3))
    return np.round(blocks).astype(np.uint8)


def render(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """The scene as uint8 [size, size, 3].

    ``size`` 128 is the canvas; a divisor of 128 (64, 32, ...) is the area downsample of the 128
    render; any other size is rendered directly with the same 4 x 4 supersampling.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    full = _render_direct(scene, CANVAS)
    if size == CANVAS:
        return full
    if CANVAS % size == 0:
        return area_downsample(full, int(size))
    return _render_direct(scene, int(size))


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------

def example(seed: int, split: str, index: int, size: int = CANVAS, kind: str | None = None) -> Example:
    """Example ``index`` of ``split``: (image uint8 [size, size, 3], scene)."""
    scene = sample_scene(scene_rng(seed, split, index), kind)
    return Example(render(scene, size), scene)


def iterate(seed: int, split: str, n: int, start: int = 0, size: int = CANVAS,
            kind: str | None = None) -> Iterator[Example]:
    """Examples ``start`` .. ``start + n - 1`` of ``split``, one at a time."""
    for i in range(start, start + n):
        yield example(seed, split, i, size, kind)


def generate(seed: int, split: str, n: int, start: int = 0, size: int = CANVAS,
             kind: str | None = None) -> tuple[np.ndarray, list[Scene]]:
    """``n`` examples of ``split`` from ``start``: (images uint8 [n, size, size, 3], scenes)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    scenes = []
    for j, ex in enumerate(iterate(seed, split, n, start, size, kind)):
        images[j] = ex.image
        scenes.append(ex.scene)
    return images, scenes
