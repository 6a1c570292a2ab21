"""``iared predict INPUTS... [--checkpoint FILE]``: top-k classes as JSON lines (:mod:`iared.prediction`)."""

from __future__ import annotations

import argparse
import json

from iared.commands import (
    add_calibration_arguments,
    add_json_argument,
    add_model_arguments,
    check_calibration_options,
    check_json_path,
    finish_calibration,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="top-k classes of images, folders and videos, as JSON lines",
                              description="One JSON line per image and per video: the top-k classes with their "
                                          "probabilities; with a pruned checkpoint also the kept-token fraction "
                                          "per stage and the MACs.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, video files or folders (recursive)")
    add_model_arguments(p, "a pruned checkpoint (run pruned) or backbone weights (run whole), told apart by the "
                           "file; default: the pruned model shipped for digits-natural", overrides=False)
    add_json_argument(p, "write the JSON lines to PATH (default: stdout)")
    p.set_defaults(json="-")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per input (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, help="keep threshold of a pruned model (default: the checkpoint's)")
    p.add_argument("--explain", metavar="DIR", help="also write each input's interpreter heatmap panel (PNG) to DIR")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_calibration_arguments(p, "the inputs given (in their listed order)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.explain.cli import default_checkpoint_path
    from iared.files import check_output_dir, json_safe, write_text
    from iared.prediction import iter_predictions

    check_json_path(args.json)
    check_calibration_options(args)
    if args.explain:
        check_output_dir(args.explain, "--explain folder")
    results = iter_predictions(args.checkpoint, args.inputs, args.top_k, model=args.model, pretrained=args.pretrained,
                               batch_size=args.batch_size, device=args.device, threshold=args.threshold,
                               explain_dir=args.explain, target_kept=args.target_kept,
                               calibration_samples=args.calibration_samples,
                               on_calibrated=lambda m: finish_calibration(m, args.checkpoint or default_checkpoint_path(),
                                                                          args, "iared predict"))
    lines = (json.dumps(json_safe(r), allow_nan=False) for r in results)
    if args.json == "-":
        for line in lines:
            print(line, flush=True)
    else:
        write_text(args.json, "".join(line + "\n" for line in lines))
    return 0
