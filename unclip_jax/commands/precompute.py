"""``unclip-jax precompute``: CLIP embeddings of a dataset, written once as TFRecord shards."""
from __future__ import annotations

import argparse
import os

from unclip_jax.commands.embed import CLIP_HELP

HELP = "Pre-compute CLIP text/image embeddings of a dataset into TFRecord shards."


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "precompute", help=HELP,
        description=HELP + " Writes embeds-NNNNN-of-NNNNN.tfrecord files and manifest.json to "
        "--out; read them with unclip_jax.data.precompute.read_embeddings(OUT).")
    p.add_argument("--clip", metavar="DIR", help=CLIP_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="Empty folder for the shards.")
    p.add_argument("--input", required=True, metavar="SPEC",
                   help="'shapes:SPLIT' (Shapes generated on the fly from --seed; needs --num), "
                   "'tfds:NAME:SPLIT' (a built TFDS dataset with 'image' and 'caption' features, "
                   "from --data-dir), or 'config' (unclip_jax.data.input_pipeline.make_input over "
                   "--config's input settings; needs --num).")
    p.add_argument("--config", help="Config file[:arg] for --input config (its 'input' field, "
                   "else 'data', else the whole config, goes to make_input).")
    p.add_argument("--data-dir", metavar="DIR", help="TFDS data folder for --input tfds:...")
    p.add_argument("--num", type=int, help="Number of examples (default: the whole split).")
    p.add_argument("--seed", type=int, default=0, help="Shapes / reader seed.")
    p.add_argument("--batch-size", type=int, default=64, help="Encoder batch.")
    p.add_argument("--hidden", action="store_true", help="Also store the text hidden states.")
    p.add_argument("--hidden-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--image-size", type=int, help="Also store the images (PNG) at this size.")
    p.add_argument("--examples-per-shard", type=int, default=10_000)
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the embeddings (embeds-*.tfrecord, manifest.json) already in "
                   "--out; other files there are left alone. The old ones are kept aside until "
                   "the new ones are written.")
    p.set_defaults(func=run)
    return p


def _input_batches(args, overrides):
    from unclip_jax.data import precompute as pc
    from unclip_jax.errors import UserError
    kind, _, rest = args.input.partition(":")
    if kind == "shapes":
        split = rest or "train"
        if split not in ("train", "test"):
            raise UserError(f"--input shapes:{split}: the Shapes splits are train and test.")
        if not args.num:
            raise UserError("--input shapes:SPLIT generates examples on the fly: give their "
                            "number with --num N.")
        return pc.shapes_batches(args.seed, split, args.num, args.batch_size)
    if kind == "tfds":
        name, _, split = rest.rpartition(":")
        if not name or not split or not args.data_dir:
            raise UserError("--input tfds:NAME:SPLIT needs a dataset name, a split and "
                            "--data-dir, e.g. --input tfds:shapes/tiny:train --data-dir DIR.")
        import tensorflow_datasets as tfds
        if name.split("/")[0] == "shapes":
            from unclip_jax.data import shapes_builder  # noqa: F401  (registers "shapes")
        try:
            ds = tfds.load(name, split=split, data_dir=args.data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - TFDS raises AssertionError, its own errors, ...
            text = " ".join(str(e).split())[:200]
            raise UserError(f"--input {args.input}: TFDS cannot load {name!r} split {split!r} "
                            f"from {args.data_dir} ({type(e).__name__}: {text}). Build it first "
                            "(e.g. unclip-jax shapes --data-dir DIR) or check the name and "
                            "split.") from None
        ds = ds.map(lambda ex: {"image": ex["image"], "caption": ex["caption"]})
        return tfds.as_numpy(ds.batch(args.batch_size))
    if kind == "config":
        if not args.config or not args.num:
            raise UserError("--input config needs --config FILE[:arg] and --num N (readers for "
                            "training repeat forever).")
        try:
            from unclip_jax.data.input_pipeline import make_input
        except ImportError as e:
            raise UserError(f"--input config needs unclip_jax.data.input_pipeline.make_input, "
                            f"which cannot be imported here ({e}); use --input shapes:SPLIT or "
                            "tfds:NAME:SPLIT.") from None
        from unclip_jax import config as config_lib
        cfg = config_lib.load_config(args.config, overrides)
        data_cfg = next((cfg[k] for k in ("input", "data") if k in cfg), cfg)
        return make_input(data_cfg, global_batch_size=args.batch_size, seed=args.seed,
                          process_index=0, process_count=1)
    raise UserError(f"Unknown --input {args.input!r}; use shapes:SPLIT, tfds:NAME:SPLIT or config.")


MAX_SEED = 2 ** 63 - 1
OUTPUTS = ("embeds-*.tfrecord*", "manifest.json")


def _check_args(args, overrides) -> None:
    """Every flag, the --out folder and the --clip / --data-dir paths, before any work."""
    from unclip_jax.errors import UserError
    from unclip_jax.io import outputs, paths
    if overrides and not args.config:
        raise UserError("--config.* overrides need --config (they apply to --input config).")
    for flag, value, low, high in (("--batch-size", args.batch_size, 1, 1 << 16),
                                   ("--examples-per-shard", args.examples_per_shard, 1, 1 << 30),
                                   ("--num", args.num, 1, 1 << 40),
                                   ("--image-size", args.image_size, 1, 4096),
                                   ("--seed", args.seed, 0, MAX_SEED)):
        if value is not None and not low <= value <= high:
            raise UserError(f"{flag} must be in [{low}, {high}], got {value}.")
    kind = args.input.partition(":")[0]
    if kind not in ("shapes", "tfds", "config"):
        raise UserError(f"Unknown --input {args.input!r}; use shapes:SPLIT, tfds:NAME:SPLIT or "
                        "config.")
    if args.data_dir is not None and not paths.is_remote(args.data_dir) \
            and not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir} is not a folder; pass the TFDS data folder.")
    if args.clip is not None and not paths.is_remote(args.clip) and not os.path.exists(args.clip):
        raise UserError(f"--clip {args.clip} does not exist; pass a Hugging Face CLIPModel "
                        "folder or an unclip-jax pipeline folder (or leave it out for the bundled "
                        "Shapes CLIP).")
    outputs.check_folder(args.out, overwrite=True)
    if paths.exists(args.out):
        existing = [p for pattern in OUTPUTS for p in paths.glob(paths.join(args.out, pattern))]
        if existing and not args.overwrite:
            raise UserError(f"--out {args.out} already holds embeddings "
                            f"({paths.basename(existing[0])}"
                            + (f" and {len(existing) - 1} more" if len(existing) > 1 else "")
                            + "). Pass --overwrite to replace them, or choose another folder.")
        for p in existing:
            if paths.isdir(p):
                raise UserError(f"--out {args.out}: {paths.basename(p)} is a folder where "
                                "embeddings would be written; move it or choose another folder.")


