"""Readers of image-caption data: webdataset tar shards, TFRecords, tfds datasets, image folders.

Every reader returns a ``tf.data.Dataset`` of *raw records*, dicts of scalar ``tf.string``:

  'key'          an identifier of the record (the webdataset key, the file path, the tfds id)
  'image_bytes'  the encoded image file (JPEG / PNG / WebP / GIF / BMP), not decoded here
  'caption'      the caption bytes as stored (the input pipeline decodes them: UTF-8, UTF-16
                 with a BOM, else cp1252, counted; see input_pipeline.py)
  'error'        b'' for a good record; otherwise the reason this element is not a usable
                 record (READER_ERRORS), e.g. b'truncated_shard' for the marker a damaged tar
                 emits after its last good record. Markers carry empty bytes; the input
                 pipeline counts them by reason and drops them. Readers never raise on bad
                 data: damage becomes a marker, so that nothing is lost silently.

Limits. Nothing larger than ``max_image_bytes`` (default 128 MiB) is read into memory as an
image, nor larger than ``max_caption_bytes`` (default 64 KiB) as a caption: such a record
becomes a 'too_large' / 'caption_too_large' marker without its bytes being read. A tar member
whose name is absolute or climbs out with '..', and a member that is a link or a device, is a
'bad_record' marker (nothing is ever extracted to disk, but such names mean a hostile or broken
shard). Keys that are not UTF-8 are kept as their bytes.

Per-host sharding. ``process_index`` / ``process_count`` (default ``jax.process_index()`` /
``jax.process_count()``) split the *files*: process i reads files i, i + n, i + 2n, ... of the
sorted list, so the processes read disjoint sets whose union is everything. With fewer files
than processes every process reads all files (in the same seeded order) and keeps every n-th
record instead. tfds datasets are split with ``tfds.even_splits`` (contiguous example ranges).
Note that file-level splitting gives processes as many records as their files hold, which need
not be equal; with ``repeat=True`` (training) the streams are infinite, so this never stalls.

Order. Each process shuffles the order of its own files with ``seed`` (reshuffled every epoch
when ``repeat``, deterministically) and interleaves ``cycle_length`` files record by record; the
record-level shuffle buffer lives in input_pipeline.py. Everything is deterministic given the
seed (``tf.data.Options().deterministic = True``).

Paths (patterns, folders, files) go through unclip_jax.io.paths: local or gs://; a remote tar or
TFRecord shard is read whole into memory (one request per file, ``cycle_length`` at a time).
TFRecord files may be GZIP-compressed (recognised by their magic bytes); tar shards may be
.tar.gz / .tar.bz2 / .tar.xz (tarfile detects it). Damage inside a compressed file ends that
file with a 'truncated_shard' marker, like a truncated one.

Tar files are parsed in Python (``tarfile``) inside ``tf.data.Dataset.from_generator``, one
generator per file, because that is the way to survive damage (the ``webdataset`` package is
not a dependency). TFRecord files have two readers (``native``):
  native (default)  tf.data's own ops, no Python per record, so decoding grows with the cores:
                    ``TFRecordDataset`` per file (GZIP detected by magic bytes; CRCs verified),
                    records parsed with ``tf.io.decode_proto`` (a wrong feature type is a
                    'bad_record' marker, not an error), parallel over files (interleave with
                    AUTOTUNE). Damage is still counted: records whose proto does not parse are
                    dropped (ignore_errors) and counted as 'bad_record' from the gaps in their
                    per-file index; at the end of each file one header walk (Python, reading
                    the 12-byte frame headers only) gives the number of framed records, and
                    those the reader did not reach (it stops at a bad CRC) are 'bad_record'
                    markers too, plus a 'truncated_shard' marker when the framing is damaged.
  Python            a 20-line framing reader + ``tf.train.Example`` parsing in a generator
                    (CRCs not verified; a damaged length is caught by the size checks).

Public API
  read_webdataset(patterns, *, seed, process_index, process_count, repeat, cycle_length)
  read_tfrecord(patterns, *, image_feature, caption_feature, key_feature, seed, ...)
  read_tfds(name, *, split, data_dir, image_feature, caption_feature, caption_choice, seed, ...)
  read_folder(patterns, *, seed, ...)
  iter_tar_records(path), iter_tfrecord_records(path, ...), read_folder_record(path, root)
                           the per-file Python generators (handy for inspecting a shard)
  tar_to_tfrecord(patterns, out_dir, *, overwrite)  webdataset tars -> TFRecord, once
  resolve_files(patterns), split_for_process(files, process_index, process_count)
  RAW_SIGNATURE, READER_ERRORS, IMAGE_EXTENSIONS, ReaderError
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from typing import Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from unclip_jax.errors import UserError
from unclip_jax.io import outputs, paths

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
CAPTION_EXTENSIONS = ("txt",)
READER_ERRORS = ("truncated_shard", "unreadable_file", "missing_caption", "missing_image",
                 "bad_record", "too_large", "caption_too_large")
MAX_IMAGE_BYTES = 128 << 20
MAX_CAPTION_BYTES = 64 << 10
"""Reasons a reader emits in 'error' (markers are counted by the pipeline under these names)."""

RAW_SIGNATURE = {k: tf.TensorSpec((), tf.string)
                 for k in ("key", "image_bytes", "caption", "error")}


class ReaderError(UserError, ValueError):
    """Input files that cannot be used as given (no file matches, bad feature names, ...)."""


def _record(key=b"", image=b"", caption=b"", error=b"") -> dict:
    # surrogateescape: a tar member name that is not UTF-8 comes back as its own bytes
    as_bytes = lambda v: v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)
    return {"key": as_bytes(key), "image_bytes": as_bytes(image), "caption": as_bytes(caption),
            "error": as_bytes(error)}


def _marker(error: str, key="") -> dict:
    return _record(key=key, error=error)


# ----------------------------------------------------------------------------- files, sharding

def resolve_files(patterns: str | Sequence[str], what: str = "files") -> list[str]:
    """Sorted, de-duplicated files matching the glob ``patterns`` (one or a list)."""
    if isinstance(patterns, (str, bytes)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    if not patterns:
        raise ReaderError(f"No input {what} given: set the input config's 'paths' to a list of "
                          "glob patterns, e.g. ['/data/shards/*.tar'].")
    files = set()
    for pattern in patterns:
        files.update(paths.glob(pattern))
    if not files:
        raise ReaderError(f"No {what} match {patterns}. Check the paths (globs: *, ? and [...], "
                          "local or gs://) or the working directory.")
    return sorted(files)


def process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fill in ``jax.process_index()`` / ``jax.process_count()`` and check the pair."""
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ReaderError(f"process_index must be in [0, process_count), got process_index="
                          f"{process_index}, process_count={process_count}.")
    return process_index, process_count


