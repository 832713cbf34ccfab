"""How much of a Shapes caption a CLIP's image embedding carries: retrieval of the right caption.

The decoder draws from z_i and the prior predicts z_i, so neither can draw what z_i does not tell
apart. This measures it directly. For the first ``n`` examples of the Shapes TEST split (rendered
as the dataset renders them, 128 px; the CLIP's own preprocessing resizes them), each image
embedding is compared by cosine with the text embeddings of every *distinct* caption among those
examples, and the best one is retrieved. It is right when it describes the same scene as the
image's own caption: the same caption, or its mirror image ("a red circle to the left of a blue
square" and "a blue square to the right of a red circle"; likewise "above" and "below"), which
:func:`scene_class` maps to one class.

Reported (:func:`retrieval_scores`), separately for one-object and two-object images:
``one`` / ``two``            top-1 accuracy;
``two/same_objects``         two-object images whose retrieved caption names the same two
                             (colour, shape) objects, right or wrong relation: what z_i knows of
                             the objects without their arrangement;
``two/swapped``              two-object images that retrieved their own caption with the two
                             objects' places exchanged (the binding/relation confusion);
``candidates``               how many distinct captions competed.

Numbers depend on ``n`` (more examples, more candidates); the project quotes ``n = 2000`` (the
whole test split of the default dataset), as ``unclip-jax clip-retrieval`` does by default.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from unclip_jax.data.shapes import parse_caption
from unclip_jax.errors import UserError
from unclip_jax.evaluate import image_metrics as im
from unclip_jax.evaluate import shapes_eval as se

__all__ = ["RetrievalError", "scene_class", "retrieval_scores", "shapes_retrieval",
           "DEFAULT_EXAMPLES"]

DEFAULT_EXAMPLES = 2000
_MIRROR = {"to the right of": "to the left of", "below": "above"}


class RetrievalError(UserError, ValueError):
    """Retrieval asked for with inputs it cannot use; the message says what to change."""


def scene_class(caption: str) -> tuple:
    """The scene a Shapes caption describes, equal for a caption and its mirror image.

    One object: ('one', (colour, shape), size, position). Two objects: ('two', first, relation,
    second) with the relation 'to the left of' or 'above' (the mirror relations swap the objects).
    Raises :class:`unclip_jax.data.shapes.CaptionParseError` for text outside the grammar."""
    p = parse_caption(caption)
    if p.kind == "one":
        return ("one", p.objects[0], p.size, p.position)
    a, b = p.objects
    rel = p.relation
    if rel in _MIRROR:
        a, b, rel = b, a, _MIRROR[rel]
    return ("two", a, rel, b)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_scores(image_embeds, captions: Sequence[str], text_embeds,
                     candidates: Sequence[str]) -> dict[str, float]:
    """Scores of retrieving, for each image (embedding ``image_embeds[i]``, true caption
    ``captions[i]``), the candidate caption whose text embedding has the highest cosine with it.
    Ties go to the first candidate. Keys: see the module docstring."""
    image_embeds, text_embeds = np.asarray(image_embeds), np.asarray(text_embeds)
    captions, candidates = list(captions), list(candidates)
    if len(image_embeds) != len(captions) or not captions:
        raise RetrievalError(f"Need one caption per image embedding and at least one image; got "
                             f"{len(image_embeds)} embeddings and {len(captions)} captions.")
    if len(text_embeds) != len(candidates) or not candidates:
        raise RetrievalError(f"Need one text embedding per candidate caption; got "
                             f"{len(text_embeds)} embeddings and {len(candidates)} candidates.")
    best = np.argmax(_unit(image_embeds) @ _unit(text_embeds).T, axis=-1)
    cand_class = [scene_class(c) for c in candidates]
    right = {"one": [], "two": []}
    same_objects, swapped = [], []
    for caption, j in zip(captions, best):
        want, got = scene_class(caption), cand_class[j]
        right[want[0]].append(got == want)
        if want[0] == "two":
            same_objects.append(got[0] == "two" and {got[1], got[3]} == {want[1], want[3]})
            swapped.append(got == ("two", want[3], want[2], want[1]))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"one": mean(right["one"]), "two": mean(right["two"]),
            "two/same_objects": mean(same_objects), "two/swapped": mean(swapped),
            "one/count": float(len(right["one"])), "two/count": float(len(right["two"])),
            "candidates": float(len(candidates))}


def shapes_retrieval(clip_model, tokenizer, n: int = DEFAULT_EXAMPLES, *, seed: int | None = None,
                     batch_size: int = 100, images=None, captions=None) -> dict[str, float]:
    """:func:`retrieval_scores` of ``clip_model`` (an unclip-jax CLIP with both towers) on the
    first ``n`` Shapes test examples. ``images`` (uint8 [n, H, W, 3]) and ``captions`` may be
    passed to reuse one rendering across several models."""
    if not hasattr(clip_model, "encode_image"):
        raise RetrievalError("Retrieval needs a CLIP with an image tower; this model has only "
                             "a text encoder.")
    if images is None or captions is None:
        images, captions = se.test_set(n, se.DEFAULT_DATA_SEED if seed is None else seed)
    candidates = sorted(set(captions))
    batch_size = max(1, min(int(batch_size), len(captions)))
    img = im.clip_image_embeddings(images, clip_model, batch_size)
    txt = im.clip_text_embeddings(candidates, clip_model, tokenizer, batch_size)
    return retrieval_scores(img, captions, txt, candidates)
