"""The ``iared`` command line: a thin layer over the library, one subcommand per module.

Each module that owns a command exposes ``add_parser(subparsers)``, which registers its
arguments and sets ``func``; this file only wires them together. Errors from bad input
(``ValueError``, ``FileNotFoundError``, checkpoint errors) end the program with one line
naming the input, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that registers it (imported lazily so `iared --help` stays fast)
COMMANDS = {
    "train": "iared.train.backbone",
    "eval": "iared.evaluate",
    "train-interpreters": "iared.train.interpreters",
    "demo": "iared.demo",
    "bench": "iared.bench",
    "export": "iared.export",
    "explain": "iared.explain.cli",
    "explain-eval": "iared.explain.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iared", description="Faster, explainable vision transformers (IA-RED²).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registered = set()
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("iared"):
                continue  # a command whose module is not part of this build
            raise
        register = getattr(module, f"add_{name.replace('-', '_')}_parser", None) or module.add_parser
        if (module_name, register) in registered:
            continue
        register(sub)
        registered.add((module_name, register))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"iared {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iared {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
