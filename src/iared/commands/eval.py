"""``iared eval``: top-1 and loss of a backbone; with ``--pruned``, a pruned model against its backbone.

The library side is :mod:`iared.evaluate`; this module maps options onto
:func:`~iared.evaluate.evaluate_backbone` / :func:`~iared.evaluate.evaluate_pruned` and prints.
"""

from __future__ import annotations

import argparse
import json
import sys

from iared.commands import add_model_arguments, model_options
from iared.evaluate import evaluate_backbone, evaluate_pruned, format_backbone, format_pruned
from iared.files import json_safe
from iared.timing import REPEATS, use_threads


def _thresholds(text: str) -> float | list[float]:
    """``"0.5"`` -> 0.5; ``"0.3,0.5,0.5"`` -> one threshold per stage."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every evaluation shares: weights, data, device, output."""
    add_model_arguments(p, "backbone weights: an iared checkpoint, or any weights file (official DeiT .pth, "
                           "state dict, safetensors; geometry read off the weights unless --model names it); "
                           "default on digits-clutter: the shipped backbone")
    p.add_argument("--task", default="digits-clutter", help="task name or image folder (default: digits-clutter)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples only")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="top-1 accuracy and loss of a checkpoint on a task; "
                              "with --pruned, a pruned model against its backbone",
                              description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    g = p.add_argument_group("pruned model (--pruned)")
    g.add_argument("--pruned", metavar="FILE",
                   help="IA-RED² checkpoint (iared.pruning.save_pruned / train-interpreters' pruned.pt): report "
                        "accuracy, kept tokens, GFLOPs and throughput of the pruned model and of its backbone")
    g.add_argument("--threshold", type=_thresholds, metavar="T[,T...]",
                   help="keep tokens whose interpreter score > T (one value, or one per stage; default: the "
                        "threshold the checkpoint was trained with, else 0.5)")
    g.add_argument("--reference", metavar="FILE_OR_NAME",
                   help="the unpruned model to compare with (default: the checkpoint's own backbone; give the "
                        "original when the backbone was fine-tuned: a weights file, or digits_vit for the "
                        "shipped one)")
    g.add_argument("--throughput-batch", type=int, default=64, metavar="B",
                   help="batch size of the throughput measurement (default: 64; the first images of the data, "
                        "repeated if fewer)")
    g.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"timed calls per throughput figure (median; default: {REPEATS})")
    g.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: elapsed time; cpu: process CPU time (robust to other jobs with --threads 1), as in "
                        "iared bench")
    g.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    use_threads(getattr(args, "threads", None))
    data = dict(task=args.task, split=args.split, batch_size=args.batch_size, workers=args.workers,
                limit=args.limit, device=args.device)
    if args.pruned is not None:
        if args.checkpoint is not None or args.model is not None or args.pretrained or args.model_override:
            raise ValueError("--pruned takes no --checkpoint / --model / --pretrained / --model-override "
                             "(the pruned checkpoint carries its backbone)")
        result = evaluate_pruned(args.pruned, threshold=args.threshold, reference=args.reference,
                                 throughput_batch=args.throughput_batch, repeats=args.repeats, clock=args.clock,
                                 **data)
        text = format_pruned(result)
    else:
        result = evaluate_backbone(**model_options(args), **data, progress=not args.json and sys.stderr.isatty())
        text = format_backbone(result)
    print(json.dumps(json_safe(result)) if args.json else text)
    return 0
