"""A caption -> image-embedding task with a known answer, for testing and benchmarking priors.

There are ``num_concepts`` concepts. Concept k is named by token ``1 + k`` inside a caption of
filler tokens, and owns a true image-embedding direction ``u_k`` (a random unit vector that has
nothing to do with its text embedding ``v_k``, so a prior must *learn* the map). A sample of
concept k is

  text_tokens  [L]     filler tokens with the concept token at a random position, then EOT, padding
  text_mask    [L]     true through EOT
  text_hidden  [L, W]  a fixed random table of token vectors plus a position table (a stand-in for
                       CLIP's last hidden state)
  text_embed   [D]     normalise(v_k + text_noise * n)    (z_t)
  image_embed  [D]     normalise(u_k + image_noise * n)   (z_i)

so the best possible prior puts its samples around ``u_k``, and a prior that ignores the caption
cannot beat the cosine similarity of a random concept's direction. Everything is NumPy, seeded.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PriorTask:
    """The fixed tables of one synthetic task (see the module docstring)."""
    image_dirs: np.ndarray    # [K, D] u_k, unit norm
    text_dirs: np.ndarray     # [K, D] v_k, unit norm
    token_table: np.ndarray   # [V, W]
    position_table: np.ndarray  # [L, W]
    context_length: int
    eot_id: int

    @property
    def num_concepts(self) -> int:
        return self.image_dirs.shape[0]

    @property
    def dim(self) -> int:
        return self.image_dirs.shape[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_prior_task(num_concepts: int = 16, dim: int = 32, text_width: int = 32,
                    context_length: int = 8, num_filler: int = 8, seed: int = 0) -> PriorTask:
    """Tables for a task: token ids are 0 (pad), 1..K (concepts), then fillers, then EOT."""
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (concept, filler, EOT), got "
                         f"{context_length}.")
    rng = np.random.default_rng(seed)
    vocab = 1 + num_concepts + num_filler + 1
    return PriorTask(
        image_dirs=_unit(rng.standard_normal((num_concepts, dim))).astype(np.float32),
        text_dirs=_unit(rng.standard_normal((num_concepts, dim))).astype(np.float32),
        token_table=rng.standard_normal((vocab, text_width)).astype(np.float32),
        position_table=(0.1 * rng.standard_normal((context_length, text_width))).astype(np.float32),
        context_length=context_length,
        eot_id=vocab - 1,
    )


def sample_prior_batch(task: PriorTask, rng: np.random.Generator, batch_size: int,
                       image_noise: float = 0.1, text_noise: float = 0.05,
                       concepts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One batch of the task as a dict of arrays (keys in the module docstring, plus ``concept``)."""
    k = task.num_concepts
    concepts = rng.integers(k, size=batch_size) if concepts is None else np.asarray(concepts)
    n, L = len(concepts), task.context_length
    tokens = np.zeros((n, L), np.int32)
    mask = np.zeros((n, L), bool)
    for row, c in enumerate(concepts):
        length = rng.integers(1, L - 1)  # caption words before EOT, concept included
        words = rng.integers(1 + k, task.eot_id, size=length)
        words[rng.integers(length)] = 1 + c
        tokens[row, :length] = words
        tokens[row, length] = task.eot_id
        mask[row, :length + 1] = True
    hidden = task.token_table[tokens] + task.position_table[None]
    text = _unit(task.text_dirs[concepts] + text_noise * rng.standard_normal((n, task.dim)))
    image = _unit(task.image_dirs[concepts] + image_noise * rng.standard_normal((n, task.dim)))
    return {
        "text_tokens": tokens, "text_mask": mask,
        "text_hidden": hidden.astype(np.float32),
        "text_embed": text.astype(np.float32), "image_embed": image.astype(np.float32),
        "concept": concepts.astype(np.int32),
    }
