"""Writers of small image-caption datasets for the data tests (a helper module: test modules
import it, never each other)."""
import io
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------- data writers

def image_array(i: int, h: int = 12, w: int = 16) -> np.ndarray:
    """A distinct uint8 RGB image for index i (a gradient with an index-dependent colour)."""
    y, x = np.mgrid[:h, :w]
    return np.stack([(x * 13 + i * 37) % 256, (y * 17 + i * 11) % 256,
                     np.full_like(x, (i * 53) % 256)], -1).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt, **kw) if mode else \
        Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def png16_rgb(array16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = array16.shape
    raw = b"".join(b"\0" + array16[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_tar(path, members) -> None:
    """members: list of (name, bytes) in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_records(n: int, prefix: str = "", start: int = 0):
    """[(key, png bytes, caption, array)] of n distinct good records."""
    out = []
    for i in range(start, start + n):
        arr = image_array(i)
        out.append((f"{prefix}{i:06d}", encode(arr), f"caption number {i}", arr))
    return out


def write_shards(directory, n_shards: int, per_shard: int) -> dict:
    """webdataset shards of good PNG records; returns {key: (caption, array)}."""
    os.makedirs(directory, exist_ok=True)
    written = {}
    for s in range(n_shards):
        recs = sample_records(per_shard, prefix=f"s{s}_", start=s * per_shard)
        members = []
        for key, png, caption, arr in recs:
            members += [(f"{key}.png", png), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", b"{}")]
            written[key] = (caption, arr)
        write_tar(os.path.join(directory, f"{s:05d}.tar"), members)
    return written


