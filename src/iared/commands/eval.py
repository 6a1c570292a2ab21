"""``iared eval``: top-1 and loss of a backbone; for a pruned checkpoint, the pruned model against its backbone.

The library side is :mod:`iared.evaluate`; this module maps options onto
:func:`~iared.evaluate.evaluate_backbone` / :func:`~iared.evaluate.evaluate_pruned` and prints.
"""

from __future__ import annotations

import argparse
import sys

from iared.commands import (
    add_calibration_arguments,
    add_config_file_argument,
    add_json_argument,
    add_model_arguments,
    add_task_argument,
    check_calibration_options,
    check_json_path,
    finish_calibration,
    model_options,
    parse_floats,
    resolve_task,
    write_report,
)
from iared.evaluate import evaluate_backbone, evaluate_pruned, format_backbone, format_pruned
from iared.timing import REPEATS, use_threads


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every evaluation shares: model, data, device, output."""
    add_config_file_argument(p)
    add_model_arguments(p, "the model, told apart by its contents: a pruned IA-RED² checkpoint (accuracy, kept "
                           "tokens, GFLOPs and throughput against its backbone), or backbone weights (top-1 and "
                           "loss: an iared checkpoint, official DeiT .pth, state dict, safetensors; geometry read "
                           "off the weights unless --model names it); default: the task's shipped backbone",
                        old=("--pruned",))
    add_task_argument(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples only")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_json_argument(p, "write the result as JSON to PATH", bare=True)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="top-1 accuracy and loss of a checkpoint on a task; "
                              "a pruned checkpoint against its backbone",
                              description=__doc__.split("\n\n")[0])
    add_common_arguments(p)
    g = p.add_argument_group("pruned checkpoint")
    g.add_argument("--threshold", type=parse_floats, metavar="T[,T...]",
                   help="keep tokens whose interpreter score > T (one value, or comma-separated, one per "
                        "stage; default: the threshold the checkpoint was trained with, else 0.5)")
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
    add_calibration_arguments(p, "the evaluated split's inputs (labels unread)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.checkpoint import read_checkpoint
    from iared.loading import is_pruned

    use_threads(getattr(args, "threads", None))
    check_json_path(args.json)
    options = model_options(args)
    pruned = args.checkpoint is not None and is_pruned(read_checkpoint(args.checkpoint))
    if pruned and (args.model is not None or args.pretrained or args.model_override):
        raise ValueError(f"--checkpoint {args.checkpoint} is a pruned checkpoint: it carries its backbone, so "
                         "--model / --pretrained / --model-override do not apply")
    check_calibration_options(args, pruned, args.checkpoint or "the backbone evaluated")
    if not pruned and (args.threshold is not None or args.reference is not None):
        raise ValueError(f"--threshold and --reference apply to a pruned checkpoint; "
                         f"{args.checkpoint or 'the backbone evaluated'} has no interpreters")
    task = resolve_task(args.task, args.checkpoint, args.model, options["overrides"])
    data = dict(task=task, split=args.split, batch_size=args.batch_size, workers=args.workers,
                limit=args.limit, device=args.device)
    if pruned:
        result = evaluate_pruned(args.checkpoint, threshold=args.threshold, reference=args.reference,
                                 throughput_batch=args.throughput_batch, repeats=args.repeats, clock=args.clock,
                                 target_kept=args.target_kept, calibration_samples=args.calibration_samples,
                                 on_calibrated=lambda m: finish_calibration(m, args.checkpoint, args, "iared eval"),
                                 **data)
        text = format_pruned(result)
    else:
        result = evaluate_backbone(**options, **data, progress=not args.json and sys.stderr.isatty())
        text = format_backbone(result)
    write_report(result, text, args.json)
    return 0