def split_for_process(files: Sequence[str], process_index: int,
                      process_count: int) -> tuple[list[str], bool]:
    """This process's files and whether records must be sharded instead (fewer files than
    processes: every process reads all files and keeps every ``process_count``-th record)."""
    files = list(files)
    if len(files) >= process_count:
        return files[process_index::process_count], False
    return files, process_count > 1


def _file_order(files: Sequence[str], seed: int, repeat: bool, shuffle: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string))
    if shuffle and len(files) > 1:
        ds = ds.shuffle(len(files), seed=int(seed), reshuffle_each_iteration=True)
    return ds.repeat() if repeat else ds


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _from_files(files, make_dataset, *, seed, process_index, process_count, repeat,
                cycle_length, shuffle_files=True) -> tf.data.Dataset:
    process_index, process_count = process_defaults(process_index, process_count)
    mine, shard_records = split_for_process(files, process_index, process_count)
    ds = _file_order(mine, seed, repeat, shuffle_files)
    ds = ds.interleave(make_dataset, cycle_length=max(1, min(cycle_length, len(mine))),
                       block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shard_records:
        ds = ds.shard(process_count, process_index)
    return _options(ds)


def _guarded(generator):
    """``generator`` that can never raise into tf.data (where ignore_errors downstream would
    drop the rest of the file silently): an unexpected failure ends the file with a
    'truncated_shard' marker, which is counted."""
    def run(path, *args):
        try:
            yield from generator(path, *args)
        except Exception:  # noqa: BLE001 - reported as a marker, never raised
            yield _marker("truncated_shard", path)
    return run


def _generator_dataset(generator, *args):
    guarded = _guarded(generator)

    def make(path):
        return tf.data.Dataset.from_generator(guarded, args=(path, *args),
                                              output_signature=RAW_SIGNATURE)
    return make


def _open_shard(path: str):
    """A seekable binary file of a shard: the local file, or a remote object read whole into
    memory in one request (parsing seeks, and object-store streams serve that poorly)."""
    if paths.is_remote(path):
        return io.BytesIO(paths.read_bytes(path))
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise OSError(f"{path} is not a regular file")
    return paths.open(path, "rb")


def _as_str(path) -> str:
    return path.decode("utf-8") if isinstance(path, bytes) else str(path)


# ----------------------------------------------------------------------------- webdataset tars

def _split_member(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


_TOO_LARGE = object()  # a member over the size limit, not read


def _group_record(key: str, group: dict) -> dict:
    image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
    caption = next((group[e] for e in CAPTION_EXTENSIONS if e in group), None)
    if image is None:
        return _marker("missing_image", key)
    if caption is None:
        return _marker("missing_caption", key)
    if image is _TOO_LARGE:
        return _marker("too_large", key)
    if caption is _TOO_LARGE:
        return _marker("caption_too_large", key)
    return _record(key, image, caption)


def _unsafe_name(name: str) -> bool:
    """An absolute member name, or one that climbs out with '..' (never extracted anyway)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _has_end_of_archive(f, offset: int) -> bool:
    """Whether an uncompressed tar has its end-of-archive zero block at ``offset``."""
    f.seek(offset)
    block = f.read(512)
    return len(block) == 512 and not block.strip(b"\0")


def iter_tar_records(path, max_image_bytes: int = MAX_IMAGE_BYTES,
                     max_caption_bytes: int = MAX_CAPTION_BYTES) -> Iterator[dict]:
    """Raw records of one webdataset tar shard (members KEY.ext grouped by KEY, in order).

    Groups need an image (IMAGE_EXTENSIONS) and a caption (.txt); other members (.json, ...)
    are ignored. On damage (a truncated or corrupt archive, a read error) the generator yields
    the complete groups before it, then one ``truncated_shard`` marker, and stops. Members
    over the size limits are not read (their group is a 'too_large' / 'caption_too_large'
    marker); unsafe names and links are 'bad_record' markers.
    """
    path = _as_str(path)
    limits = {**dict.fromkeys(IMAGE_EXTENSIONS, int(max_image_bytes)),
              **dict.fromkeys(CAPTION_EXTENSIONS, int(max_caption_bytes))}
    key, group = None, {}
    try:
        f = _open_shard(path)
    except Exception:  # noqa: BLE001 - any failure to open is reported, never raised
        yield _marker("unreadable_file", path)
        return
    with f:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    if not member.isfile() or _unsafe_name(member.name):
                        if key is not None:
                            yield _group_record(key, group)
                        key, group = None, {}
                        yield _marker("bad_record", member.name)
                        continue
                    member_key, ext = _split_member(member.name)
                    if member_key != key:
                        if key is not None:
                            yield _group_record(key, group)
                        key, group = member_key, {}
                    if ext not in limits:
                        continue                  # .json, .cls, ...: not read
                    if member.size > limits[ext]:
                        group[ext] = _TOO_LARGE
                    else:
                        group[ext] = tar.extractfile(member).read()
                end_offset = tar.offset
                compressed = tar.fileobj is not f
            if key is not None:
                yield _group_record(key, group)
                key = None
            # tarfile stops silently when a file is cut exactly between members: an
            # uncompressed archive must end with a zero block.
            if not compressed and not _has_end_of_archive(f, end_offset):
                yield _marker("truncated_shard", path)
        except Exception:  # noqa: BLE001 - tarfile.ReadError, EOFError, zlib.error, OSError...
            if key is not None and any(e in group for e in IMAGE_EXTENSIONS) and \
                    any(e in group for e in CAPTION_EXTENSIONS):
                yield _group_record(key, group)  # the damage came after a complete record
            yield _marker("truncated_shard", path)


def read_webdataset(patterns, *, seed: int = 0, process_index: int | None = None,
                    process_count: int | None = None, repeat: bool = False,
                    cycle_length: int = 8, shuffle_files: bool = True,
                    max_image_bytes: int = MAX_IMAGE_BYTES,
                    max_caption_bytes: int = MAX_CAPTION_BYTES) -> tf.data.Dataset:
    """Raw records of webdataset tar shards (img2dataset's layout: KEY.jpg + KEY.txt [+ .json])."""
    files = resolve_files(patterns, "tar shards")
    make = _generator_dataset(iter_tar_records, tf.constant(int(max_image_bytes), tf.int64),
                              tf.constant(int(max_caption_bytes), tf.int64))
    return _from_files(files, make, seed=seed,
                       process_index=process_index, process_count=process_count, repeat=repeat,
                       cycle_length=cycle_length, shuffle_files=shuffle_files)


# ----------------------------------------------------------------------------- TFRecords

_TFRECORD_SLACK = 1 << 20  # room for the proto's other features and framing


def _iter_tfrecord_payloads(f, size: int | None, limit: int) -> Iterator[bytes | None | int]:
    """Payloads of a TFRecord file (uint64 length, uint32 crc, data, uint32 crc); None marks
    damage (the file is truncated or a length is impossible), after which it stops; an int (the
    length) marks a record over ``limit`` bytes, skipped unread. ``size``: the file's size
    (None for a compressed stream, where only ``limit`` bounds a length)."""
    while True:
        header = f.read(12)
        if not header:
            return
        if len(header) < 12:
            yield None
            return
        (length,) = struct.unpack("<Q", header[:8])
        if size is not None and length > size - f.tell():
            yield None
            return
        if length > limit:
            if size is not None:
                f.seek(length + 4, io.SEEK_CUR)
            else:                                # a stream: read past it, in chunks
                remaining = length + 4
                while remaining:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        yield None
                        return
                    remaining -= len(chunk)
            yield int(length)
            continue
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
            yield None
            return
        yield data


_WRONG_TYPE = object()


def _bytes_feature(example, name: str):
    """The first value of a bytes feature; None when absent, _WRONG_TYPE when the feature is
    an int64 / float list (or an empty one)."""
    if name not in example.features.feature:
        return None
    feature = example.features.feature[name]
    values = feature.bytes_list.value
    if feature.WhichOneof("kind") != "bytes_list" or not values:
        return _WRONG_TYPE
    return values[0]


def _open_tfrecord(path: str):
    """(binary file, size or None): GZIP-compressed files (magic 1f 8b) are decompressed on
    the fly; their size is then unknown."""
    f = _open_shard(path)
    head = f.read(2)
    if head == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb"), None
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    return f, size


def iter_tfrecord_records(path, image_feature: str = "image", caption_feature: str = "caption",
                          key_feature: str = "key", max_image_bytes: int = MAX_IMAGE_BYTES,
                          max_caption_bytes: int = MAX_CAPTION_BYTES) -> Iterator[dict]:
    """Raw records of one TFRecord file of ``tf.train.Example`` protos (bytes features).

    A record whose proto does not parse, or whose image / caption feature is not a bytes
    feature (an int64 or float list, or empty), is a ``bad_record`` marker; one without the
    image or caption feature a ``missing_image`` / ``missing_caption`` marker; one over the
    size limits a ``too_large`` / ``caption_too_large`` marker (a record larger than both
    limits together is skipped unread); a truncated or damaged file ends with a
    ``truncated_shard`` marker. Keys: the ``key_feature`` if present, else PATH:INDEX.
    """
    path = _as_str(path)
    image_feature, caption_feature, key_feature = (_as_str(x) for x in
                                                   (image_feature, caption_feature, key_feature))
    max_image_bytes, max_caption_bytes = int(max_image_bytes), int(max_caption_bytes)
    try:
        f, size = _open_tfrecord(path)
    except Exception:  # noqa: BLE001
        yield _marker("unreadable_file", path)
        return
    with f:
        payloads = _iter_tfrecord_payloads(f, size, max_image_bytes + max_caption_bytes
                                           + _TFRECORD_SLACK)
        index = -1
        while True:
            try:
                payload = next(payloads)
            except StopIteration:
                return
            except Exception:  # noqa: BLE001 - zlib.error, EOFError, OSError of a damaged file
                yield _marker("truncated_shard", path)
                return
            index += 1
            if payload is None:
                yield _marker("truncated_shard", path)
                return
            key = f"{path}:{index}"
            if isinstance(payload, int):
                yield _marker("too_large", key)
                continue
            try:
                example = tf.train.Example.FromString(payload)
            except Exception:  # noqa: BLE001 - google.protobuf.message.DecodeError
                yield _marker("bad_record", key)
                continue
            own_key = _bytes_feature(example, key_feature)
            key = own_key if isinstance(own_key, bytes) and own_key else key
            image = _bytes_feature(example, image_feature)
            caption = _bytes_feature(example, caption_feature)
            if image is _WRONG_TYPE or caption is _WRONG_TYPE:
                yield _marker("bad_record", key)
            elif image is None:
                yield _marker("missing_image", key)
            elif caption is None:
                yield _marker("missing_caption", key)
            elif len(image) > max_image_bytes:
                yield _marker("too_large", key)
            elif len(caption) > max_caption_bytes:
                yield _marker("caption_too_large", key)
            else:
                yield _record(key, image, caption)


def _tfrecord_walk(path) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(framed records, 1 if the framing is damaged, 'GZIP' or '') of a TFRecord file, from its
    frame headers only (payloads are skipped, not read, in an uncompressed local file); the
    count is -1 when the file cannot be opened (then it is not read at all)."""
    try:
        f, size = _open_tfrecord(_as_str(path))
    except Exception:  # noqa: BLE001
        return np.int64(-1), np.int64(1), b""
    count, damaged = 0, 0
    with f:
        try:
            while True:
                header = f.read(12)
                if not header:
                    break
                (length,) = struct.unpack("<Q", header[:8]) if len(header) == 12 else (-1,)
                if length < 0 or (size is not None and length + 4 > size - f.tell()):
                    damaged = 1
                    break
                if size is not None:
                    f.seek(length + 4, io.SEEK_CUR)
                else:
                    remaining = length + 4
                    while remaining:
                        chunk = f.read(min(remaining, 1 << 20))
                        if not chunk:
                            raise EOFError
                        remaining -= len(chunk)
                count += 1
        except Exception:  # noqa: BLE001 - zlib.error, EOFError of a damaged compressed file
            damaged = 1
    return np.int64(count), np.int64(damaged), (b"GZIP" if size is None else b"")


def _native_tfrecord(image_feature: str, caption_feature: str, key_feature: str,
                     max_image_bytes: int, max_caption_bytes: int):
    """The per-file dataset maker of the native TFRecord reader (see the module docstring)."""
    limit = int(max_image_bytes) + int(max_caption_bytes) + _TFRECORD_SLACK

    def first(values, sizes):
        """values[0] of a decode_proto output (padded), '' when it has none."""
        return tf.concat([tf.reshape(values, [-1]), [b""]], 0)[0], tf.reshape(sizes, [-1])[0]

    def feature(entries_keys, entries_values, name):
        """(present, is bytes with a value, first value) of feature ``name``."""
        hit = tf.equal(entries_keys, name)
        present = tf.reduce_any(hit)
        value = tf.concat([tf.boolean_mask(entries_values, hit), [b""]], 0)[0]
        sizes, (blist,) = tf.io.decode_proto(value, "tensorflow.Feature", ["bytes_list"],
                                             [tf.string])
        blist, has_list = first(blist, sizes)
        sizes, (vals,) = tf.io.decode_proto(blist, "tensorflow.BytesList", ["value"],
                                            [tf.string])
        val, n = first(vals, sizes)
        return present, tf.logical_and(has_list > 0, n > 0), val

    def parse(path, index, record):
        fallback = tf.strings.join([path, tf.strings.as_string(index)], ":")
        sizes, (features,) = tf.io.decode_proto(record, "tensorflow.Example", ["features"],
                                                [tf.string])
        features, _ = first(features, sizes)
        sizes, (entries,) = tf.io.decode_proto(features, "tensorflow.Features", ["feature"],
                                               [tf.string])
        entries = tf.reshape(entries, [-1])[:tf.reshape(sizes, [-1])[0]]
        _, (keys, values) = tf.io.decode_proto(entries, "tensorflow.Features.FeatureEntry",
                                               ["key", "value"], [tf.string, tf.string])
        keys = tf.concat([tf.reshape(keys, [-1]), [b""]], 0)[:tf.size(entries)]
        values = tf.concat([tf.reshape(values, [-1]), [b""]], 0)[:tf.size(entries)]
        has_image, image_ok, image = feature(keys, values, image_feature)
        has_caption, caption_ok, caption = feature(keys, values, caption_feature)
        _, key_ok, key = feature(keys, values, key_feature)
        key = tf.where(tf.logical_and(key_ok, tf.strings.length(key) > 0), key, fallback)
        error = tf.case([
            (tf.strings.length(record) > limit, lambda: tf.constant(b"too_large")),
            (tf.logical_and(has_image, tf.logical_not(image_ok)),
             lambda: tf.constant(b"bad_record")),
            (tf.logical_and(has_caption, tf.logical_not(caption_ok)),
             lambda: tf.constant(b"bad_record")),
            (tf.logical_not(has_image), lambda: tf.constant(b"missing_image")),
            (tf.logical_not(has_caption), lambda: tf.constant(b"missing_caption")),
            (tf.strings.length(image) > max_image_bytes, lambda: tf.constant(b"too_large")),
            (tf.strings.length(caption) > max_caption_bytes,
             lambda: tf.constant(b"caption_too_large")),
        ], default=lambda: tf.constant(b""), exclusive=False)
        good = tf.equal(error, b"")
        return {"key": key, "image_bytes": tf.where(good, image, b""),
                "caption": tf.where(good, caption, b""), "error": error, "index": index}

    def make(path):
        count, damaged, compression = tf.numpy_function(
            _tfrecord_walk, [path], [tf.int64, tf.int64, tf.string], stateful=False)
        count, damaged = tf.ensure_shape(count, []), tf.ensure_shape(damaged, [])
        compression = tf.ensure_shape(compression, [])
        records = tf.data.TFRecordDataset(path, compression_type=compression)
        records = records.take(tf.where(count < 0, tf.constant(0, tf.int64), -1)).enumerate()
        records = records.map(lambda i, r: parse(path, i, r)).ignore_errors()
        end = tf.data.Dataset.from_tensors(
            {"key": path, "image_bytes": tf.constant(b""), "caption": tf.constant(b""),
             "error": tf.constant(b"end_of_file"), "index": tf.maximum(count, 0)})

        def gaps(last, el):  # records dropped before this one (bad protos, after a bad CRC)
            return el["index"], dict(el, gap=el["index"] - last - 1)
        stream = records.concatenate(end).scan(tf.constant(-1, tf.int64), gaps)

        def expand(el):
            bad = tf.data.Dataset.from_tensors(
                {"key": path, "image_bytes": tf.constant(b""),
                 "caption": tf.constant(b""), "error": tf.constant(b"bad_record")}
            ).repeat(tf.maximum(el["gap"], 0))
            is_end = tf.equal(el["error"], b"end_of_file")
            at_end = tf.where(count < 0, b"unreadable_file",
                              tf.where(damaged > 0, b"truncated_shard", b""))
            last_error = tf.where(is_end, at_end, el["error"])
            last = tf.data.Dataset.from_tensors(
                {"key": el["key"], "image_bytes": el["image_bytes"], "caption": el["caption"],
                 "error": last_error}).filter(
                lambda r: tf.logical_or(tf.logical_not(is_end), tf.not_equal(r["error"], b"")))
            return bad.concatenate(last)
        return stream.flat_map(expand)
    return make


def read_tfrecord(patterns, *, image_feature: str = "image", caption_feature: str = "caption",
                  key_feature: str = "key", seed: int = 0, process_index: int | None = None,
                  process_count: int | None = None, repeat: bool = False,
                  cycle_length: int = 8, shuffle_files: bool = True,
                  max_image_bytes: int = MAX_IMAGE_BYTES,
                  max_caption_bytes: int = MAX_CAPTION_BYTES,
                  native: bool = True) -> tf.data.Dataset:
    """Raw records of TFRecord files of tf.train.Example (encoded image bytes + caption bytes);
    ``native``: tf.data's own reader and parser (default) or the Python one."""
    files = resolve_files(patterns, "TFRecord files")
    if native:
        make = _native_tfrecord(image_feature, caption_feature, key_feature,
                                int(max_image_bytes), int(max_caption_bytes))
    else:
        make = _generator_dataset(iter_tfrecord_records, image_feature, caption_feature,
                                  key_feature, tf.constant(int(max_image_bytes), tf.int64),
                                  tf.constant(int(max_caption_bytes), tf.int64))
    return _from_files(files, make, seed=seed, process_index=process_index,
                       process_count=process_count, repeat=repeat, cycle_length=cycle_length,
                       shuffle_files=shuffle_files)


def _tfrecord_name(tar_path: str) -> str:
    base = paths.basename(tar_path)
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base + ".tfrecord"


def tar_to_tfrecord(patterns, out_dir: str, *, overwrite: bool = False,
                    max_image_bytes: int = MAX_IMAGE_BYTES,
                    max_caption_bytes: int = MAX_CAPTION_BYTES) -> dict:
    """Convert webdataset tar shards once into TFRecord files (one per shard, same name with
    .tfrecord), which the native TFRecord reader then reads in parallel without Python.

    Records become ``tf.train.Example`` with bytes features 'image', 'caption' and 'key' (the
    input config's defaults). Damaged records are not written; they are counted by reason in
    the returned ``{"files": [...], "written": n, "skipped": {reason: n}}``; a shard with no
    usable record gets no output file (counted as ``empty_shard``), and when no shard has one,
    ReaderError. Existing outputs are refused unless ``overwrite`` (then only those files are
    replaced, each atomically).
    """
    files = resolve_files(patterns, "tar shards")
    names = [_tfrecord_name(f) for f in files]
    if len(set(names)) != len(names):
        raise ReaderError("Two tar shards would convert to the same TFRecord name; convert "
                          "them into separate folders.")
    outputs.check_folder(out_dir, will_write=names, overwrite=overwrite, flag="out_dir")
    paths.makedirs(out_dir)
    written, skipped, done = 0, {}, []
    for src, name in zip(files, names):
        final = paths.join(out_dir, name)
        tmp = paths.join(out_dir, f".{name}.partial")
        kept = 0
        try:
            with tf.io.TFRecordWriter(tmp) as w:
                for rec in iter_tar_records(src, max_image_bytes, max_caption_bytes):
                    error = rec["error"].decode()
                    if error:
                        skipped[error] = skipped.get(error, 0) + 1
                        continue
                    w.write(tf.train.Example(features=tf.train.Features(feature={
                        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec[f]]))
                        for k, f in (("image", "image_bytes"), ("caption", "caption"),
                                     ("key", "key"))})).SerializeToString())
                    kept += 1
            if kept:   # a shard with no usable record gets no (empty) output file
                paths.replace(tmp, final)
                done.append(final)
            else:
                skipped["empty_shard"] = skipped.get("empty_shard", 0) + 1
            written += kept
        finally:
            if paths.exists(tmp):
                paths.remove(tmp)
    if not written:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        raise ReaderError(f"No usable record in {len(files)} tar shard(s) (skipped: {counts}); "
                          "nothing was written. Check that they are webdataset tar shards of "
                          "image + caption pairs.")
    return {"files": done, "written": written, "skipped": skipped}


