"""``unclip-jax shapes``: generate the Shapes dataset as a TFDS dataset (offline)."""
from __future__ import annotations

import argparse

MAX_EXAMPLES = 10_000_000
HELP = "Build the Shapes dataset (procedural, offline) as a TFDS dataset."


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "shapes", help=HELP,
        description=HELP + " Configs: 'default' (50,000 train / 2,000 test, seed 0) and 'tiny' "
        "(64 / 32). --num-train / --num-test / --seed make a custom config named "
        "n{train}-{test}-s{seed}. Load it afterwards with tfds.load('shapes/NAME', data_dir=DIR) "
        "after importing unclip_jax.data.shapes_builder.")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="TFDS data folder to write.")
    p.add_argument("--config", dest="builder_config", default="default",
                   choices=("default", "tiny"), help="Builder config.")
    from unclip_jax.commands.apps import SEED_HELP, bounded_int, seed_int
    p.add_argument("--num-train", type=bounded_int("--num-train", 0, MAX_EXAMPLES),
                   help="Train examples (overrides the config's).")
    p.add_argument("--num-test", type=bounded_int("--num-test", 0, MAX_EXAMPLES),
                   help="Test examples (overrides the config's).")
    p.add_argument("--seed", type=seed_int(), help="Generation seed (overrides the config's)."
                   + SEED_HELP)
    p.set_defaults(func=run)
    return p


def run(args, overrides) -> int:
    from unclip_jax.errors import UserError
    if overrides:
        raise UserError("'shapes' takes no --config.* overrides; use --num-train, --num-test, "
                        "--seed.")
    from unclip_jax.io.outputs import check_folder
    check_folder(args.data_dir, flag="--data-dir")
    if args.num_train == 0 and args.num_test == 0:
        raise UserError("--num-train and --num-test are both 0: nothing to build; give at least "
                        "one example.")
    from unclip_jax.data import shapes_builder as sb
    config = args.builder_config
    if args.num_train is not None or args.num_test is not None or args.seed is not None:
        base = next(c for c in sb.Shapes.BUILDER_CONFIGS if c.name == config)
        values = dict(num_train=base.num_train if args.num_train is None else args.num_train,
                      num_test=base.num_test if args.num_test is None else args.num_test,
                      seed=base.seed if args.seed is None else args.seed)
        if min(values.values()) < 0:
            raise UserError(f"--num-train, --num-test and --seed must be non-negative, got "
                            f"{values}.")
        config = sb.make_config(**values)
    b = sb.build(args.data_dir, config)
    splits = {name: info.num_examples for name, info in b.info.splits.items()}
    print(f"shapes/{b.builder_config.name}: {splits} in {b.data_dir}")
    print(f"load with: tfds.load('shapes/{b.builder_config.name}', data_dir={args.data_dir!r}) "
          "after `import unclip_jax.data.shapes_builder`")
    return 0
