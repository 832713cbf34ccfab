"""CLIP's byte-level BPE tokenizer, offline.

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence), shipped as package data:
49,152 tokens = 256 byte symbols + the same with the end-of-word mark ``</w>`` + 48,894 merges +
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Text is cleaned the way OpenAI's CLIP was trained (ftfy repair with NFC, HTML entities unescaped,
runs of whitespace collapsed, lower case), split with CLIP's regular expression, and each piece
is merged by BPE rank. A batch becomes ``[SOT, tokens..., EOT, pad...]`` rows of
``context_length`` (77) ids, with a mask that is true up to and including EOT. The pad id defaults
to EOT, as Hugging Face's ``CLIPTokenizer(padding="max_length")`` pads, so ids equal theirs; the
text Transformer is causal and pools at the first EOT, so what follows never changes an embedding.

Bad captions are refused with :class:`CaptionError`: an empty caption (unless ``allow_empty``, as
the unconditional branch of classifier-free guidance needs), and one longer than the context
(unless ``truncate=True``, which keeps the first ``context_length - 2`` tokens and the EOT).
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import numbers
import os
from typing import NamedTuple, Sequence

import ftfy
import numpy as np
import regex

from unclip_jax.errors import UserError

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # the vocabulary size OpenAI's CLIP was trained with
MAX_PIECE = 256     # pieces (runs of letters, digits...) longer than this are merged in chunks
LONG_TEXT = 2000    # captions longer than this (in characters) are tokenized only as far as
                    # the context (and one more token, to tell that they do not fit)

# CLIP's split: the two special tokens, common English contractions, runs of letters, single
# digits, runs of anything else that is neither space nor letter nor digit.
_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)


class CaptionError(UserError, ValueError):
    """A caption that cannot be tokenized as asked (empty, or longer than the context)."""


class Tokens(NamedTuple):
    """A tokenized batch: ``ids`` int32 [B, L] and ``mask`` bool [B, L] (true through EOT)."""
    ids: np.ndarray
    mask: np.ndarray


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (control characters, space, ...) map to
    code points from 256 upward, so that BPE never sees whitespace or control characters.
    The dict's order is the order of the first 256 vocabulary entries.
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    # Insertion order matters: the vocabulary lists the printable bytes first, then the others.
    table = {b: chr(b) for b in keep}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(keep))
    return table


def clean_text(text: str) -> str:
    """Repair, unescape, collapse whitespace and lower-case ``text`` as CLIP's training did."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer. ``Tokenizer()(["a red circle"])`` -> :class:`Tokens`."""

    def __init__(self, bpe_path: str = DEFAULT_BPE_PATH, context_length: int = CONTEXT_LENGTH,
                 pad_id: int | None = None):
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(
                f"BPE vocabulary '{bpe_path}' not found. It ships with unclip_jax "
                "(unclip_jax/clip/bpe_simple_vocab_16e6.txt.gz); reinstall the package.")
        if isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral) or \
                context_length < 3:
            raise CaptionError(f"context_length must be an integer of at least 3 (SOT, one "
                               f"token, EOT), got {context_length!r}.")
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self._bytes = byte_to_unicode()
        self._unbytes = {c: b for b, c in self._bytes.items()}
        self.context_length = context_length
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.pad_id = self.eot_id if pad_id is None else pad_id
        self._bpe = functools.lru_cache(maxsize=100_000)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe_uncached(self, piece: str, end: bool = True) -> tuple[str, ...]:
        """Merge the characters of one pre-tokenized piece by rank until no merge applies
        (``end``: the piece ends a word, its last character carries '</w>')."""
        word = list(piece[:-1]) + [piece[-1] + ("</w>" if end else "")]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of ``text`` without SOT/EOT; with ``limit``, only the first ``limit``
        (the rest of the text is not tokenized). A piece longer than MAX_PIECE characters
        (no word is) is merged in chunks of that many, which keeps the cost linear in the
        text's length (whole, BPE is quadratic in a piece's length)."""
        ids = []
        for match in _SPLIT.finditer(clean_text(text)):
            piece = match.group()
            if piece in (SOT_TOKEN, EOT_TOKEN):  # written out in the text: the special id, as
                ids.append(self.encoder[piece])  # OpenAI's and Hugging Face's tokenizers do
            else:
                piece = "".join(self._bytes[b] for b in piece.encode("utf-8"))
                for start in range(0, len(piece), MAX_PIECE):
                    chunk = piece[start:start + MAX_PIECE]
                    end = start + MAX_PIECE >= len(piece)
                    ids.extend(self.encoder[tok] for tok in self._bpe(chunk, end))
                    if limit is not None and len(ids) >= limit:
                        return ids[:limit]
            if limit is not None and len(ids) >= limit:
                return ids[:limit]
        return ids

    def write_vocab_files(self, folder: str) -> tuple[str, str]:
        """Write this BPE as ``vocab.json`` + ``merges.txt`` (the files a Hugging Face
        ``CLIPTokenizer`` reads) into ``folder``; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        with open(vocab, "w", encoding="utf-8") as f:
            json.dump(self.encoder, f)
        ranked = sorted(self.merge_rank, key=self.merge_rank.get)
        with open(merges, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in ranked) + "\n")
        return vocab, merges

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; SOT, EOT and padding are dropped."""
        special = {self.sot_id, self.eot_id, self.pad_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in special)
        raw = bytearray(self._unbytes[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False, allow_empty: bool = False) -> Tokens:
        """Tokenize a caption or a batch of captions into fixed-length rows.

        Args:
          texts: one caption or a sequence of captions.
          context_length: row length (default: the tokenizer's, 77).
          truncate: cut captions that do not fit to ``context_length - 2`` tokens (EOT kept)
            instead of raising :class:`CaptionError`.
          allow_empty: accept empty captions (the "no caption" input of classifier-free
            guidance) instead of raising.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        room = length - 2
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), bool)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise CaptionError(f"Caption {row} is a {type(text).__name__}, not a string.")
            tokens = self.encode(text, limit=None if len(text) <= LONG_TEXT else room + 1)
            if not tokens and not allow_empty:
                raise CaptionError(
                    f"Caption {row} ({text!r}) is empty after cleaning. Give a caption with at "
                    "least one word (empty captions are only for the unconditional branch of "
                    "guidance: pass allow_empty=True).")
            if len(tokens) > room:
                if not truncate:
                    raise CaptionError(
                        f"Caption {row} is {_count(tokens, room)} tokens long, but the context "
                        f"holds {room} (plus start and end): {_shorten(text)!r}. Shorten it, or "
                        "pass truncate=True to keep only the first tokens.")
                tokens = tokens[:room]
            row_ids = [self.sot_id, *tokens, self.eot_id]
            ids[row, :len(row_ids)] = row_ids
            mask[row, :len(row_ids)] = True
        return Tokens(ids, mask)


def _count(tokens: list, room: int) -> str:
    """How many tokens a caption has, as far as it was tokenized (room + 1: 'more than')."""
    return f"more than {room}" if len(tokens) == room + 1 else str(len(tokens))


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> Tokenizer:
    """The shared default tokenizer (loading the vocabulary takes about a second)."""
    return Tokenizer(context_length=context_length)