# ----------------------------------------------------------------------------- image folders

def _folder_images(patterns) -> list[tuple[str, str]]:
    """(image path, root) for every image under the directories / image files ``patterns``."""
    if isinstance(patterns, (str, bytes)):
        patterns = [patterns]
    found = []
    for match in resolve_files(patterns, "image folders"):
        if paths.isdir(match):
            found += [(file, match) for file in paths.files_under(match)
                      if file.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
        elif match.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
            found.append((match, paths.dirname(match)))
    if not found:
        raise ReaderError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {patterns}. "
                          "The folder reader wants IMG.png + IMG.txt side by side.")
    return sorted(set(found))


def read_folder_record(path, root, max_image_bytes: int = MAX_IMAGE_BYTES,
                       max_caption_bytes: int = MAX_CAPTION_BYTES) -> dict:
    """The raw record of one image file and its caption file (same name, .txt); files over the
    size limits are not read ('too_large' / 'caption_too_large' markers)."""
    path, root = _as_str(path), _as_str(root)
    key = os.path.splitext(os.path.relpath(path, root) if not paths.is_remote(path)
                           else path[len(root.rstrip("/")) + 1:])[0]
    try:
        if not paths.isfile(path):        # a FIFO or a device would block or never end
            return _marker("unreadable_file", key)
        if paths.getsize(path) > max_image_bytes:
            return _marker("too_large", key)
        image = paths.read_bytes(path)
    except Exception:  # noqa: BLE001
        return _marker("unreadable_file", key)
    caption_path = os.path.splitext(path)[0] + ".txt"
    try:
        if not paths.isfile(caption_path):
            return _marker("missing_caption", key)
        if paths.getsize(caption_path) > max_caption_bytes:
            return _marker("caption_too_large", key)
        caption = paths.read_bytes(caption_path)
    except Exception:  # noqa: BLE001 - NotFoundError and friends
        return _marker("missing_caption", key)
    return _record(key, image, caption)


