"""The trainer's input: ``make_input(cfg, global_batch_size=, seed=, ...) -> Input``.

``Input`` is an iterator of this process's batches, dicts of NumPy arrays (b = global batch /
process count rows):

  'image'        float32 [b, S, S, 3] in [-1, 1]
  'caption'      object [b] of str (stripped)
  'key'          object [b] of str (the record's key in its shard / folder / tfds split)
  'text_tokens'  int32 [b, L], 'text_mask' bool [b, L]     when context_length > 0 (CLIP BPE)
  'negative_tokens' int32 [b, K, L], 'negative_mask' bool [b, K, L]
                 with negative_captions: each caption's K hard negatives (a CLIP loss's extra
                 negative texts; K = 3 for 'shapes'); an all-false mask where it has none
  'low_res'      float32 [b, s, s, 3] in [-1, 1]           when low_res_size > 0
(kind 'embeddings' yields whatever unclip_jax.data.precompute.read_embeddings records hold.)

The pipeline (tf.data, deterministic given the seed):

  reader (readers.py: per-host file split, seeded file order; one pass = one epoch)
  -> shuffle buffer of raw encoded records (seeded, within the epoch) -> end-of-epoch marker
  -> repeat (every epoch reshuffled, deterministically) -> enumerate: each record's index i
  -> header check (images.header_reason: too large / no readable header: skipped undecoded)
  -> decode (images.decode_rgb; undecodable bytes raise here) -> ignore_errors
  -> validate + tokenize (reason code, conversion flags)
  -> scan: running counts by reason (undecodable = gaps in i), attached to every element;
     stops the input with InputDataError when nothing is usable (below)
  -> filter (keep good records)  -> [skip start_batch * b records when resuming]
  -> crop + resize + degrade (random crop / BSR seeded by fold_in(seed, process, i))
  -> batch(b) -> prefetch

Counts travel *with the data*: every element carries the running totals up to itself, so
``Input.counts()`` is exact for the batches consumed so far (prefetching does not leak into it)
and a resumed Input reports what an uninterrupted one would. Names: 'read' (records seen),
'kept' (passed validation), skip reasons 'undecodable', 'too_large' (more pixels than
max_image_pixels, or more bytes than max_image_bytes), 'empty_caption', 'too_small',
'caption_too_long' (only with long_caption='skip'), and the readers' 'truncated_shard',
'unreadable_file', 'missing_caption', 'missing_image', 'bad_record', 'caption_too_large'
(more bytes than max_caption_bytes); conversions (records kept) 'converted_rgba',
'converted_greyscale', 'converted_cmyk', 'converted_16bit', 'caption_truncated',
'caption_recoded'; and, once a finite (repeat=False) input is exhausted,
'dropped_remainder' (kept records that did not fill a last batch). A damaged shard counts
'truncated_shard' once; the records it lost cannot be counted.

Resuming. ``make_input(..., start_batch=p)`` rebuilds the same deterministic pipeline and
skips the first p * b kept records right after the filter, so they are read, shuffled, decoded
and validated again but not resized, degraded or batched; the batches then match an
uninterrupted iterator's from position p exactly (tested). Cost: decoding p * b images (about
what producing them cost minus resizing and degradation; for Shapes-size PNGs roughly 2,000
images/s per core). tf.data iterator checkpointing is not used because Python-backed stages
(tar / TFRecord parsing, tokenization) cannot be saved in it.

Resource limits. ``max_image_pixels`` (default 8192 x 8192 = 67,108,864, "64 megapixels"):
an image whose header declares more (height x width, times the frames of a GIF) is skipped
as 'too_large' *before* it is decoded. Why this default: it keeps every camera photo (the
largest common sensors are 61 MP) while bounding what one decode can take: 192 MiB as uint8
RGB, and with AUTOTUNE decoding one image per core at once that is already several GB on a
large host; a 20000 x 20000 image (1.1 GiB decoded, 6.7 GB peak before this guard) or a PNG
bomb declaring 60000 x 60000 is never decoded. Training images are cropped to S <= 1024 px,
so nothing useful is lost. ``max_image_bytes`` (128 MiB) and ``max_caption_bytes`` (64 KiB)
bound what a reader loads at all (see readers.py).

Nothing usable. A pass over the input (one epoch) that keeps no record stops the Input with
InputDataError (a UserError), its message giving the counts by reason and what to check: an
empty tar shard, a folder of non-images, every record damaged or skipped. This happens at the
end of the first epoch, or earlier once ``stop_after_unusable`` records (default 20,000) were
read without one kept (0: only at the end of an epoch), so that a misconfigured input over
millions of records (a wrong caption_feature) also stops soon. With repeat=True the input
never spins forever on nothing. (A finite input behaves the same way.)

Captions. Decoded from bytes by this rule (``decode_caption``): a UTF-8 byte-order mark is
dropped; UTF-32 / UTF-16 when the caption starts with their byte-order mark; UTF-16 without one
when at least half of its high bytes are NUL and it decodes as UTF-16 (little- or big-endian, by
where the NULs are) to text without control characters (real UTF-8 text never holds NUL); else
valid UTF-8 as is; else Windows cp1252 (a superset of latin-1 for text; the five bytes cp1252
leaves undefined are taken as latin-1). Anything but UTF-8 is *recoded* and counted
'caption_recoded'. Control characters other than tab and newline become spaces. The result is
UTF-8 from then on (the batch's 'caption', the tokens). A caption file over max_caption_bytes is
not read at all ('caption_too_large'). Empty after stripping (or with no tokens): skipped as
'empty_caption'. Longer than the context (more than context_length - 2 BPE tokens) or than
max_caption_chars (when > 0): long_caption='truncate' (default) keeps the record, truncates the
tokens (and the caption string to max_caption_chars) and counts 'caption_truncated'; 'skip'
drops it as 'caption_too_long'. Only the first 16 * context_length characters are tokenized (a
longer caption is truncated anyway), which keeps a pathological caption from stalling the
tokenizer.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from unclip_jax.clip.tokenizer import get_tokenizer
from unclip_jax.data import bsr, images, readers
from unclip_jax.data.precompute import read_embeddings
from unclip_jax.data.readers import process_defaults
from unclip_jax.data.shapes import HARD_NEGATIVES, hard_negative
from unclip_jax.errors import UserError

KINDS = ("webdataset", "tfrecord", "tfds", "folder", "embeddings")
DEGRADATIONS = ("blur", "bsr", "none")
LONG_CAPTION = ("truncate", "skip")

SKIP_REASONS = ("undecodable", "empty_caption", "too_small", "caption_too_long",
                "truncated_shard", "unreadable_file", "missing_caption", "missing_image",
                "bad_record", "too_large", "caption_too_large")
CONVERSIONS = ("converted_greyscale", "converted_rgba", "converted_cmyk", "converted_16bit",
               "caption_truncated", "caption_recoded")
COUNTERS = ("read", "kept") + SKIP_REASONS + CONVERSIONS
_END = "end_of_data"  # the sentinel after the last record of a finite input (not counted)
_EPOCH = "end_of_epoch"  # the marker after each pass over the input (not counted)
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_SIZE = 4096      # largest image_size (the paper's largest stage is 1024 px)
MAX_CONTEXT = 4096   # largest context_length (CLIP's is 77)
NEGATIVE_CAPTIONS = ("", "shapes")   # caption -> hard negative caption: none, or Shapes'
                                     # (unclip_jax.data.shapes.hard_negative)


class InputConfigError(UserError, ValueError):
    """An input config or batch size that cannot be used as given."""


class InputDataError(UserError, ValueError):
    """The input yields no usable record (empty shards, every record damaged or skipped)."""


# ----------------------------------------------------------------------------- captions

_CP1252 = {b: (bytes([b]).decode("cp1252", "ignore") or chr(b)) for b in range(128, 256)}
_CONTROLS = {c: " " for c in (*range(0, 9), 11, 12, *range(14, 32), 127)}


def _utf16_without_bom(raw: bytes) -> str | None:
    """UTF-16 without a byte-order mark, recognised only when at least half of its high bytes
    are NUL (text mostly in Latin script); None otherwise."""
    if len(raw) % 2 or b"\0" not in raw:
        return None
    odd_nuls, even_nuls = raw[1::2].count(0), raw[0::2].count(0)
    order = "utf-16-le" if odd_nuls >= even_nuls else "utf-16-be"
    if 2 * max(odd_nuls, even_nuls) < len(raw) // 2:
        return None
    try:
        text = raw.decode(order)
    except UnicodeDecodeError:
        return None
    return None if any(ord(c) in _CONTROLS for c in text) else text


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """(text, recoded): caption bytes as text by the rule in the module docstring (UTF-8; else
    UTF-16/32 with a byte-order mark; else UTF-16 without one; else cp1252), ``recoded`` when
    it was not UTF-8. Control characters (but tab, newline, CR) become spaces."""
    raw = bytes(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text = None
    for bom, codec in ((b"\xff\xfe\0\0", "utf-32"), (b"\0\0\xfe\xff", "utf-32"),
                       (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError:
                pass
            break
    if text is None:
        text = _utf16_without_bom(raw)
    if text is not None:
        return text.translate(_CONTROLS), True
    try:
        return raw.decode("utf-8").translate(_CONTROLS), False
    except UnicodeDecodeError:
        text = "".join(_CP1252.get(b, chr(b)) for b in raw)
        return text.translate(_CONTROLS), True


def default_input_config():
    """Every field of the input config, with its default (a ml_collections.ConfigDict)."""

    c = ml_collections.ConfigDict()
    c.kind = "webdataset"        # 'webdataset' | 'tfrecord' | 'tfds' | 'folder' | 'embeddings'
    c.paths = []                 # glob patterns: tar shards, TFRecord files, folders, embeddings
    c.tfds_name = ""             # kind 'tfds': dataset name, e.g. 'shapes', 'coco_captions'
    c.tfds_split = "train"
    c.data_dir = ""              # kind 'tfds': where it is prepared (never downloaded)
    c.image_feature = "image"    # tfrecord / tfds feature names ('a/b' for nested tfds features)
    c.caption_feature = "caption"  # coco_captions: 'captions/text'
    c.key_feature = "key"        # tfrecord: optional key feature
    c.tfrecord_reader = "native"  # tfrecord: 'native' (tf.data ops, parallel) | 'python'
    c.caption_choice = "random"  # tfds sequence of captions: 'first' | 'random' (seeded)
    c.image_size = 64            # S: output images are S x S
    c.crop = "center"            # 'center' | 'random' (of the shorter side's square)
    c.resize_method = "bicubic"  # 'bicubic' | 'area' | 'bilinear' (all antialiased)
    c.min_image_size = 0         # skip images whose shorter side is below this (0: keep all)
    c.max_image_pixels = MAX_IMAGE_PIXELS  # skip larger images undecoded (H x W x frames)
    c.max_image_bytes = 128 << 20   # skip larger encoded images unread
    c.max_caption_bytes = 64 << 10  # skip records with larger caption files unread
    c.stop_after_unusable = 20_000  # stop (InputDataError) after this many reads, none kept
    c.context_length = 77        # CLIP tokens per caption; 0 = don't tokenize
    c.long_caption = "truncate"  # 'truncate' (count caption_truncated) | 'skip'
    c.negative_captions = ""     # 'shapes': also tokenize each caption's hard negative
                                 # (unclip_jax.data.shapes.hard_negative); '' = none
    c.max_caption_chars = 0      # > 0: captions longer than this are long too
    c.low_res_size = 0           # s > 0: add 'low_res' [s, s, 3], degraded from 'image'
    c.low_res_degradation = "blur"  # 'blur' | 'bsr' | 'none'
    c.shuffle_buffer = 10_000    # raw encoded records (~50 KB each for web JPEGs: ~0.5 GB)
    c.repeat = True              # loop forever, reshuffling the file order every epoch
    c.cycle_length = 8           # files read at once (interleaved record by record)
    c.prefetch = 2               # batches prepared ahead
    c.threads = 0                # > 0: tf.data's private thread pool size (0: all cores)
    return c


def input_config(**fields):
    """``default_input_config()`` with ``fields`` set: what a config file's ``input`` section is
    (every field present, so each can be overridden with ``--config.input.KEY=VALUE``)."""
    return _as_config(fields)


def _as_config(cfg):
    defaults = default_input_config()
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for key, value in items.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise InputConfigError(f"Unknown input config key '{key}'.{hint} Valid keys: "
                                   f"{', '.join(sorted(defaults))}.")
        try:
            defaults[key] = list(value) if key == "paths" and not isinstance(value, str) \
                else ([value] if key == "paths" else value)
        except TypeError as e:
            raise InputConfigError(f"Input config key '{key}' has the wrong type: {e}") from None
    return defaults


def _check(cfg, global_batch_size: int, process_count: int) -> int:
    def need(ok, msg):
        if not ok:
            raise InputConfigError(msg)
    need(cfg.kind in KINDS, f"input kind must be one of {KINDS}, got {cfg.kind!r}.")
    need(cfg.tfrecord_reader in ("native", "python"),
         f"tfrecord_reader must be 'native' or 'python', got {cfg.tfrecord_reader!r}.")
    need(global_batch_size > 0 and global_batch_size % process_count == 0,
         f"global_batch_size {global_batch_size} must be a positive multiple of the number of "
         f"processes ({process_count}). Change the batch size.")
    if cfg.kind == "tfds":
        need(isinstance(cfg.tfds_name, str) and bool(cfg.tfds_name),
             "kind 'tfds' needs tfds_name (e.g. 'shapes') and data_dir.")
    else:
        need(len(cfg.paths) > 0, f"kind '{cfg.kind}' needs paths: a list of glob patterns.")
        need(all(isinstance(p, str) and p for p in cfg.paths),
             f"input.paths must be a list of glob patterns (strings), got {list(cfg.paths)!r}.")
    def integer(name, low):
        value = cfg[name]
        need(isinstance(value, (int, np.integer)) and not isinstance(value, bool)
             and value >= low, f"input.{name} must be an integer >= {low}, got {value!r}.")
    for name, low in (("image_size", 1), ("min_image_size", 0), ("max_image_pixels", 1),
                      ("max_image_bytes", 1), ("max_caption_bytes", 1),
                      ("stop_after_unusable", 0), ("context_length", 0), ("low_res_size", 0),
                      ("shuffle_buffer", 0), ("cycle_length", 1), ("prefetch", -1), ("threads", 0),
                      ("max_caption_chars", 0)):
        integer(name, low)
    need(cfg.image_size > 0, f"image_size must be positive, got {cfg.image_size}.")
    need(cfg.image_size <= MAX_SIZE and cfg.low_res_size <= cfg.image_size,
         f"image_size must be at most {MAX_SIZE} and low_res_size at most image_size, got "
         f"{cfg.image_size} and {cfg.low_res_size}.")
    need(cfg.context_length <= MAX_CONTEXT,
         f"context_length must be at most {MAX_CONTEXT} tokens, got {cfg.context_length}.")
    need(cfg.crop in ("center", "random"), f"crop must be 'center' or 'random', got {cfg.crop!r}.")
    need(cfg.resize_method in ("bicubic", "area", "bilinear"),
         f"resize_method must be 'bicubic', 'area' or 'bilinear', got {cfg.resize_method!r}.")
    need(cfg.context_length == 0 or cfg.context_length >= 3,
         f"context_length must be 0 (no tokens) or at least 3, got {cfg.context_length}.")
    need(cfg.negative_captions in NEGATIVE_CAPTIONS,
         f"negative_captions must be one of {NEGATIVE_CAPTIONS} ('' = none), got "
         f"{cfg.negative_captions!r}.")
    need(not cfg.negative_captions or cfg.context_length > 0,
         "negative_captions needs context_length > 0 (the negatives are tokenized).")
    need(cfg.long_caption in LONG_CAPTION,
         f"long_caption must be one of {LONG_CAPTION}, got {cfg.long_caption!r}.")
    need(cfg.low_res_size >= 0 and cfg.low_res_degradation in DEGRADATIONS,
         f"low_res_size must be >= 0 and low_res_degradation one of {DEGRADATIONS}, got "
         f"{cfg.low_res_size}, {cfg.low_res_degradation!r}.")
    if cfg.low_res_size and cfg.low_res_degradation == "bsr":
        need(cfg.image_size % cfg.low_res_size == 0,
             f"the BSR degradation needs image_size ({cfg.image_size}) to be a multiple of "
             f"low_res_size ({cfg.low_res_size}).")
    return global_batch_size // process_count


# ----------------------------------------------------------------------------- the iterator

class Input:
    """Iterator of per-process batches (dicts of NumPy arrays); see the module docstring."""

    def __init__(self, dataset, *, start_batch: int, batch_size: int, counted: bool,
                 stop_after: int = 0, repeat: bool = False):
        self._dataset = dataset
        self._repeat = bool(repeat)
        self._stop_after = int(stop_after)
        self._iterator = iter(dataset)
        self._position = int(start_batch)
        self._batch_size = batch_size
        self._counted = counted
        self._counts = {name: 0 for name in COUNTERS} if counted else {"read": 0, "kept": 0}
        self._done = False

    @property
    def position(self) -> int:
        """Batches produced since the very start (start_batch + batches yielded)."""
        return self._position

    @property
    def batch_size(self) -> int:
        """Rows per batch on this process."""
        return self._batch_size

    @property
    def dataset(self):
        """The underlying tf.data.Dataset (batches, with the private '_counts' / '_end')."""
        return self._dataset

    def counts(self) -> dict[str, int]:
        """Records read, kept, skipped and converted by reason, up to the last batch yielded."""
        return dict(self._counts)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        try:
            element = next(self._iterator)
        except StopIteration:
            self._done = True
            if self._repeat:  # a repeated input ends only when an epoch yields nothing
                raise InputDataError(_unusable_message(self._counts, 0)) from None
            raise

        batch = {k: v.numpy() for k, v in element.items()}
        if not self._counted:
            self._counts["read"] += len(next(iter(batch.values())))
            self._counts["kept"] = self._counts["read"]
            self._position += 1
            return batch
        counts = batch.pop("_counts")
        end = batch.pop("_end")
        stop = batch.pop("_stop")
        self._counts.update({name: int(v) for name, v in zip(COUNTERS, counts[-1])})
        if stop.any():
            self._done = True
            raise InputDataError(_unusable_message(self._counts, self._stop_after))
        real = ~end
        if real.sum() < self._batch_size:  # the last, partial batch of a finite input
            self._counts["dropped_remainder"] = int(real.sum())
            self._done = True
            raise StopIteration
        for name in ("caption", "key"):
            batch[name] = np.array([s.decode("utf-8", "replace") for s in batch[name]], object)
        self._position += 1
        return batch


_HINTS = {
    "missing_caption": "each image needs a caption: KEY.txt beside KEY.jpg in a tar shard or "
                       "folder, or the caption_feature of a TFRecord / tfds dataset (check its "
                       "name)",
    "missing_image": "each caption needs an image (KEY.jpg / .png / .webp ...), or check "
                     "image_feature",
    "bad_record": "the records are not what the reader expects (TFRecords of tf.train.Example "
                  "with bytes features image_feature / caption_feature; no links or '..' names "
                  "in tar shards)",
    "undecodable": "the image bytes are not JPEG, PNG, GIF, WebP or BMP images",
    "too_large": "the images are larger than input.max_image_pixels / max_image_bytes; raise "
                 "them if the host has the memory",
    "caption_too_large": "the caption files are larger than input.max_caption_bytes",
    "empty_caption": "the captions are empty",
    "too_small": "the images are smaller than input.min_image_size; lower it",
    "caption_too_long": "the captions are longer than the context; set "
                        "input.long_caption='truncate'",
    "truncated_shard": "the shards are damaged or not tar / TFRecord files",
    "unreadable_file": "the files cannot be read (permissions, or not files)",
}


def _unusable_message(counts: dict, stop_after: int) -> str:
    skipped = {k: counts.get(k, 0) for k in SKIP_REASONS if counts.get(k, 0)}
    listed = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
    read = counts.get("read", 0)
    if read == 0:
        head = ("The input yielded no records in a whole pass over it: its shards or folders are "
                "empty or hold no image + caption pairs")
    elif stop_after and read >= stop_after:
        head = (f"None of the first {read} records read was usable (input.stop_after_unusable="
                f"{stop_after}; 0 reads a whole epoch first)")
    else:
        head = f"None of the {read} records in a whole pass over the input was usable"
    top = max(skipped, key=skipped.get) if skipped else ""
    hint = f"; the most common reason: {_HINTS[top]}" if top in _HINTS else ""
    return (f"{head} (skipped: {listed or 'nothing'}){hint}. Check input.paths and the data; "
            "stopped instead of reading forever.")


# ----------------------------------------------------------------------------- the pipeline

def _raw_dataset(cfg, seed, process_index, process_count):

    # One pass: _build repeats it, with a marker after each epoch.
    common = dict(seed=seed, process_index=process_index, process_count=process_count,
                  repeat=False)
    limits = dict(max_image_bytes=cfg.max_image_bytes, max_caption_bytes=cfg.max_caption_bytes)
    if cfg.kind == "webdataset":
        return readers.read_webdataset(cfg.paths, cycle_length=cfg.cycle_length, **common,
                                       **limits)
    if cfg.kind == "tfrecord":
        return readers.read_tfrecord(cfg.paths, image_feature=cfg.image_feature,
                                     caption_feature=cfg.caption_feature,
                                     key_feature=cfg.key_feature,
                                     native=cfg.tfrecord_reader == "native",
                                     cycle_length=cfg.cycle_length, **common, **limits)
    if cfg.kind == "folder":
        return readers.read_folder(cfg.paths, **common, **limits)
    return readers.read_tfds(cfg.tfds_name, split=cfg.tfds_split, data_dir=cfg.data_dir or None,
                             image_feature=cfg.image_feature,
                             caption_feature=cfg.caption_feature,
                             caption_choice=cfg.caption_choice, **common)


def _tokenize_fn(cfg):
    """A NumPy function caption bytes -> (ids [L], mask [L], long, empty, recoded, failed,
    caption as UTF-8, stripped and cut to max_caption_chars) for tf.numpy_function."""
    length = cfg.context_length
    max_chars = cfg.max_caption_chars
    if length:
        tok = get_tokenizer()
        room = length - 2
        cut = 16 * length

    def fn(caption: bytes):
        ids = np.full((max(length, 1),), 0, np.int32)
        mask = np.zeros((max(length, 1),), bool)
        try:
            text, recoded = decode_caption(caption)
            text = text.strip()
            long = bool(max_chars and len(text) > max_chars)
            empty = not text
            if length and text:
                tokens = tok.encode(text[:cut])
                empty = not tokens
                long = long or len(tokens) > room or len(text) > cut
                row = [tok.sot_id, *tokens[:room], tok.eot_id]
                ids[:] = tok.pad_id
                ids[:len(row)] = row
                mask[:len(row)] = True
            if max_chars:
                text = text[:max_chars]
            failed = False
        except Exception:  # noqa: BLE001 - a caption the tokenizer cannot take: bad_record
            text, long, empty, recoded, failed = "", False, False, False, True
        return (ids, mask, np.bool_(long), np.bool_(empty), np.bool_(recoded), np.bool_(failed),
                np.bytes_(text.encode("utf-8", "replace")))
    return fn


def _negative_fn(cfg):
    """A NumPy function caption (UTF-8, as validated) -> (ids [K, L], mask [K, L]) of its K
    hard negative captions, tokenized as the caption is; all-false mask rows where it has
    none."""
    length = cfg.context_length
    tok = get_tokenizer()

    def fn(caption: bytes):
        ids = np.zeros((HARD_NEGATIVES, length), np.int32)
        mask = np.zeros((HARD_NEGATIVES, length), bool)
        text = caption.decode("utf-8", "replace")
        negatives = [hard_negative(text, k) for k in range(HARD_NEGATIVES)]
        rows = [k for k, n in enumerate(negatives) if n]
        if rows:
            tokens = tok([negatives[k] for k in rows], context_length=length, truncate=True)
            ids[rows], mask[rows] = tokens.ids, tokens.mask
        return ids, mask
    return fn


def _build(cfg, local_batch: int, seed: int, process_index: int, process_count: int,
           start_batch: int):


    def marker(name):
        return tf.data.Dataset.from_tensors(
            {"key": tf.constant(b""), "image_bytes": tf.constant(b""),
             "caption": tf.constant(b""), "error": tf.constant(name.encode())})

    ds = _raw_dataset(cfg, seed, process_index, process_count)      # one epoch
    if cfg.shuffle_buffer > 1:
        shuffle_seed = (int(seed) * 1_000_003 + process_index) % (2 ** 31 - 1)
        ds = ds.shuffle(cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.concatenate(marker(_EPOCH))
    # repeat: every epoch reshuffled (file order and records); finite: a sentinel after the
    # last record carries the final counts out.
    ds = ds.repeat() if cfg.repeat else ds.concatenate(marker(_END))
    ds = ds.enumerate()

    # 1. decode: the only stage allowed to fail (undecodable bytes); failures are dropped by
    #    ignore_errors and counted as gaps in the index. Images too large to decode, or
    #    without a readable header, are never decoded (images.header_reason).
    max_pixels = int(cfg.max_image_pixels)

    def decode(index, rec):
        error = tf.cond(tf.not_equal(rec["error"], b""), lambda: rec["error"],
                        lambda: images.header_reason(rec["image_bytes"], max_pixels))
        bad = tf.not_equal(error, b"")
        image, flags = tf.cond(
            bad, lambda: (tf.zeros([1, 1, 3], tf.uint8), tf.constant(0, tf.int32)),
            lambda: images.decode_rgb(rec["image_bytes"]))
        return {"index": index, "image": image, "flags": flags, "caption": rec["caption"],
                "key": rec["key"], "error": error}
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()

    # 2. validate and tokenize.
    tokenize = _tokenize_fn(cfg)
    negative = _negative_fn(cfg) if cfg.negative_captions else None
    reason_names = tf.constant(("",) + SKIP_REASONS + (_EPOCH, _END))
    code_of = {name: i for i, name in enumerate(("",) + SKIP_REASONS + (_EPOCH, _END))}
    length = max(cfg.context_length, 1)
    min_size = int(cfg.min_image_size)
    skip_long = cfg.long_caption == "skip"

    def validate(el):
        ids, mask, long, empty, recoded, failed, caption = tf.numpy_function(
            tokenize, [el["caption"]],
            [tf.int32, tf.bool, tf.bool, tf.bool, tf.bool, tf.bool, tf.string], stateful=False)
        ids, mask = tf.ensure_shape(ids, [length]), tf.ensure_shape(mask, [length])
        long, empty, recoded, failed, caption = (tf.ensure_shape(t, []) for t in
                                                 (long, empty, recoded, failed, caption))
        reader_code = tf.argmax(tf.cast(tf.equal(reason_names, el["error"]), tf.int32),
                                output_type=tf.int32)
        shape = tf.shape(el["image"])
        small = tf.minimum(shape[0], shape[1]) < min_size
        code = tf.case([
            (reader_code > 0, lambda: reader_code),
            (failed, lambda: tf.constant(code_of["bad_record"])),
            (empty, lambda: tf.constant(code_of["empty_caption"])),
            (small, lambda: tf.constant(code_of["too_small"])),
            (tf.logical_and(long, skip_long), lambda: tf.constant(code_of["caption_too_long"])),
        ], default=lambda: tf.constant(0))
        flags = (el["flags"] + tf.where(long, images.FLAG_CAPTION_TRUNCATED, 0)
                 + tf.where(recoded, images.FLAG_CAPTION_RECODED, 0))
        out = dict(el, caption=caption, code=code, flags=flags, ids=ids, mask=mask)
        if negative is not None:
            neg_ids, neg_mask = tf.numpy_function(negative, [caption], [tf.int32, tf.bool],
                                                  stateful=False)
            out["neg_ids"] = tf.ensure_shape(neg_ids, [HARD_NEGATIVES, length])
            out["neg_mask"] = tf.ensure_shape(neg_mask, [HARD_NEGATIVES, length])
        del out["error"]
        return out
    ds = ds.map(validate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    # 3. running counts (exact per element), then keep the good records (and the sentinel).
    n_counters = len(COUNTERS)
    col = {name: i for i, name in enumerate(COUNTERS)}
    reason_cols = [col[name] for name in SKIP_REASONS]
    flag_cols = [(bit, col[name]) for bit, name in images.FLAG_NAMES.items()]

    stop_after = int(cfg.stop_after_unusable)

    def count(state, el):
        last, totals = state
        gap = el["index"] - last - 1           # records the decoder could not decode
        code = el["code"]
        is_end = tf.equal(code, code_of[_END])
        is_epoch = tf.equal(code, code_of[_EPOCH])
        is_marker = tf.reduce_any(tf.stack([is_end, is_epoch,
                                            tf.equal(code, code_of["truncated_shard"])]))
        ok = tf.equal(code, 0)
        delta = tf.zeros([n_counters], tf.int64)
        updates = [(col["read"], gap + tf.cast(tf.where(is_marker, 0, 1), tf.int64)),
                   (col["kept"], tf.where(ok, 1, 0)),
                   (col["undecodable"], gap)]
        for i, c in enumerate(reason_cols):
            updates.append((c, tf.where(tf.equal(code, i + 1), 1, 0)))
        for bit, c in flag_cols:
            has = tf.bitwise.bitwise_and(el["flags"], bit) > 0
            updates.append((c, tf.where(tf.logical_and(ok, has), 1, 0)))
        idx = tf.constant([[i] for i, _ in updates])
        vals = tf.stack([tf.cast(v, tf.int64) for _, v in updates])
        totals = totals + tf.tensor_scatter_nd_add(delta, idx, vals)
        # Nothing usable: a whole epoch, or stop_after records, without one kept. This element
        # is kept with stop=True and ends the stream; Input raises InputDataError with its
        # counts (no error status: nothing for TensorFlow to log).
        none_kept = tf.equal(totals[col["kept"]], 0)
        stop = tf.logical_and(none_kept, tf.logical_or(
            is_epoch, tf.logical_and(stop_after > 0, totals[col["read"]] >= stop_after)))
        return (el["index"], totals), dict(el, counts=totals, end=is_end, stop=stop,
                                           after_stop=tf.constant(False))
    ds = ds.scan((tf.constant(-1, tf.int64), tf.zeros([n_counters], tf.int64)), count)
    ds = ds.filter(lambda el: tf.reduce_any(tf.stack([tf.equal(el["code"], 0), el["end"],
                                                      el["stop"]])))

    def then_stop(el):  # after a stop element, one copy marked after_stop ends the stream
        return tf.data.Dataset.from_tensors(el).concatenate(
            tf.data.Dataset.from_tensors(dict(el, after_stop=tf.constant(True))).take(
                tf.where(el["stop"], tf.constant(1, tf.int64), 0)))
    ds = ds.flat_map(then_stop).take_while(lambda el: tf.logical_not(el["after_stop"]))
    if start_batch:
        ds = ds.skip(int(start_batch) * local_batch)

    # 4. the training view.
    base = tf.random.experimental.stateless_fold_in(tf.constant([int(seed), 0], tf.int64),
                                                    process_index)

    def view(el):
        s = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(base, el["index"]), 2)
        image = images.square_crop_resize(el["image"], cfg.image_size, cfg.crop, seed=s[0],
                                          method=cfg.resize_method)
        out = {"image": image, "caption": el["caption"], "key": el["key"],
               "_counts": el["counts"], "_end": el["end"], "_stop": el["stop"]}
        if cfg.context_length:
            out["text_tokens"], out["text_mask"] = el["ids"], el["mask"]
        if negative is not None:
            out["negative_tokens"], out["negative_mask"] = el["neg_ids"], el["neg_mask"]
        if cfg.low_res_size:
            low = bsr.degrade(image, cfg.low_res_size, cfg.low_res_degradation,
                                       seed=s[1])
            out["low_res"] = tf.ensure_shape(low, [cfg.low_res_size, cfg.low_res_size, 3])
        return out
    ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A repeated input ends only after a stop element: its partial batch must come out.
    ds = ds.batch(local_batch)
    ds = ds.prefetch(cfg.prefetch)
    return ds.with_options(_options(cfg))


def _options(cfg) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if cfg.threads:  # every parallel stage shares this many threads (benchmarks: per core)
        options.threading.private_threadpool_size = int(cfg.threads)
    return options


def _build_embeddings(cfg, local_batch, seed, process_index, process_count, start_batch):


    ds = read_embeddings(cfg.paths)
    if process_count > 1:
        ds = ds.shard(process_count, process_index)
    if cfg.repeat:
        ds = ds.repeat()
    if cfg.shuffle_buffer > 1:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=(int(seed) * 1_000_003 + process_index)
                        % (2 ** 31 - 1), reshuffle_each_iteration=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    if start_batch:
        ds = ds.skip(int(start_batch))
    return ds.prefetch(cfg.prefetch).with_options(_options(cfg))


def make_input(cfg: Any, *, global_batch_size: int, seed: int, process_index: int | None = None,
               process_count: int | None = None, start_batch: int = 0) -> Input:
    """This process's batches of the input described by ``cfg`` (see default_input_config()).

    Args:
      cfg: an input ConfigDict or dict (unset fields take default_input_config()'s values).
      global_batch_size: rows per step over all processes; each process gets
        global_batch_size // process_count (must divide exactly).
      seed: fixes file order, shuffle, random crops, caption choice and degradations (taken
        modulo 2**63: TensorFlow's seeds are 64-bit).
      process_index, process_count: default jax.process_index() / jax.process_count().
      start_batch: resume at this position (the iterator's ``position`` when saved).
    """

    cfg = _as_config(cfg)
    process_index, process_count = process_defaults(process_index, process_count)
    seed = int(seed) % (2 ** 63)  # TensorFlow seeds are int64: a larger seed is reduced
    local_batch = _check(cfg, int(global_batch_size), process_count)
    if start_batch < 0:
        raise InputConfigError(f"start_batch must be >= 0, got {start_batch}.")
    if cfg.kind == "embeddings":
        ds = _build_embeddings(cfg, local_batch, seed, process_index, process_count, start_batch)
        return Input(ds, start_batch=start_batch, batch_size=local_batch, counted=False,
                     repeat=cfg.repeat)
    ds = _build(cfg, local_batch, seed, process_index, process_count, start_batch)
    return Input(ds, start_batch=start_batch, batch_size=local_batch, counted=True,
                 stop_after=cfg.stop_after_unusable, repeat=cfg.repeat)


__all__ = ["COUNTERS", "Input", "InputConfigError", "InputDataError", "KINDS",
           "MAX_IMAGE_PIXELS", "decode_caption", "default_input_config", "make_input"]
