"""Pre-compute CLIP embeddings of a dataset once, for training the priors and the decoder.

:func:`precompute` runs a frozen :class:`unclip_jax.clip.model.CLIP` over an iterable of batches
``{"image": float [-1, 1] or uint8 [B, H, W, 3], "caption": [B] str/bytes}`` (any reader: the
Shapes generator, ``unclip_jax.data.input_pipeline.make_input``, a list of dicts) and writes
TFRecord shards ``embeds-00000-of-000NN.tfrecord`` plus ``manifest.json`` to a folder.

Each record (a ``tf.train.Example``) holds:

  caption        bytes (UTF-8)
  text_tokens    int64 list [L]            the CLIP BPE ids (start, tokens, end, padding)
  text_mask      int64 list [L]            1 for start/tokens/end, 0 for padding
  text_embed     float list [Dt]           CLIP text embedding z_t (projected, not normalised)
  image_embed    float list [Di]           CLIP image embedding z_i (projected, not normalised)
  text_hidden    bytes, optional           raw little-endian float32 (or float16) [L, W]: the text
                                           encoder's last hidden states (after its final LayerNorm)
  image_png      bytes, optional           the image as uint8 PNG at ``image_size`` (area resize)

Encoding is one jitted function of fixed batch shapes: the last batch is padded and the padding
dropped. Images are preprocessed on device with :func:`unclip_jax.clip.preprocess_jax` (bicubic
resize to CLIP's size, CLIP normalisation); captions are tokenized with CLIP's tokenizer, cut to
the context if too long (the count of cut captions goes into the manifest). Captions are encoded
with their attention mask, as Karlo does.

Shards are written as ``*.tfrecord.tmp`` and renamed once the total is known, and the manifest is
written last, so a folder with a manifest is complete. The manifest records the count, the
fields, the dimensions, each file's count, and the CLIP used (its source and config).
The folder may be remote (gs://): its listing, renames and manifest go through
unclip_jax.io.paths, the shard bytes through TensorFlow's own file system (which reads gs://).

:func:`read_embeddings` reads the shards back as a ``tf.data.Dataset`` of dicts with keys among
``caption`` (tf.string), ``text_tokens`` int32 [L], ``text_mask`` bool [L], ``text_embed`` float32
[Dt], ``text_hidden`` float32 [L, W], ``image_embed`` float32 [Di], ``image`` float32 [-1, 1]
[S, S, 3]. A record that does not parse or has wrong sizes is skipped and counted (pass a
:class:`ReadStats`), never fatal. :func:`validate_shards` checks files and reports counts per file.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
from flax import nnx
from PIL import Image

from unclip_jax.clip.preprocess import preprocess_jax
from unclip_jax.clip.tokenizer import get_tokenizer
from unclip_jax.data import shapes
from unclip_jax.errors import UserError
from unclip_jax.io import paths
from unclip_jax.io.atomic import atomic_write

MANIFEST = "manifest.json"
FORMAT = "unclip-jax-embeddings"
FORMAT_VERSION = 1
ALL_FIELDS = ("caption", "text_tokens", "text_mask", "text_embed", "text_hidden", "image_embed",
              "image")


class PrecomputeError(UserError, ValueError):
    """Bad input to the pre-compute job, or embeddings that cannot be read."""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _to_float_images(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise PrecomputeError(f"Batch 'image' must be [B, H, W, 3] (RGB, channels last), got shape "
                              f"{x.shape}.")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise PrecomputeError(f"Batch 'image' must be uint8 [0, 255] or float [-1, 1], got dtype "
                          f"{x.dtype}.")


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B, H, W, 3] -> [B, size, size, 3]: block means for integer factors, else PIL BOX."""
    b, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images
    if h == w and h % size == 0:
        k = h // size
        x = images.astype(np.float64).reshape(b, size, k, size, k, 3).mean(axis=(2, 4))
        return np.round(x).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX))
                     for im in images])


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _captions(batch: dict) -> list[str]:
    caps = batch.get("caption")
    if caps is None:
        raise PrecomputeError(f"Each batch needs a 'caption' entry; got keys {sorted(batch)}.")
    out = []
    for c in np.asarray(caps, dtype=object).reshape(-1):
        out.append(c.decode("utf-8") if isinstance(c, bytes) else str(c))
    return out


