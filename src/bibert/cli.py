"""The `bibert` command line: a thin layer over the Python API.

Each area of the package contributes its subcommands from a module in
`bibert.commands` exposing `register(subparsers)`; every subcommand sets
`func(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import BibertError

COMMAND_MODULES = ["summary", "data", "evaluate", "train", "packed", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bibert",
        description="Fully binarized BERT: binarize, fine-tune, distil (DMD), evaluate, "
        "export bit-packed models and run them with bitwise kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"bibert.commands.{name}")
        except ModuleNotFoundError as exc:  # an area not installed in this build
            if exc.name != f"bibert.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except BibertError as exc:
        print(f"bibert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
