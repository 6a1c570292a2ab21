"""``iared train-dense``: one option per :class:`iared.train.dense.DenseTrainConfig` field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from iared.files import json_safe
from iared.train.common import parse_overrides
from iared.train.dense import HELP, DenseTrainConfig, train_dense

_LISTS = {"depths": int, "neck_hidden_sizes": int, "reassemble_factors": float}


def _arg_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared.train import dense

    p = subparsers.add_parser("train-dense", help="train a DPT segmentation head on an IA-RED² model (resumable)",
                              description=dense.__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(DenseTrainConfig)
    for f in dataclasses.fields(DenseTrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{HELP.get(f.name, '')} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model_overrides":
            p.add_argument("--model-override", dest=f.name, action="append", metavar="KEY=VALUE", default=[],
                           help=help_text)
        elif f.name == "progress":
            p.add_argument("--no-progress", dest=f.name, action="store_false", help="no progress bar")
        elif f.name in _LISTS:
            p.add_argument(flag, dest=f.name, type=_LISTS[f.name], nargs="+", default=default, help=help_text)
        elif _arg_type(hints[f.name]) is bool:
            p.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=_arg_type(hints[f.name]), default=default, help=help_text,
                           metavar=f.name.upper())
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(DenseTrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given["model_overrides"] = parse_overrides(given["model_overrides"])
    for k in _LISTS:
        given[k] = None if given[k] is None else tuple(given[k])
    result = train_dense(DenseTrainConfig(**given))
    print(json.dumps(json_safe(result)))
    return 0