def make_encoder(model, with_hidden: bool):
    """A jitted ``(tokens [B, L], mask [B, L], images float [-1, 1] [B, H, W, 3]) ->
    (text_embed, hidden or None, image_embed)`` over the model's (frozen) state."""


    graphdef, state = nnx.split(model)
    image_size = model.config.image_size

    @jax.jit
    def encode(state, tokens, mask, images):
        m = nnx.merge(graphdef, state)
        text_embed, hidden = m.encode_text(tokens, mask)
        image_embed = m.encode_image(preprocess_jax(images, image_size=image_size))
        return text_embed, (hidden if with_hidden else None), image_embed

    return lambda tokens, mask, images: encode(state, tokens, mask, images)


class _ShardWriter:
    def __init__(self, out_dir: str, examples_per_shard: int):
        self._tf = tf
        self.out_dir = out_dir
        self.per_shard = examples_per_shard
        self.tmp_paths: list[str] = []
        self.counts: list[int] = []
        self._writer = None

    def write(self, record: bytes) -> None:
        if self._writer is None or self.counts[-1] >= self.per_shard:
            self._close()
            path = paths.join(self.out_dir, f"embeds-{len(self.tmp_paths):05d}.tfrecord.tmp")
            self._writer = self._tf.io.TFRecordWriter(path)
            self.tmp_paths.append(path)
            self.counts.append(0)
        self._writer.write(record)
        self.counts[-1] += 1

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> list[str]:
        self._close()
        n = len(self.tmp_paths)
        names = []
        for i, tmp in enumerate(self.tmp_paths):
            name = f"embeds-{i:05d}-of-{n:05d}.tfrecord"
            paths.replace(tmp, paths.join(self.out_dir, name))
            names.append(name)
        return names


