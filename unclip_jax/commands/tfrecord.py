"""``unclip-jax tfrecord SHARD... --out DIR``: webdataset tar shards converted once to TFRecord.

Tar shards are parsed in Python (one core's worth of work per host); TFRecord shards are read and
decoded by tf.data's own ops in parallel (``input.kind='tfrecord'``, the native reader), so a
host with many cores feeds its chips from the converted shards. Damaged records are skipped and
counted by reason, as the readers count them; existing outputs are refused unless
``--overwrite`` (see :func:`unclip_jax.data.readers.tar_to_tfrecord`).
"""
from __future__ import annotations

HELP = "Convert webdataset tar shards to TFRecord shards (read in parallel by tf.data)."


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tfrecord", help=HELP,
        description=HELP + " One .tfrecord per tar, same name, with bytes features image, "
        "caption and key (the input config's defaults); train on them with "
        "--config.input.kind=tfrecord --config.input.paths='DIR/*.tfrecord'.")
    p.add_argument("shards", nargs="+", metavar="SHARD",
                   help="Tar shards: paths or glob patterns (quote them), local or gs://.")
    p.add_argument("--out", required=True, metavar="DIR", help="Folder for the TFRecord files.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace TFRecord files of the same names in --out (only those).")
    p.set_defaults(func=run)


def run(args, overrides) -> int:
    import time

    from unclip_jax.data.readers import tar_to_tfrecord
    start = time.time()
    report = tar_to_tfrecord(args.shards, args.out, overwrite=args.overwrite)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items())) or "none"
    print(f"wrote {report['written']} records to {len(report['files'])} TFRecord files in "
          f"{args.out} (skipped: {skipped}) in {time.time() - start:.1f}s")
    return 0