def read_folder(patterns, *, seed: int = 0, process_index: int | None = None,
                process_count: int | None = None, repeat: bool = False,
                shuffle_files: bool = True, max_image_bytes: int = MAX_IMAGE_BYTES,
                max_caption_bytes: int = MAX_CAPTION_BYTES) -> tf.data.Dataset:
    """Raw records of image files with caption files beside them (IMG.png + IMG.txt), found
    recursively under the directories matched by ``patterns``. Sharded by image file."""
    pairs = _folder_images(patterns)
    process_index, process_count = process_defaults(process_index, process_count)
    mine, shard_records = split_for_process(pairs, process_index, process_count)
    images = tf.constant([p for p, _ in mine])
    roots = tf.constant([r for _, r in mine])
    ds = tf.data.Dataset.from_tensor_slices((images, roots))
    if shuffle_files and len(mine) > 1:
        ds = ds.shuffle(len(mine), seed=int(seed), reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if shard_records:
        ds = ds.shard(process_count, process_index)

    def read(path, root):
        def py(p, r):
            try:
                rec = read_folder_record(p, r, max_image_bytes, max_caption_bytes)
            except Exception:  # noqa: BLE001 - never raise into tf.data
                rec = _marker("unreadable_file", p)
            return tuple(rec[k] for k in RAW_SIGNATURE)
        out = tf.numpy_function(py, [path, root], [tf.string] * 4, stateful=False)
        return {k: tf.ensure_shape(v, ()) for k, v in zip(RAW_SIGNATURE, out)}
    ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _options(ds)


# ----------------------------------------------------------------------------- tfds

def _feature(example, name: str):
    value = example
    for part in name.split("/"):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ReaderError(f"The tfds dataset has no feature '{name}' (at '{part}': have "
                              f"{have}). Set image_feature / caption_feature in the input config.")
        value = value[part]
    return value


def read_tfds(name: str, *, split: str = "train", data_dir: str | None = None,
              image_feature: str = "image", caption_feature: str = "caption",
              caption_choice: str = "random", seed: int = 0, process_index: int | None = None,
              process_count: int | None = None, repeat: bool = False,
              shuffle_files: bool = True) -> tf.data.Dataset:
    """Raw records of a prepared tfds dataset read from ``data_dir`` (never downloads).

    ``caption_feature`` may be a path into nested features ('captions/text' for
    coco_captions); when it holds a sequence of captions, ``caption_choice`` picks one per
    example: 'first', or 'random' (a seeded random stream drawn anew on every pass, so each
    epoch may pick another, deterministically). Images are read still encoded
    (tfds.decode.SkipDecoding).
    """

    if caption_choice not in ("first", "random"):
        raise ReaderError(f"caption_choice must be 'first' or 'random', got {caption_choice!r}.")
    if name == "shapes":
        try:  # registers the builder class; without it tfds reads the prepared files anyway
            import unclip_jax.data.shapes_builder  # noqa: F401
        except ImportError:
            pass
    process_index, process_count = process_defaults(process_index, process_count)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends
        raise ReaderError(f"tfds dataset '{name}' not found in data_dir={data_dir!r}: {e}. "
                          "Prepare it there first (tfds build / download_and_prepare); the "
                          "input pipeline never downloads.") from None
    if split not in builder.info.splits and "[" not in split:
        raise ReaderError(f"tfds dataset '{name}' has no split '{split}' (have "
                          f"{sorted(builder.info.splits)}). Set tfds_split in the input config.")
    if process_count > 1:
        split = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    top_image = image_feature.split("/")[0]
    read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=int(seed),
                                  shuffle_reshuffle_each_iteration=True)
    try:
        ds = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                read_config=read_config,
                                decoders={top_image: tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001 - AssertionError "not prepared" and friends
        raise ReaderError(f"tfds dataset '{name}' (split {split}) cannot be read from "
                          f"data_dir={data_dir!r}: {e}. Prepare it there first; the input "
                          "pipeline never downloads.") from None
    if repeat:
        ds = ds.repeat()
    caption_spec = _feature(ds.element_spec, caption_feature)
    _feature(ds.element_spec, image_feature)
    if caption_spec.dtype != tf.string:
        raise ReaderError(f"tfds feature '{caption_feature}' is {caption_spec.dtype.name}, not "
                          "text. Set caption_feature to a Text feature.")
    sequence = caption_spec.shape.rank == 1

    def to_raw(draw, ex):
        caption = _feature(ex, caption_feature)
        if sequence:
            n = tf.shape(caption, out_type=tf.int64)[0]
            if caption_choice == "first":
                pick = tf.constant(0, tf.int64)
            else:
                pick = tf.math.floormod(draw, tf.maximum(n, 1))
            caption = tf.cond(n > 0, lambda: tf.gather(caption, tf.minimum(pick, n - 1)),
                              lambda: tf.constant(""))
        return {"key": ex["tfds_id"], "image_bytes": _feature(ex, image_feature),
                "caption": caption, "error": tf.constant(b"")}
    # A seeded random stream drawn anew on every pass (also when the caller repeats this
    # finite dataset): each epoch may pick another caption, deterministically.
    draws = tf.data.Dataset.random(seed=int(seed) * 7 + 1, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((draws, ds)).map(to_raw, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True)
    return _options(ds)


__all__ = [
    "IMAGE_EXTENSIONS", "RAW_SIGNATURE", "READER_ERRORS", "ReaderError", "iter_tar_records",
    "iter_tfrecord_records", "process_defaults", "read_folder", "read_folder_record",
    "read_tfds", "read_tfrecord", "read_webdataset", "resolve_files", "split_for_process",
    "tar_to_tfrecord",
]
