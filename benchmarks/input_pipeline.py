"""Images per second of the tf.data input pipeline (unclip_jax.data.input_pipeline) on this machine,
per thread count, so that the per-core rate and its scaling can be read off.

    .venv/bin/python benchmarks/input_pipeline.py [--batches 20] [--batch-size 32]
        [--threads 1,2,0] [--check]

Data, generated in a temporary folder (nothing downloaded), webdataset tar shards:
  jpeg64     64 x 64 JPEGs (quality 90; smooth gradients with shapes and mild noise, so the
             codec does real work), 512 records in 4 shards
  jpeg256    256 x 256 JPEGs, likewise, 256 records in 4 shards
  shapes128  Shapes-like 128 x 128 PNGs (flat coloured shapes on grey), 512 records
Each set is read as the tar shards themselves and (``--formats``) as the same records
converted once to TFRecord (unclip_jax.data.readers.tar_to_tfrecord), read by the native
TFRecord reader (tf.data ops only, no Python per record).
For each, the full pipeline as the trainer runs it (per-epoch shuffle, header check, decode,
CLIP tokenization with context 77, centre crop, antialiased bicubic resize) at image_size 64
(and 256 for jpeg256), with tf.data's thread pool limited to each of ``--threads``
(``tf.data.Options().threading.private_threadpool_size``, the input config's ``threads``;
0 = tf.data's default, every core). The images/s at 1 thread is the per-core rate; the ratio
at 2 threads is the scaling. The first 3 batches (graph tracing, shuffle-buffer fill) are not
timed. ``--check`` runs a tiny version (a few records, 2 batches) to show the script works;
its figures mean nothing.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py: machine report, command, tables)

import numpy as np  # noqa: E402

COLOURS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (235, 200, 20), (150, 50, 190),
           (20, 190, 200)]


def _shapes_image(rng, size: int):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 3)):
        side = size * (0.2 if rng.random() < 0.5 else 0.4)
        cx, cy = rng.uniform(side / 2, size - side / 2, 2)
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        colour = COLOURS[rng.integers(len(COLOURS))]
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return img


def _photo_like(rng, size: int):
    from PIL import Image
    y, x = np.mgrid[:size, :size] / size
    base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)),
                     np.sin(4 * (x + y) + rng.uniform(0, 6))], -1) * 80 + 128
    noise = rng.normal(0, 12, base.shape)
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    img.paste(_shapes_image(rng, size // 2), (size // 4, size // 4))
    return img


def write_dataset(folder: str, make, n: int, shards: int, fmt: str, **save_kw) -> int:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    ext = "png" if fmt == "PNG" else "jpg"
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(n // shards):
                buf = io.BytesIO()
                make(rng).save(buf, fmt, **save_kw)
                key = f"{s:05d}{i:04d}"
                for name, data in ((f"{key}.{ext}", buf.getvalue()),
                                   (f"{key}.txt", f"a large red circle at the top left {i}"
                                    .encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    total += len(data)
    return total


def measure(paths: str, image_size: int, low_res: int, batches: int, batch_size: int,
            threads: int = 0, warm_batches: int = 3, kind: str = "webdataset"):
    from unclip_jax.data.input_pipeline import make_input
    cfg = dict(kind=kind, paths=[paths], image_size=image_size, context_length=77,
               low_res_size=low_res, shuffle_buffer=256, repeat=True, threads=threads)
    inp = make_input(cfg, global_batch_size=batch_size, seed=0, process_index=0,
                     process_count=1)
    t0 = time.perf_counter()
    for _ in range(warm_batches):
        next(inp)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(inp)
    dt = time.perf_counter() - t0
    return batches * batch_size / dt, warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=20, help="timed batches per row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", default="1,2,0",
                   help="tf.data thread pool sizes to measure, comma separated (0: default)")
    p.add_argument("--formats", default="tar,tfrecord",
                   help="shard formats: tar (webdataset, Python tar reader) and/or tfrecord "
                        "(the same records converted once, read with tf.data's native ops)")
    p.add_argument("--check", action="store_true",
                   help="a tiny run that only shows the script works (figures mean nothing)")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.check:
        args.batches, args.batch_size = 2, 4
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import PIL
    import tensorflow as tf
    common.preamble("tf.data input pipeline throughput per thread count (webdataset shards, "
                    "one process)", notes=[
                        f"tensorflow {tf.__version__}, pillow {PIL.__version__}; batch "
                        f"{args.batch_size}, {args.batches} timed batches after 3 untimed; "
                        f"os.cpu_count() = {os.cpu_count()}"
                        + ("; --check: figures mean nothing" if args.check else "")])
    scale = 16 if args.check else 1
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "jpeg64 (JPEG q90)": (os.path.join(tmp, "jpeg64"), lambda rng: _photo_like(rng, 64),
                                  512 // scale, "JPEG", {"quality": 90}, (64,)),
            "jpeg256 (JPEG q90)": (os.path.join(tmp, "jpeg256"),
                                   lambda rng: _photo_like(rng, 256), 256 // scale, "JPEG",
                                   {"quality": 90}, (64, 256)),
            "shapes128 (PNG)": (os.path.join(tmp, "shapes"),
                                lambda rng: _shapes_image(rng, 128), 512 // scale, "PNG", {},
                                (64,)),
        }
        rows = []
        from unclip_jax.data.readers import tar_to_tfrecord
        for name, (folder, make, n, fmt, kw, sizes) in sets.items():
            size = write_dataset(folder, make, n, 4, fmt, **kw)
            print(f"{name}: {n} records, {size / n / 1024:.1f} KiB per image on average",
                  flush=True)
            sources = {"tar": ("webdataset", os.path.join(folder, "*.tar"))}
            if "tfrecord" in args.formats:  # the same records converted once
                tar_to_tfrecord(os.path.join(folder, "*.tar"), folder + "_tfrecord")
                sources["tfrecord"] = ("tfrecord", os.path.join(folder + "_tfrecord",
                                                                "*.tfrecord"))
            for shard_format, (kind, pattern) in sources.items():
                if shard_format not in args.formats:
                    continue
                for image_size in sizes:
                    base = None
                    for t in threads:
                        rate, warm = measure(pattern, image_size, 0, args.batches,
                                             args.batch_size, threads=t, kind=kind,
                                             warm_batches=1 if args.check else 3)
                        base = rate if t == 1 else base
                        ratio = f"{rate / base:.2f}" if base else "-"
                        rows.append([name, shard_format, image_size, t or "default", rate,
                                     ratio, warm])
                        print(f"  {shard_format} image_size {image_size} threads "
                              f"{t or 'default'}: {rate:.1f} images/s (x{ratio} of 1 thread; "
                              f"first batches {warm:.1f} s)", flush=True)
        print()
        print(common.table(["data", "shards", "image_size", "threads", "images/s",
                            "vs 1 thread", "warm-up s"], rows))


if __name__ == "__main__":
    main()
