"""The ``iared`` command line: a thin layer over the library, one module per command.

Each command lives in :mod:`iared.commands` (``iared.commands.<name>``) and exposes
``add_parser(subparsers)``, which registers its options and sets ``func``; this file only wires
them together. To add a command, add its module to ``COMMANDS``. Errors from bad input
(``ValueError``, missing files, checkpoint and output-path errors) end the program with one line
naming the input, exit status 2; a training run stopped by NaN / inf ends with one line, status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that registers it (imported lazily so `iared --help` stays fast)
COMMANDS = {
    "train": "iared.commands.train",
    "eval": "iared.commands.eval",
    "train-interpreters": "iared.commands.train_interpreters",
    "demo": "iared.commands.demo",
    "bench": "iared.commands.bench",
    "bench-mvit": "iared.commands.bench_mvit",
    "export": "iared.commands.export",
    "explain": "iared.commands.explain",
    "explain-eval": "iared.commands.explain_eval",
    "make-dataset": "iared.commands.make_dataset",
    "compare": "iared.commands.compare",
    "train-dense": "iared.commands.train_dense",
    "eval-dense": "iared.commands.eval_dense",
    "predict": "iared.commands.predict",
    "stream": "iared.commands.stream",
}


def build_parser() -> argparse.ArgumentParser:
    from iared.commands import package_version

    parser = argparse.ArgumentParser(prog="iared", description="Faster, explainable vision transformers (IA-RED²).")
    parser.add_argument("--version", action="version", version=f"iared {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("iared"):
                continue  # a command whose module is not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from iared.export import ExportError
    from iared.train.common import NonFiniteError

    from iared.commands import parse_args

    args = parse_args(build_parser(), argv)  # --config files and the notes of deprecated spellings
    try:
        return int(args.func(args) or 0)
    except (NonFiniteError, ExportError) as e:  # the run failed, not the input
        print(f"iared {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"iared {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iared {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
