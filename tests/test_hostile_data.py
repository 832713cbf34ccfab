"""Hostile records and shards through the input pipeline (issue 14, items 5 and 6).

Every hostile record is skipped and counted by reason (or kept, converted and counted), the good
records beside it still come through, nothing raises but one UserError, and nothing hangs:
every pipeline run is bounded (a thread joined with a timeout).

Cheap by construction: building a tf.data pipeline is the slow part, so the per-record cases
share one pipeline run per reader (a module fixture writes one shard set holding every case
and reads it once); each parametrized case then checks its own record. Only the cases that
must stop a pipeline (nothing usable) build one each.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_hostile_data.py
"""
import gzip
import io
import os
import struct
import tarfile
import tempfile
import threading
import zlib

import numpy as np
import pytest
import tensorflow as tf

from data_fixtures import encode, image_array
from unclip_jax.data import images, readers
from unclip_jax.data.input_pipeline import (COUNTERS, InputConfigError, InputDataError,
                                            decode_caption, default_input_config, make_input)
from unclip_jax.errors import UserError

TIMEOUT = 120  # seconds for one pipeline run: far above what it takes, far below a hang


def bounded(fn, timeout=TIMEOUT):
    """fn() in a thread: its result, or its exception re-raised; fails if it does not end."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the input pipeline did not finish in {timeout} s (a hang)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def run_input(cfg, batch=1):
    """(records {key: caption}, counts) of a finite input, bounded."""
    def go():
        inp = make_input(cfg, global_batch_size=batch, seed=0, process_index=0,
                         process_count=1)
        got = {}
        for b in inp:
            for key, caption in zip(b["key"], b["caption"]):
                got[key] = caption
        return got, inp.counts()
    return bounded(go)


def stop_of(cfg):
    """The InputDataError (and counts) of an input that must stop, bounded."""
    def go():
        inp = make_input(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
        with pytest.raises(InputDataError) as info:
            for _ in range(1000):
                next(inp)
        return str(info.value), inp.counts()
    return bounded(go)


# ----------------------------------------------------------------------------- image bytes

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of ``array`` (uint16 [H, W, C]); colour type 0 grey, 4 grey + alpha,
    2 RGB, 6 RGBA (PIL cannot write these)."""
    h, w = array.shape[:2]
    raw = b"".join(b"\0" + array[r].astype(">u2").tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's header)."""
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG with its SOF0 dimensions patched to width x height."""
    data = bytearray(encode(image_array(3), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A VP8X WebP header declaring a width x height canvas."""
    body = (b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little"))
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def bmp_declaring(width: int, height: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHH", 40, width,
                                                                       height, 1, 24) + b"\0" * 24)


def gif_frames(n: int, size: int) -> bytes:
    from PIL import Image
    frames = [Image.fromarray(np.full((size, size, 3), 30 * i, np.uint8)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def animated_webp() -> bytes:
    from PIL import Image
    rng = np.random.RandomState(0)
    frames = [Image.fromarray(rng.randint(0, 255, (16, 16, 3)).astype(np.uint8))
              for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    return buf.getvalue()


GOOD_PNG = encode(image_array(1))
GOOD_JPEG = encode(image_array(2), "JPEG", quality=95)

# ----------------------------------------------------------------------------- tar cases
# (case id, members [(name, bytes)], expected: 'kept' or the reason it is skipped). The key of
# a case is its id. The shared run uses max_image_pixels=10_000, max_image_bytes=64 KiB,
# max_caption_bytes=1 KiB, min_image_size=2, context_length=16.
CAP = b"a red square"
rgb12 = image_array(4)
alpha12 = np.full(rgb12.shape[:2], 255, np.uint8)
alpha12[:, :6] = 0
TAR_CASES = [
    ("zero_byte_image", [("zero_byte_image.jpg", b""), ("zero_byte_image.txt", CAP)],
     "undecodable"),
    ("one_by_one", [("one_by_one.png", encode(image_array(1, 1, 1))), ("one_by_one.txt", CAP)],
     "too_small"),
    ("two_by_two", [("two_by_two.png", encode(image_array(1, 2, 2))), ("two_by_two.txt", CAP)],
     "kept"),
    ("text_named_jpg", [("text_named_jpg.jpg", b"this is no image\n" * 20),
                        ("text_named_jpg.txt", CAP)], "undecodable"),
    ("html_named_png", [("html_named_png.png", b"<html><body>404</body></html>"),
                        ("html_named_png.txt", CAP)], "undecodable"),
    ("truncated_jpeg", [("truncated_jpeg.jpg", GOOD_JPEG[:len(GOOD_JPEG) // 2]),
                        ("truncated_jpeg.txt", CAP)], "undecodable"),
    ("truncated_png", [("truncated_png.png", GOOD_PNG[:len(GOOD_PNG) // 2]),
                       ("truncated_png.txt", CAP)], "undecodable"),
    ("jpeg_without_frame", [("jpeg_without_frame.jpg", GOOD_JPEG[:20]),
                            ("jpeg_without_frame.txt", CAP)], "undecodable"),
    ("png_zero_width", [("png_zero_width.png", png_declaring(0, 10)),
                        ("png_zero_width.txt", CAP)], "undecodable"),
    ("png_bomb_60000", [("png_bomb_60000.png", png_declaring(60000, 60000)),
                        ("png_bomb_60000.txt", CAP)], "too_large"),
    ("png_20000_square", [("png_20000_square.png", png_declaring(20000, 20000)),
                          ("png_20000_square.txt", CAP)], "too_large"),
    ("jpeg_bomb", [("jpeg_bomb.jpg", jpeg_declaring(65000, 65000)), ("jpeg_bomb.txt", CAP)],
     "too_large"),
    ("real_png_over_limit", [("real_png_over_limit.png", encode(image_array(5, 120, 120))),
                             ("real_png_over_limit.txt", CAP)], "too_large"),
    ("gif_many_frames", [("gif_many_frames.gif", gif_frames(8, 40)),
                         ("gif_many_frames.txt", CAP)], "too_large"),
    ("gif_one_frame", [("gif_one_frame.gif", gif_frames(1, 40)), ("gif_one_frame.txt", CAP)],
     "kept"),
    ("animated_webp", [("animated_webp.webp", animated_webp()), ("animated_webp.txt", CAP)],
     "undecodable"),
    ("webp_canvas_bomb", [("webp_canvas_bomb.webp", webp_declaring(16384, 16384)),
                          ("webp_canvas_bomb.txt", CAP)], "too_large"),
    ("bmp_bomb", [("bmp_bomb.bmp", bmp_declaring(50000, -50000)), ("bmp_bomb.txt", CAP)],
     "too_large"),
    ("image_bytes_over_limit", [("image_bytes_over_limit.png",
                                 GOOD_PNG + b"\0" * (70 << 10)),
                                ("image_bytes_over_limit.txt", CAP)], "too_large"),
    ("caption_bytes_over_limit", [("caption_bytes_over_limit.png", GOOD_PNG),
                                  ("caption_bytes_over_limit.txt", b"word " * 400)],
     "caption_too_large"),
    ("latin1_caption", [("latin1_caption.png", GOOD_PNG),
                        ("latin1_caption.txt", "café crème brûlée".encode("latin-1"))],
     "kept"),
    ("cp1252_caption", [("cp1252_caption.png", GOOD_PNG),
                        ("cp1252_caption.txt", "\u201cquoted\u201d \u20ac5".encode("cp1252"))],
     "kept"),
    ("utf16_bom_caption", [("utf16_bom_caption.png", GOOD_PNG),
                           ("utf16_bom_caption.txt", "a blue circle".encode("utf-16"))],
     "kept"),
    ("utf16le_no_bom_caption", [("utf16le_no_bom_caption.png", GOOD_PNG),
                                ("utf16le_no_bom_caption.txt",
                                 "a green triangle".encode("utf-16-le"))], "kept"),
    ("utf8_bom_caption", [("utf8_bom_caption.png", GOOD_PNG),
                          ("utf8_bom_caption.txt", b"\xef\xbb\xbfa grey disc")], "kept"),
    ("control_chars_caption", [("control_chars_caption.png", GOOD_PNG),
                               ("control_chars_caption.txt", b"a\x00red\x07square\x1b")],
     "kept"),
    ("only_controls_caption", [("only_controls_caption.png", GOOD_PNG),
                               ("only_controls_caption.txt", b"\x00\x01\x02\x7f")],
     "empty_caption"),
    ("empty_caption", [("empty_caption.png", GOOD_PNG), ("empty_caption.txt", b"")],
     "empty_caption"),
    ("whitespace_caption", [("whitespace_caption.png", GOOD_PNG),
                            ("whitespace_caption.txt", b" \t\r\n ")], "empty_caption"),
    ("image_without_caption", [("image_without_caption.png", GOOD_PNG)], "missing_caption"),
    ("caption_without_image", [("caption_without_image.txt", CAP)], "missing_image"),
    ("tiff_is_no_image_ext", [("tiff_is_no_image_ext.tiff", GOOD_PNG),
                              ("tiff_is_no_image_ext.txt", CAP)], "missing_image"),
    ("upper_case_ext", [("upper_case_ext.PNG", GOOD_PNG), ("upper_case_ext.TXT", CAP)], "kept"),
    ("png16_grey", [("png16_grey.png", png16(np.full((6, 6, 1), 65535, np.uint16), 0)),
                    ("png16_grey.txt", CAP)], "kept"),
    ("png16_grey_alpha", [("png16_grey_alpha.png",
                           png16(np.full((6, 6, 2), 40000, np.uint16), 4)),
                          ("png16_grey_alpha.txt", CAP)], "kept"),
    ("png16_rgba", [("png16_rgba.png", png16(np.full((6, 6, 4), 30000, np.uint16), 6)),
                    ("png16_rgba.txt", CAP)], "kept"),
    ("cmyk_jpeg", [("cmyk_jpeg.jpg", encode(np.dstack([rgb12, alpha12]), "JPEG", mode="CMYK")),
                   ("cmyk_jpeg.txt", CAP)], "kept"),
    ("rgba_png", [("rgba_png.png", encode(np.dstack([rgb12, alpha12]), mode="RGBA")),
                  ("rgba_png.txt", CAP)], "kept"),
    ("path_traversal", [("../../etc/path_traversal.png", GOOD_PNG),
                        ("../../etc/path_traversal.txt", CAP)], "bad_record"),
    ("absolute_name", [("/tmp/absolute_name.png", GOOD_PNG), ("/tmp/absolute_name.txt", CAP)],
     "bad_record"),
]
# Cases whose members do not all count as one record.
EXTRA_COUNTS = {"path_traversal": 2, "absolute_name": 2}
GOOD_TAR = [(f"good{i}", encode(image_array(10 + i)), f"good caption {i}") for i in range(4)]


def _tar_bytes(members, fmt=tarfile.PAX_FORMAT, links=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _good_members(good):
    out = []
    for key, png, caption in good:
        out += [(f"{key}.png", png), (f"{key}.txt", caption.encode())]
    return out


@pytest.fixture(scope="module")
def tar_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_tar")
    members = _good_members(GOOD_TAR[:2])
    for _, case_members, _ in TAR_CASES:
        members += case_members
    members += _good_members(GOOD_TAR[2:])
    (d / "a.tar").write_bytes(_tar_bytes(members, links=[("link.png", "/etc/passwd")]))
    # shard-level damage, beside the good shard
    (d / "b_empty.tar").write_bytes(_tar_bytes([]))
    (d / "c_junk.tar").write_bytes(b"\x07" * 1500)
    (d / "d_zero.tar").write_bytes(b"")
    (d / "e_dir.tar").mkdir()
    cut = _tar_bytes(_good_members([("cut_kept", GOOD_PNG, "kept before the cut"),
                                    ("cut_lost", GOOD_PNG, "lost in the cut")]))
    (d / "f_cut.tar").write_bytes(cut[:cut.index(b"cut_lost.png") + 600])
    gz = gzip.compress(_tar_bytes(_good_members([("gz_ok", GOOD_PNG, "a gzipped record")])
                                  + [("gz_pad.json", b"\0" * 8192)]), mtime=0)
    (d / "g_truncated.tar.gz").write_bytes(gz[:len(gz) // 2])
    corrupt = bytearray(gz)
    corrupt[10:16] = b"\xff" * 6                       # the first deflate block header
    (d / "g_corrupt.tar.gz").write_bytes(bytes(corrupt))
    (d / "h_good.tar.gz").write_bytes(gzip.compress(_tar_bytes(_good_members(
        [("gz_good", GOOD_JPEG, "a good gzipped record")]))))
    latin_name = "caf\udce9".encode("utf-8", "surrogateescape").decode("utf-8",
                                                                       "surrogateescape")
    (d / "i_names.tar").write_bytes(_tar_bytes(
        [(f"{latin_name}.png", GOOD_PNG), (f"{latin_name}.txt", b"a latin-1 named member")],
        fmt=tarfile.GNU_FORMAT))
    cfg = dict(kind="webdataset", paths=[str(d / "*.tar"), str(d / "*.tar.gz")], image_size=8,
               context_length=16, shuffle_buffer=8, repeat=False, min_image_size=2,
               max_image_pixels=10_000, max_image_bytes=64 << 10, max_caption_bytes=1 << 10)
    return run_input(cfg)


def _expected_tar_counts():
    want = {name: 0 for name in COUNTERS}
    for case, _, outcome in TAR_CASES:
        n = EXTRA_COUNTS.get(case, 1)
        want["read"] += n
        want["kept" if outcome == "kept" else outcome] += n
    return want


@pytest.mark.parametrize("case,members,outcome", TAR_CASES, ids=[c[0] for c in TAR_CASES])
def test_hostile_tar_record(tar_run, case, members, outcome):
    got, counts = tar_run
    keys = set(got)
    if outcome == "kept":
        assert case in keys, (case, sorted(keys))
    else:
        assert not any(case in k for k in keys), (case, sorted(keys))
        assert counts[outcome] >= EXTRA_COUNTS.get(case, 1), (outcome, counts)


def test_hostile_tar_counts_are_exact(tar_run):
    got, counts = tar_run
    want = _expected_tar_counts()
    # the good records and the shard-level cases
    want["read"] += 4 + 1 + 1 + 1 + 1                  # good, link, cut_kept, gz_good, latin
    want["kept"] += 4 + 1 + 1 + 1                       # good, cut_kept, gz_good, latin name
    want["bad_record"] += 1                             # the symlink member
    want["truncated_shard"] += 5                        # junk, zero-byte, cut, 2 damaged gz
    want["unreadable_file"] += 1                        # a directory named .tar
    want["read"] += 1                                   # (unreadable files count as read)
    kept_conversions = {"converted_16bit": 3, "converted_greyscale": 2, "converted_rgba": 3,
                        "converted_cmyk": 1, "caption_recoded": 4}
    for name, n in kept_conversions.items():
        want[name] = n
    want["dropped_remainder"] = 0
    # the truncated gzip yields its one record before the damage
    gz_ok = int("gz_ok" in got)
    want["read"] += gz_ok
    want["kept"] += gz_ok
    assert counts == want


def test_good_tar_records_come_through_intact(tar_run):
    got, _ = tar_run
    for key, _, caption in GOOD_TAR:
        assert got[key] == caption
    assert got["cut_kept"] == "kept before the cut" and "cut_lost" not in got
    assert got["gz_good"] == "a good gzipped record"
    assert "caf\ufffd" in got and got["caf\ufffd"] == "a latin-1 named member"


@pytest.mark.parametrize("case,text", [
    ("latin1_caption", "café crème brûlée"),
    ("cp1252_caption", "\u201cquoted\u201d \u20ac5"),
    ("utf16_bom_caption", "a blue circle"),
    ("utf16le_no_bom_caption", "a green triangle"),
    ("utf8_bom_caption", "a grey disc"),
    ("control_chars_caption", "a red square"),
])
def test_recoded_captions_read_as_written(tar_run, case, text):
    got, _ = tar_run
    assert got[case] == text


# ----------------------------------------------------------------------------- TFRecord cases

def _feature(value):
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    if isinstance(value, float):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[]))   # empty list


def _example(**features) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        k: _feature(v) for k, v in features.items()})).SerializeToString()


def _frame(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4


TFRECORD_CASES = [
    ("tf_not_a_proto", b"\xff\xfe garbage that is no protocol buffer", "bad_record"),
    ("tf_image_int64", _example(image=7, caption=CAP, key=b"tf_image_int64"), "bad_record"),
    ("tf_caption_float", _example(image=GOOD_PNG, caption=1.5, key=b"tf_caption_float"),
     "bad_record"),
    ("tf_image_empty_list", _example(image=None, caption=CAP, key=b"tf_image_empty_list"),
     "bad_record"),
    ("tf_no_caption", _example(image=GOOD_PNG, key=b"tf_no_caption"), "missing_caption"),
    ("tf_no_image", _example(caption=CAP, key=b"tf_no_image"), "missing_image"),
    ("tf_bomb", _example(image=png_declaring(30000, 30000), caption=CAP, key=b"tf_bomb"),
     "too_large"),
    ("tf_image_bytes_over_limit", _example(image=GOOD_PNG + b"\0" * (70 << 10), caption=CAP,
                                           key=b"tf_image_bytes_over_limit"), "too_large"),
    ("tf_record_over_limit", _example(image=GOOD_PNG, caption=CAP, pad=b"\0" * (1200 << 10),
                                      key=b"tf_record_over_limit"), "too_large"),
    ("tf_caption_over_limit", _example(image=GOOD_PNG, caption=b"x" * 2000,
                                       key=b"tf_caption_over_limit"), "caption_too_large"),
    ("tf_latin1_caption", _example(image=GOOD_PNG, caption="naïve".encode("latin-1"),
                                   key=b"tf_latin1_caption"), "kept"),
    ("tf_key_int64", _example(image=GOOD_PNG, caption=b"an int key", key=5), "kept"),
    ("tf_undecodable", _example(image=b"\x89PNG\r\n\x1a\n broken", caption=CAP,
                                key=b"tf_undecodable"), "undecodable"),
]


def _tfrecord_bytes(payloads) -> bytes:
    """A TFRecord file with true CRCs (the native reader verifies them)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for p in payloads:
                w.write(p)
        with open(path, "rb") as f:
            return f.read()


@pytest.fixture(scope="module", params=["native", "python"])
def tfrecord_run(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("hostile_tfrecord")
    good = [_example(image=encode(image_array(20 + i)), caption=f"tf good {i}".encode(),
                     key=f"tf_good{i}".encode()) for i in range(3)]
    (d / "a.tfrecord").write_bytes(_tfrecord_bytes(good[:1] + [c[1] for c in TFRECORD_CASES]
                                                   + good[1:]))
    gz_good = _example(image=GOOD_PNG, caption=b"gzipped tfrecord", key=b"tf_gz_good")
    (d / "b.tfrecord").write_bytes(gzip.compress(_tfrecord_bytes([gz_good])))
    many = gzip.compress(_tfrecord_bytes([gz_good] * 20) + os.urandom(3000), mtime=0)
    (d / "c_cut_gz.tfrecord").write_bytes(many[:len(many) - 1500])     # cut in the noise
    corrupt = bytearray(many)
    corrupt[10:16] = b"\xff" * 6                       # the first deflate block header
    (d / "c_corrupt_gz.tfrecord").write_bytes(bytes(corrupt))
    (d / "d_truncated.tfrecord").write_bytes(_frame(good[0])[:-10])
    (d / "e_huge_length.tfrecord").write_bytes(struct.pack("<Q", 1 << 62) + b"\0" * 40)
    (d / "f_empty.tfrecord").write_bytes(b"")
    cfg = dict(kind="tfrecord", paths=[str(d / "*.tfrecord")], image_size=8, context_length=0,
               shuffle_buffer=8, repeat=False, max_image_pixels=10_000,
               max_image_bytes=64 << 10, max_caption_bytes=1 << 10,
               tfrecord_reader=request.param)
    return run_input(cfg)


@pytest.mark.parametrize("case,payload,outcome", TFRECORD_CASES,
                         ids=[c[0] for c in TFRECORD_CASES])
def test_hostile_tfrecord_record(tfrecord_run, case, payload, outcome):
    got, counts = tfrecord_run
    if case == "tf_key_int64":          # a key feature of the wrong type: PATH:INDEX instead
        assert any(k.endswith("a.tfrecord:12") for k in got), sorted(got)
    elif outcome == "kept":
        assert case in got
    else:
        assert case not in got and counts[outcome] >= 1, (outcome, counts)


def test_hostile_tfrecord_counts_are_exact(tfrecord_run):
    got, counts = tfrecord_run
    want = {name: 0 for name in COUNTERS}
    for _, _, outcome in TFRECORD_CASES:
        want["read"] += 1
        want["kept" if outcome == "kept" else outcome] += 1
    gz_records = sum(1 for k in got if k == "tf_gz_good")  # keys repeat: count the dict once
    want["read"] += 3 + 1
    want["kept"] += 3 + 1
    want["caption_recoded"] = 1
    want["truncated_shard"] = 4         # cut gz, corrupt gz, truncated, impossible length
    want["dropped_remainder"] = 0
    # the cut gzip yields the 20 records before the cut (the same key each time)
    extra = counts["read"] - want["read"]
    assert extra == 20 and counts["kept"] - want["kept"] == extra and gz_records == 1
    want["read"] += extra
    want["kept"] += extra
    assert counts == want
    for i in range(3):
        assert got[f"tf_good{i}"] == f"tf good {i}"
    assert got["tf_latin1_caption"] == "naïve"


# ----------------------------------------------------------------------------- folder cases

FOLDER_CASES = [
    ("f_no_caption", {"f_no_caption.png": GOOD_PNG}, "missing_caption"),
    ("f_not_image", {"f_not_image.png": b"plain text", "f_not_image.txt": CAP},
     "undecodable"),
    ("f_caption_over_limit", {"f_caption_over_limit.png": GOOD_PNG,
                              "f_caption_over_limit.txt": b"y" * 5000}, "caption_too_large"),
    ("f_image_over_limit", {"f_image_over_limit.png": GOOD_PNG + b"\0" * (70 << 10),
                            "f_image_over_limit.txt": CAP}, "too_large"),
    ("f_bomb", {"f_bomb.png": png_declaring(40000, 40000), "f_bomb.txt": CAP}, "too_large"),
    ("f_latin1", {"f_latin1.png": GOOD_PNG, "f_latin1.txt": "déjà vu".encode("latin-1")},
     "kept"),
    ("f_caption_is_folder", {"f_caption_is_folder.png": GOOD_PNG,
                             "f_caption_is_folder.txt/": None}, "missing_caption"),
    ("f_zero_bytes", {"f_zero_bytes.jpg": b"", "f_zero_bytes.txt": CAP}, "undecodable"),
]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_folder")
    for i in range(2):
        (d / f"good{i}.png").write_bytes(encode(image_array(30 + i)))
        (d / f"good{i}.txt").write_text(f"folder good {i}")
    for _, files, _ in FOLDER_CASES:
        for name, data in files.items():
            if data is None:
                (d / name).mkdir()
            else:
                (d / name).write_bytes(data)
    cfg = dict(kind="folder", paths=[str(d)], image_size=8, context_length=0, shuffle_buffer=4,
               repeat=False, max_image_pixels=10_000, max_image_bytes=64 << 10,
               max_caption_bytes=1 << 10)
    return run_input(cfg)


@pytest.mark.parametrize("case,files,outcome", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_hostile_folder_record(folder_run, case, files, outcome):
    got, counts = folder_run
    if outcome == "kept":
        assert case in got
    else:
        assert case not in got and counts[outcome] >= 1, (outcome, counts)


def test_hostile_folder_counts_are_exact(folder_run):
    got, counts = folder_run
    want = {name: 0 for name in COUNTERS}
    for _, _, outcome in FOLDER_CASES:
        want["read"] += 1
        want["kept" if outcome == "kept" else outcome] += 1
    want["read"] += 2
    want["kept"] += 2
    want["caption_recoded"] = 1
    want["dropped_remainder"] = 0
    assert counts == want
    assert got["good0"] == "folder good 0" and got["f_latin1"] == "déjà vu"


# ----------------------------------------------------------------------------- nothing usable

def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


STOP_CASES = [
    ("one_empty_tar", "webdataset", lambda d: _write(d / "e.tar", _tar_bytes([])),
     "no records"),
    ("junk_tar", "webdataset", lambda d: _write(d / "j.tar", b"\x01" * 2000), "no records"),
    ("all_undecodable", "webdataset", lambda d: _write(d / "u.tar", _tar_bytes(
        [m for i in range(3) for m in ((f"k{i}.jpg", b"garbage"), (f"k{i}.txt", CAP))])),
     "undecodable=3"),
    ("all_missing_captions", "webdataset", lambda d: _write(d / "m.tar", _tar_bytes(
        [(f"k{i}.png", GOOD_PNG) for i in range(3)])), "missing_caption=3"),
    ("all_too_large", "webdataset", lambda d: _write(d / "b.tar", _tar_bytes(
        [("k.png", png_declaring(20000, 20000)), ("k.txt", CAP)])), "too_large=1"),
    ("tfrecord_wrong_types", "tfrecord", lambda d: _write(d / "w.tfrecord", b"".join(
        _frame(_example(image=i, caption=CAP)) for i in range(3))), "bad_record=3"),
    ("tfrecord_empty_file", "tfrecord", lambda d: _write(d / "z.tfrecord", b""), "no records"),
    ("folder_all_missing_captions", "folder",
     lambda d: (_write(d / "a.png", GOOD_PNG), str(d))[1], "missing_caption=1"),
]


@pytest.mark.parametrize("case,kind,make,says", STOP_CASES, ids=[c[0] for c in STOP_CASES])
def test_input_with_nothing_usable_stops_with_a_user_error(tmp_path, case, kind, make, says):
    path = make(tmp_path)
    cfg = dict(kind=kind, paths=[path], image_size=8, context_length=0, shuffle_buffer=4,
               repeat=True)
    message, counts = stop_of(cfg)
    assert says in message and "\n" not in message, message
    assert counts["kept"] == 0
    assert issubclass(InputDataError, UserError)


def test_early_stop_after_unusable_records(tmp_path):
    members = [(f"k{i:02d}.jpg", b"nope") for i in range(12)] + \
        [(f"k{i:02d}.txt", CAP) for i in range(12)]
    path = _write(tmp_path / "many.tar", _tar_bytes(sorted(members)))
    cfg = dict(kind="webdataset", paths=[path], image_size=8, context_length=0,
               shuffle_buffer=0, repeat=True, stop_after_unusable=5)
    message, counts = stop_of(cfg)
    assert "first 5 records" in message and counts["read"] == 5 and counts["undecodable"] == 5


# ----------------------------------------------------------------------------- config values

@pytest.mark.parametrize("field,value", [
    ("max_image_pixels", 0), ("max_image_pixels", -5), ("max_image_bytes", 0),
    ("max_caption_bytes", -1), ("stop_after_unusable", -1), ("min_image_size", -2),
    ("shuffle_buffer", -3), ("cycle_length", 0), ("max_image_pixels", "huge"),
    ("image_size", 100_000), ("context_length", 10 ** 9), ("low_res_size", 128),
    ("paths", [5]), ("paths", [""]),
])
def test_bad_limits_are_refused_before_reading(tmp_path, field, value):
    cfg = dict(kind="webdataset", paths=[str(tmp_path / "*.tar")], context_length=0)
    cfg[field] = value
    with pytest.raises((InputConfigError, UserError), match=field):
        make_input(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_a_seed_beyond_64_bits_is_reduced_not_a_traceback(tmp_path):
    (tmp_path / "a.tar").write_bytes(_tar_bytes(_good_members(GOOD_TAR)))
    cfg = dict(kind="webdataset", paths=[str(tmp_path / "a.tar")], image_size=8,
               context_length=0, shuffle_buffer=4, repeat=False)

    def go():
        inp = make_input(cfg, global_batch_size=2, seed=2 ** 70 + 3, process_index=0,
                         process_count=1)
        return sorted(k for b in inp for k in b["key"])
    assert bounded(go) == [f"good{i}" for i in range(4)]


def test_default_limits_are_sane():
    cfg = default_input_config()
    assert cfg.max_image_pixels == 8192 * 8192 and cfg.stop_after_unusable > 0
    assert cfg.max_caption_bytes == 64 << 10 and cfg.max_image_bytes == 128 << 20
    # the 20000 x 20000 image is refused by its header at the default limit
    reason = images.header_reason(tf.constant(png_declaring(20000, 20000)),
                                  cfg.max_image_pixels)
    assert reason.numpy() == b"too_large"
    ok = images.header_reason(tf.constant(png_declaring(8000, 6000)), cfg.max_image_pixels)
    assert ok.numpy() == b""


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("raw,text,recoded", [
    (b"plain ascii", "plain ascii", False),
    ("ünïcödé".encode(), "ünïcödé", False),
    (b"\xef\xbb\xbfwith bom", "with bom", False),
    ("caf\u00e9".encode("latin-1"), "caf\u00e9", True),
    (b"\x93smart\x94 \x80 \x81", "\u201csmart\u201d \u20ac \x81", True),
    ("\u4e2d\u6587".encode("utf-16"), "\u4e2d\u6587", True),
    ("big endian".encode("utf-16-be"), "big endian", True),
    ("thirty-two".encode("utf-32"), "thirty-two", True),
    (b"tab\tnew\nline\x00nul", "tab\tnew\nline nul", False),
    (b"\xff\xfe\x00", "\u00ff\u00fe ", True),             # a broken UTF-16 BOM: cp1252
])
def test_caption_decoding_rule(raw, text, recoded):
    assert decode_caption(raw) == (text, recoded)


@pytest.mark.parametrize("data,fmt,size,problem", [
    (png_declaring(300, 200), "png", (200, 300), ""),
    (jpeg_declaring(640, 480), "jpeg", (480, 640), ""),
    (webp_declaring(100, 50), "webp", (50, 100), ""),
    (bmp_declaring(7, -9), "bmp", (9, 7), ""),
    (gif_frames(3, 10), "gif", (10, 10), ""),
    (b"", "", (0, 0), "empty"),
    (b"\xff\xd8\xff\xd9", "jpeg", (0, 0), "no frame"),
    (b"GIF89a\x01", "gif", (0, 0), "truncated"),
    (animated_webp(), "webp", (0, 0), "animated"),
    (b"\x00" * 64, "", (0, 0), "no known"),
])
def test_image_header(data, fmt, size, problem):
    header = images.image_header(data)
    assert header.format == fmt and (header.height, header.width) == size
    assert problem in header.problem and bool(problem) == bool(header.problem)
    if fmt == "gif" and not problem:
        assert header.frames == 3


@pytest.mark.parametrize("color_type,channels,value,want", [
    (0, 1, 65535, [255, 255, 255]),
    (0, 1, 257, [1, 1, 1]),
    (4, 2, (32896, 65535), [128, 128, 128]),            # opaque grey
    (4, 2, (32896, 0), [255, 255, 255]),                # transparent: white
    (2, 3, (65535, 0, 32896), [255, 0, 128]),
    (6, 4, (0, 0, 0, 65535), [0, 0, 0]),
    (6, 4, (0, 0, 0, 0), [255, 255, 255]),
])
def test_16bit_png_scaled_by_257(color_type, channels, value, want):
    arr = np.zeros((3, 4, channels), np.uint16) + np.asarray(value, np.uint16)
    image, flags = images.decode_rgb(tf.constant(png16(arr, color_type)))
    np.testing.assert_array_equal(image.numpy(), np.broadcast_to(want, (3, 4, 3)))
    assert int(flags) & images.FLAG_16BIT


def test_tar_reader_never_raises_on_a_member_name_that_is_not_utf8(tmp_path):
    name = b"x\xe9".decode("utf-8", "surrogateescape")
    path = _write(tmp_path / "n.tar", _tar_bytes([(f"{name}.png", GOOD_PNG),
                                                  (f"{name}.txt", CAP)], fmt=tarfile.GNU_FORMAT))
    out = list(readers.iter_tar_records(path))
    assert [(r["key"], r["error"]) for r in out] == [(b"x\xe9", b"")]


def test_oversized_tar_member_is_not_read(tmp_path):
    # a header claiming 1 TB of image data: skipped by size, then the shard ends damaged
    body = b""
    for name, data in _good_members(GOOD_TAR[:1]):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        body += info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)
    info = tarfile.TarInfo("big.png")
    info.size = 1 << 40
    path = _write(tmp_path / "big.tar", body + info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 2048)
    out = list(readers.iter_tar_records(path, 1 << 20, 1 << 10))
    assert [r["error"] for r in out] == [b"", b"truncated_shard"]


# ----------------------------------------------------------------------------- embeddings

def _embedding_example(dim=3, length=4) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        "caption": _feature(b"an embedded caption"),
        "text_tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=[1] * length)),
        "text_mask": tf.train.Feature(int64_list=tf.train.Int64List(value=[1] * length)),
        "text_embed": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5] * dim)),
        "image_embed": tf.train.Feature(float_list=tf.train.FloatList(value=[0.25] * dim)),
    })).SerializeToString()


def _embeddings_folder(d, records, **manifest_changes):
    import json
    from unclip_jax.data import precompute
    d.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(d / "e-0.tfrecord")) as w:
        for r in records:
            w.write(r)
    manifest = {"format": precompute.FORMAT, "version": 1, "count": len(records),
                "fields": ["caption", "text_tokens", "text_mask", "text_embed", "image_embed"],
                "dims": {"context_length": 4, "text_embed": 3, "image_embed": 3,
                         "text_hidden": None, "image_size": None},
                "text_hidden_dtype": None, "files": ["e-0.tfrecord"], "counts": [len(records)]}
    manifest.update(manifest_changes)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return str(d)


@pytest.mark.parametrize("changes,says", [
    (dict(files=["../../../../etc/passwd"], counts=[1]), "not a plain file name"),
    (dict(files=["/etc/passwd"], counts=[1]), "not a plain file name"),
    (dict(files="e-0.tfrecord"), "'files' must be a list"),
    (dict(counts=[1, 2]), "'counts'"),
    (dict(counts=["many"]), "'counts'"),
    (dict(fields=["caption", "bogus"]), "'fields'"),
    (dict(dims={"context_length": "many", "text_embed": 3, "image_embed": 3}),
     "dims.context_length"),
    (dict(dims={"context_length": 4, "text_embed": -3, "image_embed": 3}), "dims.text_embed"),
    (dict(fields=["caption", "text_hidden"]), "text_hidden"),
    (dict(text_hidden_dtype="int8"), "text_hidden_dtype"),
])
def test_hostile_embeddings_manifest_is_refused(tmp_path, changes, says):
    from unclip_jax.data.precompute import PrecomputeError
    folder = _embeddings_folder(tmp_path / "emb", [_embedding_example()], **changes)
    cfg = dict(kind="embeddings", paths=[folder], context_length=0, shuffle_buffer=0)
    with pytest.raises(PrecomputeError, match=says) as info:
        make_input(cfg, global_batch_size=1, seed=0, process_index=0, process_count=1)
    assert isinstance(info.value, UserError)


def test_embeddings_manifest_that_is_a_list_is_refused(tmp_path):
    from unclip_jax.data.precompute import PrecomputeError
    folder = _embeddings_folder(tmp_path / "emb", [_embedding_example()])
    (tmp_path / "emb" / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(PrecomputeError, match="not an unclip-jax embeddings manifest"):
        make_input(dict(kind="embeddings", paths=[folder]), global_batch_size=1, seed=0,
                   process_index=0, process_count=1)


@pytest.mark.parametrize("records", [[], [_embedding_example(dim=5)] * 3, [b"junk"] * 2],
                         ids=["no_records", "wrong_sizes", "not_examples"])
def test_embeddings_with_nothing_usable_stop(tmp_path, records):
    folder = _embeddings_folder(tmp_path / "emb", records)
    cfg = dict(kind="embeddings", paths=[folder], context_length=0, shuffle_buffer=0,
               repeat=True)

    def go():
        inp = make_input(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
        with pytest.raises(InputDataError, match="no records"):
            next(inp)
    bounded(go)


def test_good_embeddings_still_read(tmp_path):
    folder = _embeddings_folder(tmp_path / "emb", [_embedding_example()] * 3)
    cfg = dict(kind="embeddings", paths=[folder], context_length=0, shuffle_buffer=0,
               repeat=True)
    batch = bounded(lambda: next(make_input(cfg, global_batch_size=2, seed=0, process_index=0,
                                            process_count=1)))
    assert batch["text_embed"].shape == (2, 3)


@pytest.mark.skipif(not hasattr(os, "mkfifo"),
                    reason="Windows has no named pipes to put among the inputs")
@pytest.mark.parametrize("kind,name", [("webdataset", "fifo.tar"), ("tfrecord", "fifo.tfrecord"),
                                       ("folder", "fifo.png")])
def test_a_fifo_among_the_inputs_is_not_waited_on(tmp_path, kind, name):
    """A named pipe would block a reader forever: it is an unreadable file, counted."""
    d = tmp_path / "in"
    d.mkdir()
    os.mkfifo(d / name)
    if kind == "webdataset":
        (d / "good.tar").write_bytes(_tar_bytes(_good_members(GOOD_TAR[:2])))
        pattern = str(d / "*.tar")
    elif kind == "tfrecord":
        (d / "good.tfrecord").write_bytes(_tfrecord_bytes(
            [_example(image=GOOD_PNG, caption=b"c", key=f"good{i}".encode()) for i in range(2)]))
        pattern = str(d / "*.tfrecord")
    else:
        for key, png, caption in GOOD_TAR[:2]:
            (d / f"{key}.png").write_bytes(png)
            (d / f"{key}.txt").write_text(caption)
        os.mkfifo(d / "fifo.txt")
        pattern = str(d)
    cfg = dict(kind=kind, paths=[pattern], image_size=8, context_length=0, shuffle_buffer=0,
               repeat=False)
    got, counts = run_input(cfg)
    assert sorted(got) == ["good0", "good1"] and counts["unreadable_file"] == 1


def test_tar_to_tfrecord_keeps_good_records_counts_bad_and_refuses_overwrite(tmp_path):
    # undecodable bytes are copied (decoding is the pipeline's job); no caption: not written
    members = _good_members(GOOD_TAR[:3]) + [("bad.jpg", b"junk"), ("bad.txt", CAP),
                                             ("lonely.png", GOOD_PNG)]
    (tmp_path / "s1.tar").write_bytes(_tar_bytes(members))
    out = tmp_path / "tf"
    report = readers.tar_to_tfrecord(str(tmp_path / "*.tar"), str(out))
    assert report["written"] == 4 and report["skipped"] == {"missing_caption": 1}
    recs = list(readers.iter_tfrecord_records(str(out / "s1.tfrecord")))
    assert [r["key"] for r in recs] == [b"good0", b"good1", b"good2", b"bad"]
    before = (out / "s1.tfrecord").read_bytes()
    (out / "mine.txt").write_text("the user's own file")
    with pytest.raises(UserError, match="already has s1.tfrecord"):
        readers.tar_to_tfrecord(str(tmp_path / "*.tar"), str(out))
    assert (out / "s1.tfrecord").read_bytes() == before
    readers.tar_to_tfrecord(str(tmp_path / "*.tar"), str(out), overwrite=True)
    assert (out / "mine.txt").read_text() == "the user's own file"
    assert sorted(os.listdir(out)) == ["mine.txt", "s1.tfrecord"]
