"""The `bibert` command line: a thin layer over the Python API.

Each area of the package contributes its subcommands from a module in
`bibert.commands` exposing `register(subparsers)`; every subcommand sets
`func(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from .errors import BibertError

COMMAND_MODULES = ["summary", "data", "evaluate", "train", "packed", "bench", "demo"]


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


# what `bibert[train]` adds to the runtime (NumPy, tokenizers, the native engine)
TRAIN_MODULES = {"torch", "transformers", "safetensors", "matplotlib", "huggingface_hub"}
RESUMABLE = ("finetune", "distill")  # commands whose --out keeps a checkpoint that --resume continues


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown option is reported by its subcommand's parser (its
    usage line, not the top level's) with the closest option it has, before any missing
    required option (a misspelt required flag is both)."""
    required = [action for sub in _subparsers(parser) for action in sub._actions
                if action.required and action.option_strings]
    for action in required:
        action.required = False
    try:
        args, extras = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    if not extras:
        return parser.parse_args(argv)  # now with the required options checked
    sub = _subparser(parser, getattr(args, "command", None)) or parser
    message = f"unrecognized arguments: {' '.join(extras)}"
    options = [o for action in sub._actions for o in action.option_strings]
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.6)
        if extra.startswith("-") and close:
            message += f" (did you mean {close[0]}?)"
            break
    sub.error(message)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for sub in action.choices.values()]


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except BibertError as exc:
        print(f"bibert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a runtime-only install (pip install bibert) has no training stack
        if (exc.name or "").split(".")[0] not in TRAIN_MODULES:
            raise
        print(f"bibert {args.command}: error: {args.command} needs torch and transformers ({exc.name} is not "
              "installed): pip install 'bibert[train]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in RESUMABLE:
            print(f"interrupted: {args.out} keeps its last checkpoint; run the same command with --resume to "
                  "continue from it", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