def _set_aside(out: str) -> tuple[str | None, list[str]]:
    """Move our earlier outputs in ``out`` into a hidden folder there; (folder, names)."""
    from unclip_jax.io import paths
    if not paths.exists(out):
        return None, []
    old = [p for pattern in OUTPUTS for p in paths.glob(paths.join(out, pattern))]
    if not old:
        return None, []
    aside = paths.join(out, f".replaced-{os.getpid()}")
    paths.makedirs(aside)
    names = [paths.basename(p) for p in old]
    for p, n in zip(old, names):
        paths.replace(p, paths.join(aside, n))
    return aside, names


def _put_back(out: str, aside: str, names: list[str]) -> None:
    from unclip_jax.io import paths
    for pattern in OUTPUTS:   # the new run's partial files
        for p in paths.glob(paths.join(out, pattern)):
            paths.remove(p)
    for n in names:
        paths.replace(paths.join(aside, n), paths.join(out, n))
    paths.rmtree(aside)


def run(args, overrides) -> int:
    _check_args(args, overrides)
    from unclip_jax.commands.embed import load_clip
    from unclip_jax.data import precompute as pc
    from unclip_jax.io import paths
    batches = _input_batches(args, overrides)
    model, folder = load_clip(args.clip)
    aside, names = _set_aside(args.out) if args.overwrite else (None, [])
    try:
        manifest = pc.precompute(
            model, batches, args.out, batch_size=args.batch_size, with_hidden=args.hidden,
            hidden_dtype=args.hidden_dtype, image_size=args.image_size,
            examples_per_shard=args.examples_per_shard, max_examples=args.num,
            clip_source=os.path.abspath(folder))
    except BaseException:
        if aside is not None:
            _put_back(args.out, aside, names)
        raise
    if aside is not None:
        paths.rmtree(aside)
    report = pc.validate_shards(args.out)
    print(f"wrote {manifest['count']} examples in {len(manifest['files'])} shards to {args.out} "
          f"({manifest['seconds']} s); fields {manifest['fields']}; validated: {report['good']} "
          f"good, {report['bad']} bad")
    return 0 if report["bad"] == 0 else 1
