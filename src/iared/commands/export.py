"""``iared export``: a pruned checkpoint's budget mode to ONNX (:func:`iared.export.export_budget_onnx`)."""

from __future__ import annotations

import argparse
import sys

from iared.commands import add_allow_untrained, add_checkpoint_argument
from iared.files import check_output_file


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared import export

    p = subparsers.add_parser("export", help="export a pruned checkpoint's budget mode to ONNX",
                              description=export.__doc__.split("\n\n")[0])
    # `iared export CHECKPOINT OUTPUT` was the form before --checkpoint; it still works, with a note
    add_checkpoint_argument(p, "pruned IA-RED² checkpoint (iared.pruning.save_pruned), or backbone weights "
                               "(fresh interpreters, with --allow-untrained)", old=("CHECKPOINT",))
    p.add_argument("output", metavar="OUTPUT.onnx", help="the .onnx file to write")
    p.add_argument("--model", metavar="NAME", help="build --checkpoint's weights as this backbone (official DeiT "
                                                   ".pth, state dicts, safetensors)")
    p.add_argument("--keep", type=float, required=True, help="fraction of alive patch tokens kept per stage")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of the written file (default 17)")
    p.add_argument("--check", action="store_true", help="run onnxruntime and compare with PyTorch")
    add_allow_untrained(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.export import check_onnx, export_budget_onnx
    from iared.loading import load_iared

    if args.opset < 17:
        raise ValueError(f"--opset {args.opset}: need 17 or newer")
    if not 0 < args.keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
    check_output_file(args.output, "ONNX file")
    model = load_iared(args.checkpoint, args.model, allow_untrained=args.allow_untrained)
    path = export_budget_onnx(model, args.output, args.keep, opset=args.opset)
    print(f"wrote {path} (opset {args.opset})", file=sys.stderr)
    if args.check:
        diff = check_onnx(model, path, args.keep)
        print(f"onnxruntime vs torch: max abs diff {diff:.2e}", file=sys.stderr)
        if diff > 1e-4:
            return 1
    return 0
