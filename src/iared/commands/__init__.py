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
import dataclasses
import types
import typing
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


def add_config_arguments(p: argparse.ArgumentParser, config_cls, help: dict[str, str], *,
                         lists: dict[str, type] | None = None, keep_unset: bool = False) -> None:
    """One option per field of the dataclass ``config_cls`` (``--batch-size`` for ``batch_size``).

    ``help``: text per field (the default is appended). ``lists``: fields taking several values of
    the given type. ``model_overrides`` becomes the repeatable ``--model-override KEY=VALUE`` and
    ``progress`` becomes ``--no-progress``. ``keep_unset``: options left out are absent from the
    namespace (not set to the default), so a resumed run keeps the values it was saved with.
    """
    lists = lists or {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        unset = argparse.SUPPRESS if keep_unset else None
        help_text = f"{help.get(f.name, '')} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        tp = _optional_inner(hints[f.name])
        if f.name == "model_overrides":
            p.add_argument("--model-override", dest=f.name, action="append", metavar="KEY=VALUE",
                           default=unset or [], help=help_text)
        elif f.name == "progress":
            p.add_argument("--no-progress", dest=f.name, action="store_false",
                           default=unset if keep_unset else True, help="no progress bar")
        elif f.name in lists:
            p.add_argument(flag, dest=f.name, type=lists[f.name], nargs="+",
                           default=unset if keep_unset else default, help=help_text)
        elif tp is bool:
            p.add_argument(flag, dest=f.name, action="store_true", default=unset if keep_unset else default,
                           help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=unset if keep_unset else default, help=help_text,
                           metavar=f.name.upper())


def _optional_inner(tp):
    """``int | None`` -> ``int`` (argparse converts to the inner type); other types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
