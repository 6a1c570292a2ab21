"""The ``iared`` commands: one module per command, each thin over the library.

Every module exposes ``add_parser(subparsers)``, which registers the command's options and sets
``func`` to a ``main(args) -> int``; ``main`` turns the options into a library call (a dataclass
config or keyword arguments), then prints or writes the result. The library never imports this
package. :mod:`iared.cli` wires the modules together (its ``COMMANDS`` table).

Shared here: the options every command that takes a backbone accepts (:func:`add_model_arguments`)
and the output-path checks commands run before they start working.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_model_arguments", "model_options", "parse_overrides"]


def add_model_arguments(p: argparse.ArgumentParser, checkpoint_help: str, overrides: bool = True) -> None:
    """``--checkpoint FILE``, ``--model NAME``, ``--pretrained`` (and ``--model-override K=V``):
    the rules of :mod:`iared.loading`."""
    p.add_argument("--checkpoint", metavar="FILE", help=checkpoint_help)
    p.add_argument("--model", metavar="NAME",
                   help="backbone name (see iared.models.list_models); with --checkpoint: how to build the file's "
                        "weights (official DeiT .pth, plain state dicts, safetensors)")
    p.add_argument("--pretrained", action="store_true",
                   help="with --model and no --checkpoint: timm's download (network needed), or the shipped digits_vit")
    if overrides:
        p.add_argument("--model-override", action="append", metavar="KEY=VALUE", default=[],
                       help="change a ViTConfig field of --model (repeatable)")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    from iared.train.common import parse_overrides as parse

    return parse(items)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`iared.loading.load_backbone` / ``load_iared`` from the options."""
    return {"checkpoint": args.checkpoint, "model": args.model, "pretrained": args.pretrained,
            "overrides": parse_overrides(getattr(args, "model_override", None))}