def _example(tf, caption: str, tokens, mask, text_embed, image_embed, hidden, png) -> bytes:
    f = tf.train.Feature
    feats = {
        "caption": f(bytes_list=tf.train.BytesList(value=[caption.encode("utf-8")])),
        "text_tokens": f(int64_list=tf.train.Int64List(value=tokens.astype(np.int64))),
        "text_mask": f(int64_list=tf.train.Int64List(value=mask.astype(np.int64))),
        "text_embed": f(float_list=tf.train.FloatList(value=text_embed)),
        "image_embed": f(float_list=tf.train.FloatList(value=image_embed)),
    }
    if hidden is not None:
        feats["text_hidden"] = f(bytes_list=tf.train.BytesList(value=[hidden.tobytes()]))
    if png is not None:
        feats["image_png"] = f(bytes_list=tf.train.BytesList(value=[png]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def precompute(model, batches: Iterable[dict], out_dir: str, *, batch_size: int,
               with_hidden: bool = False, hidden_dtype: str = "float32",
               image_size: int | None = None, examples_per_shard: int = 10_000,
               max_examples: int | None = None, clip_source: str = "",
               log_every_s: float = 30.0) -> dict:
    """Encode every example of ``batches`` and write shards + manifest to ``out_dir``.

    Args:
      model: a :class:`unclip_jax.clip.model.CLIP` (frozen; e.g. from ``from_pretrained``).
      batches: iterable of dicts with ``image`` ([B, H, W, 3], uint8 or float in [-1, 1]) and
        ``caption`` ([B] str or bytes). Batches may have any size; they are regrouped into
        ``batch_size``.
      batch_size: the fixed batch of the jitted encoder (the last one is padded).
      with_hidden: also store the text encoder's last hidden states [L, W].
      hidden_dtype: "float32" or "float16" storage for them (read back as float32).
      image_size: also store each image as PNG at this size (area resize of the input).
      examples_per_shard: records per TFRecord file.
      max_examples: stop after this many (needed for endless readers).
      clip_source: where the CLIP came from (a folder or preset name), for the manifest.

    Returns the manifest (also written to ``out_dir/manifest.json``).
    """


    if batch_size < 1 or examples_per_shard < 1:
        raise PrecomputeError(f"batch_size and examples_per_shard must be positive, got "
                              f"{batch_size} and {examples_per_shard}.")
    if hidden_dtype not in ("float32", "float16"):
        raise PrecomputeError(f"hidden_dtype must be 'float32' or 'float16', got {hidden_dtype!r}.")
    paths.makedirs(out_dir)
    stale = paths.glob(paths.join(out_dir, "embeds-*.tfrecord*")) + \
        paths.glob(paths.join(out_dir, MANIFEST))
    if stale:
        raise PrecomputeError(f"{out_dir} already holds embeddings ({paths.basename(stale[0])}, "
                              "...). Choose an empty folder or delete the old files.")

    cfg = model.config
    tok = get_tokenizer(cfg.context_length)
    encode = make_encoder(model, with_hidden)
    writer = _ShardWriter(out_dir, examples_per_shard)
    stats = {"count": 0, "truncated_captions": 0}
    t0 = last_log = time.time()

    def flush(images: np.ndarray, captions: list[str]) -> None:
        n = len(captions)
        tokens = tok(captions, truncate=True, allow_empty=True)
        stats["truncated_captions"] += sum(len(tok.encode(c)) > cfg.context_length - 2
                                           for c in captions)
        pad = batch_size - n
        ids, mask, imgs = tokens.ids, tokens.mask, images
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
            imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, 0)])
        text_embed, hidden, image_embed = encode(ids, mask, imgs)
        text_embed = np.asarray(text_embed, np.float32)[:n]
        image_embed = np.asarray(image_embed, np.float32)[:n]
        hidden = None if hidden is None else np.asarray(hidden, np.float32)[:n].astype(hidden_dtype)
        pngs = [None] * n
        if image_size:
            small = _resize_uint8(_to_uint8(images), image_size)
            pngs = [_png(im) for im in small]
        for i in range(n):
            writer.write(_example(tf, captions[i], tokens.ids[i], tokens.mask[i], text_embed[i],
                                  image_embed[i], None if hidden is None else hidden[i], pngs[i]))
        stats["count"] += n

    pend_images: list[np.ndarray] = []
    pend_caps: list[str] = []
    limit = max_examples if max_examples is not None else float("inf")
    image_shape = None
    for batch in batches:
        if stats["count"] + len(pend_caps) >= limit:
            break
        if not isinstance(batch, dict) or "image" not in batch:
            raise PrecomputeError("Each batch must be a dict with 'image' and 'caption'; got "
                                  f"{type(batch).__name__} with keys "
                                  f"{sorted(batch) if isinstance(batch, dict) else '-'}.")
        images = _to_float_images(batch["image"])
        captions = _captions(batch)
        if len(captions) != len(images):
            raise PrecomputeError(f"A batch has {len(images)} images but {len(captions)} captions.")
        if image_shape is None:
            image_shape = images.shape[1:]
        elif images.shape[1:] != image_shape:
            raise PrecomputeError(f"All images must share one size; got {images.shape[1:]} after "
                                  f"{image_shape}. Resize them in the reader.")
        room = int(min(limit - stats["count"] - len(pend_caps), len(captions)))
        pend_images.extend(images[:room])
        pend_caps.extend(captions[:room])
        while len(pend_caps) >= batch_size:
            flush(np.stack(pend_images[:batch_size]), pend_caps[:batch_size])
            del pend_images[:batch_size], pend_caps[:batch_size]
        if time.time() - last_log > log_every_s:
            last_log = time.time()
            rate = stats["count"] / (last_log - t0)
            print(f"precompute: {stats['count']} examples ({rate:.1f}/s)", flush=True)
    if pend_caps:
        flush(np.stack(pend_images), pend_caps)
    if stats["count"] == 0:
        raise PrecomputeError("The input yielded no examples; nothing was written.")
    names = writer.finish()

    fields = ["caption", "text_tokens", "text_mask", "text_embed", "image_embed"]
    if with_hidden:
        fields.append("text_hidden")
    if image_size:
        fields.append("image")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "count": stats["count"],
        "truncated_captions": stats["truncated_captions"],
        "fields": fields,
        "dims": {"context_length": cfg.context_length, "text_embed": cfg.embed_dim,
                 "image_embed": cfg.embed_dim,
                 "text_hidden": [cfg.context_length, cfg.text_width] if with_hidden else None,
                 "image_size": image_size or None},
        "text_hidden_dtype": hidden_dtype if with_hidden else None,
        "files": names,
        "counts": writer.counts,
        "clip": {"source": clip_source, "config": {
            k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}},
        "seconds": round(time.time() - t0, 2),
    }
    text = json.dumps(manifest, indent=2)
    atomic_write(paths.join(out_dir, MANIFEST), lambda f: f.write(text), mode="w")
    return manifest


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _resolve(patterns: str | Sequence[str]) -> tuple[list[str], dict]:
    """Files and manifest from folders and/or glob patterns (all from one job)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    manifest_dirs = []
    for p in patterns:
        p = paths.check(p)
        if paths.isdir(p):
            m = _load_manifest(p)
            files += [paths.join(p, name) for name in m["files"]]
            manifest_dirs.append(p)
        else:
            found = paths.glob(p)
            if not found:
                raise PrecomputeError(f"No embedding shards match {p!r}. Pass the folder written "
                                      "by `unclip-jax precompute` or a glob of its .tfrecord files.")
            files += found
            manifest_dirs += sorted({paths.dirname(f) for f in found})
    manifest = _load_manifest(manifest_dirs[0])
    for d in manifest_dirs[1:]:
        other = _load_manifest(d)
        if other["dims"] != manifest["dims"] or other["fields"] != manifest["fields"]:
            raise PrecomputeError(f"Embeddings in {manifest_dirs[0]} and {d} have different fields "
                                  "or sizes; read them separately.")
    return files, manifest


def _load_manifest(folder: str) -> dict:
    path = paths.join(folder, MANIFEST)
    if not paths.isfile(path):
        raise PrecomputeError(f"{folder} has no {MANIFEST}: it is not a finished `unclip-jax "
                              "precompute` output (the manifest is written last).")
    try:
        with paths.open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PrecomputeError(f"{path} cannot be read ({e}); re-run the pre-compute job.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrecomputeError(f"{path} is not an unclip-jax embeddings manifest.")
    _check_manifest(manifest, path)
    return manifest


_FIELDS = ("caption", "text_tokens", "text_mask", "text_embed", "image_embed", "text_hidden",
           "image")


def _check_manifest(manifest: dict, path: str) -> None:
    """Every entry the reader uses has the type it needs; shard names stay inside the folder."""
    def need(ok, what):
        if not ok:
            raise PrecomputeError(f"{path} is damaged or was edited: {what}. Re-run the "
                                  "pre-compute job.")
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    files, counts = manifest.get("files"), manifest.get("counts")
    need(isinstance(files, list) and all(isinstance(f, str) for f in files),
         "'files' must be a list of shard file names")
    for name in files:
        need(name and "/" not in name and "\\" not in name and name not in (".", "..")
             and ":" not in name, f"shard name {name!r} is not a plain file name in the folder")
    need(isinstance(counts, list) and len(counts) == len(files)
         and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts),
         "'counts' must be a list of record counts, one per file")
    fields = manifest.get("fields")
    need(isinstance(fields, list) and fields and all(f in _FIELDS for f in fields),
         f"'fields' must be a list of {_FIELDS}")
    dims = manifest.get("dims")
    need(isinstance(dims, dict), "'dims' must be an object")
    for key in ("context_length", "text_embed", "image_embed"):
        need(positive(dims.get(key)), f"dims.{key} must be a positive integer")
    hidden = dims.get("text_hidden")
    need(hidden is None or (isinstance(hidden, list) and len(hidden) == 2
                            and all(positive(v) for v in hidden)),
         "dims.text_hidden must be null or [length, width]")
    need(dims.get("image_size") is None or positive(dims.get("image_size")),
         "dims.image_size must be null or a positive integer")
    need("text_hidden" not in fields or hidden is not None,
         "'fields' has text_hidden but dims.text_hidden is null")
    need("image" not in fields or dims.get("image_size") is not None,
         "'fields' has image but dims.image_size is null")
    need(manifest.get("text_hidden_dtype") in (None, "float16", "float32"),
         "text_hidden_dtype must be null, 'float16' or 'float32'")


def load_manifest(path: str) -> dict:
    """The manifest of a pre-compute output folder."""
    return _load_manifest(path)


class ReadStats:
    """Counters updated while a dataset from :func:`read_embeddings` is iterated.

    ``good``: records yielded; ``invalid``: records read but skipped (bytes that do not parse,
    wrong sizes, a corrupt PNG); ``missing``: records the manifest promises that could not be read at
    all (corrupt framing: TFRecord cannot resynchronise, so the rest of that file is lost); ``bad``:
    both. ``missing`` and ``bad`` are meaningful after one full pass.
    """

    def __init__(self):
        self._seen = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._good = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.expected = 0

    @property
    def seen(self) -> int:
        return int(self._seen.numpy())

    @property
    def good(self) -> int:
        return int(self._good.numpy())

    @property
    def invalid(self) -> int:
        return self.seen - self.good

    @property
    def missing(self) -> int:
        return max(self.expected - self.seen, 0)

    @property
    def bad(self) -> int:
        return self.invalid + self.missing

    def __repr__(self) -> str:
        return (f"ReadStats(good={self.good}, invalid={self.invalid}, missing={self.missing}, "
                f"expected={self.expected})")


def _parser(manifest: dict, fields: Sequence[str]):
    dims = manifest["dims"]
    length = dims["context_length"]
    spec = {
        "caption": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "text_tokens": tf.io.VarLenFeature(tf.int64),
        "text_mask": tf.io.VarLenFeature(tf.int64),
        "text_embed": tf.io.VarLenFeature(tf.float32),
        "image_embed": tf.io.VarLenFeature(tf.float32),
    }
    if "text_hidden" in fields:
        spec["text_hidden"] = tf.io.FixedLenFeature([], tf.string, default_value="")
    if "image" in fields:
        spec["image_png"] = tf.io.FixedLenFeature([], tf.string, default_value="")
    hidden_dtype = tf.float16 if manifest.get("text_hidden_dtype") == "float16" else tf.float32

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        dense = {k: tf.sparse.to_dense(ex[k]) for k in
                 ("text_tokens", "text_mask", "text_embed", "image_embed")}
        ok = (tf.equal(tf.size(dense["text_tokens"]), length)
              & tf.equal(tf.size(dense["text_mask"]), length)
              & tf.equal(tf.size(dense["text_embed"]), dims["text_embed"])
              & tf.equal(tf.size(dense["image_embed"]), dims["image_embed"]))
        out = {"caption": ex["caption"]}
        out["text_tokens"] = tf.cast(dense["text_tokens"], tf.int32)
        out["text_mask"] = tf.cast(dense["text_mask"], tf.bool)
        out["text_embed"] = dense["text_embed"]
        out["image_embed"] = dense["image_embed"]
        if "text_hidden" in fields:
            l, w = dims["text_hidden"]
            h = tf.io.decode_raw(ex["text_hidden"], hidden_dtype)
            ok = ok & tf.equal(tf.size(h), l * w)
            h = tf.cond(tf.equal(tf.size(h), l * w), lambda: h, lambda: tf.zeros([l * w], hidden_dtype))
            out["text_hidden"] = tf.cast(tf.reshape(h, [l, w]), tf.float32)
        if "image" in fields:
            s = dims["image_size"]
            png = ex["image_png"]
            has_png = tf.strings.length(png) > 0
            ok = ok & has_png
            # A record without PNG bytes gets a placeholder (then dropped); corrupt PNG bytes make
            # decode_png fail, and ignore_errors() drops the record.
            img = tf.cond(has_png, lambda: tf.io.decode_png(png, channels=3),
                          lambda: tf.zeros([s, s, 3], tf.uint8))
            right = tf.reduce_all(tf.equal(tf.shape(img), [s, s, 3]))
            ok = ok & right
            img = tf.cond(right, lambda: img, lambda: tf.zeros([s, s, 3], tf.uint8))
            out["image"] = tf.reshape(tf.cast(img, tf.float32) / 127.5 - 1.0, [s, s, 3])
        return out, ok

    return parse


def read_embeddings(patterns: str | Sequence[str], *, fields: Sequence[str] | None = None,
                    stats: ReadStats | None = None, num_parallel_reads: int | None = None):
    """A ``tf.data.Dataset`` of the records in ``patterns`` (output folders or shard globs).

    ``fields``: which keys to return (default: all the job stored; see the module docstring).
    Records that fail to parse or have the wrong sizes are skipped (with a logged warning) and
    counted in ``stats`` (a :class:`ReadStats`).
    Shards are read in order (deterministic) unless ``num_parallel_reads`` is given.
    """
    files, manifest = _resolve(patterns)
    stored = manifest["fields"]
    fields = list(stored if fields is None else fields)
    missing = [f for f in fields if f not in stored]
    if missing:
        raise PrecomputeError(f"Fields {missing} were not stored by this pre-compute job (it has "
                              f"{stored}); re-run it with the options that store them.")
    parse = _parser(manifest, fields)
    if stats is not None:
        counts = dict(zip(manifest["files"], manifest["counts"]))
        stats.expected += sum(counts.get(paths.basename(f), 0) for f in files)
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=num_parallel_reads)

    def count_seen(record):
        if stats is not None:
            with tf.control_dependencies([stats._seen.assign_add(1)]):
                return tf.identity(record)
        return record

    def keep(out, ok):
        if stats is not None:
            with tf.control_dependencies([stats._good.assign_add(tf.cast(ok, tf.int64))]):
                return tf.identity(ok)
        return ok

    ds = ds.map(count_seen)
    # ignore_errors: records whose bytes do not parse, and corrupt framing (the rest of that file).
    ds = ds.map(parse).ignore_errors(log_warning=True)
    ds = ds.filter(keep)
    return ds.map(lambda out, ok: {k: out[k] for k in fields})


def validate_shards(patterns: str | Sequence[str]) -> dict:
    """Read every record; returns ``{"good": n, "bad": n, "files": {path: [good, bad]}}``.

    A file whose framing is corrupt (bad length or checksum) counts its unreadable tail as one bad
    record, since TFRecord cannot resynchronise after it.
    """
    files, manifest = _resolve(patterns)
    parse = _parser(manifest, manifest["fields"])
    report = {"good": 0, "bad": 0, "files": {}}
    for path in files:
        good = bad = 0
        it: Iterator = iter(tf.data.TFRecordDataset(path))
        while True:
            try:
                record = next(it)
            except StopIteration:
                break
            except tf.errors.DataLossError:
                bad += 1
                break
            try:
                _, ok = parse(record)
                good, bad = (good + 1, bad) if bool(ok) else (good, bad + 1)
            except tf.errors.InvalidArgumentError:
                bad += 1
        report["files"][path] = [good, bad]
        report["good"] += good
        report["bad"] += bad
    return report


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def shapes_batches(seed: int, split: str, n: int, batch_size: int, start: int = 0
                   ) -> Iterator[dict]:
    """Batches ``{"image": uint8 [B, 128, 128, 3], "caption": [B] str}`` of the Shapes dataset,
    generated on the fly (identical to the TFDS build with the same seed)."""
    for lo in range(start, start + n, batch_size):
        images, scenes = shapes.generate(seed, split, min(batch_size, start + n - lo), start=lo)
        yield {"image": images, "caption": np.asarray([s.caption for s in scenes], dtype=object)}
