"""The ``unclip-jax`` command: the parser of every subcommand in :mod:`unclip_jax.commands`, and
``main``.

Heavy imports (JAX, TensorFlow) happen inside the subcommands, so ``--help`` is instant.

Every failure ends in one line on stderr and no traceback (``--debug`` shows it):
- a :class:`unclip_jax.errors.UserError` (a bad flag, file, folder, config, manifest or
  checkpoint), an argument the parser refuses, an operating-system error on a file (full disk,
  permission denied) and running out of memory exit with status 2;
- anything else is a bug of ours: one line naming it and asking for a report, status 1;
- Ctrl-C exits with status 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from absl import logging as absl_logging

from unclip_jax import __version__
from unclip_jax import config as config_lib
from unclip_jax.commands import COMMANDS, enable_compilation_cache, one_line, user_errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a refused argument is one line (the usage is in ``--help``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help').\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's help: the default after each flag's text, written once (not where the
    text already says its default, and not for flags whose default is "not given")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default == []
                or default == argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="unclip-jax", description="unCLIP (DALL-E 2) in JAX and Flax.",
        epilog="Config fields can be overridden after --config with --config.KEY=VALUE.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"unclip-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=ArgumentParser)
    for name in COMMANDS:
        importlib.import_module(f"unclip_jax.commands.{name}").add_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        command.add_argument(
            "--no-compilation-cache", action="store_true",
            help="Compile every program afresh instead of loading it from the persistent cache "
            "in the user cache folder (UNCLIP_JAX_COMPILATION_CACHE=0 does the same).")
        command.add_argument("--debug", action="store_true",
                             help="Show the Python traceback of an error instead of one line.")
    return parser


def quiet_libraries() -> None:
    """Keep TensorFlow's C++ start-up lines (absl, oneDNN, CPU features) and absl's Python
    warnings (TFDS, Orbax) off stderr, which is for our one line; a variable the user set is
    left alone. TensorFlow only reads images here, so its oneDNN kernels (matmuls,
    convolutions) do not matter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    absl_logging.set_verbosity(absl_logging.ERROR)   # tfds' and orbax's warnings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        overrides, rest = config_lib.split_overrides(argv)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if overrides and "config" not in vars(args):
        parser.error(f"'{args.command}' takes no config, so --config.* overrides do not apply.")
    if not args.debug:
        quiet_libraries()
    try:
        enable_compilation_cache(args)
        return args.func(args, overrides)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"unclip-jax {args.command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure is reported
        if args.debug:
            raise
        line, status = one_line(e, user_errors())
        print(f"unclip-jax {args.command}: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
