"""``iared train-dense``: one option per :class:`iared.train.dense.DenseTrainConfig` field."""

from __future__ import annotations

import argparse
import dataclasses
import json

from iared.commands import add_config_arguments, resolve_task
from iared.files import json_safe
from iared.train.common import parse_overrides
from iared.train.dense import HELP, DenseTrainConfig, train_dense

_LISTS = {"depths": int, "neck_hidden_sizes": int, "reassemble_factors": float}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared.train import dense

    p = subparsers.add_parser("train-dense", help="train a DPT segmentation head on an IA-RED² model (resumable)",
                              description=dense.__doc__.split("\n\n")[0])
    add_config_arguments(p, DenseTrainConfig, HELP, lists=_LISTS, task_from_checkpoint=True)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(DenseTrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given["model_overrides"] = parse_overrides(given["model_overrides"])
    for k in _LISTS:
        given[k] = None if given[k] is None else tuple(given[k])
    given["task"] = resolve_task(given["task"], given["checkpoint"], given["model"], given["model_overrides"])
    result = train_dense(DenseTrainConfig(**given))
    print(json.dumps(json_safe(result)))
    return 0
