"""``iared train``: one option per :class:`iared.train.backbone.BackboneTrainConfig` field."""

from __future__ import annotations

import argparse
import dataclasses
import os

from iared.commands import add_config_arguments
from iared.train.backbone import HELP, BackboneTrainConfig, resolve_config, train
from iared.train.common import parse_overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Options left out keep the dataclass default (or, with ``--resume``, the saved run's value)."""
    from iared.train import backbone

    p = subparsers.add_parser("train", help="train a backbone classifier (digits-clutter or an image folder)",
                              description=backbone.__doc__.split("\n\n")[0])
    add_config_arguments(p, BackboneTrainConfig, HELP, keep_unset=True)
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace) -> BackboneTrainConfig:
    names = {f.name for f in dataclasses.fields(BackboneTrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model_overrides" in given:
        given["model_overrides"] = parse_overrides(given["model_overrides"])
    return resolve_config(given)


def main(args: argparse.Namespace) -> int:
    r = train(config_from_args(args))
    main_rank = os.environ.get("RANK", "0") == "0"  # the process group is gone by now; torchrun's rank stays
    if main_rank and "val" in r:
        print(f"step {r['step']}: val top-1 {100 * r['val']['top1']:.2f}% loss {r['val']['loss']:.4f} | "
              f"test top-1 {100 * r['test']['top1']:.2f}% loss {r['test']['loss']:.4f} | "
              f"{r['seconds']:.0f} s | {r['checkpoint']}")
    elif main_rank:
        print(f"stopped at step {r['step']}; continue with --resume ({r['checkpoint']})")
    return 0
