"""``iared explain IMAGE_OR_DIR --out DIR``: heatmap panels (:func:`iared.explain.cli.explain_files`)."""

from __future__ import annotations

import argparse

from iared.commands import add_allow_untrained, add_list_argument, add_model_arguments, add_out_argument
from iared.files import check_output_dir


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("explain", help="heatmap panels (interpreter + baselines) for images",
                              description="For each image, a PNG: the image, the patches kept after each "
                                          "stage, and every method's heatmap.")
    p.add_argument("input", metavar="IMAGE_OR_DIR", help="an image file or a folder (searched recursively)")
    add_model_options(p)
    add_out_argument(p, "explain-out", "folder for the PNG panels")
    add_methods_argument(p)
    p.add_argument("--threshold", type=float, help="keep threshold of the pruned pass every method explains "
                   "(default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    add_allow_untrained(p)
    p.set_defaults(func=main)
    return p


def add_model_options(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "pruned model (iared.pruning.save_pruned), or backbone weights (fresh interpreters); "
                           "default: the pruned model shipped for digits-natural (explain-eval --task "
                           "digits-clutter: the one for digits-clutter)", overrides=False)


def add_methods_argument(p: argparse.ArgumentParser) -> None:
    add_list_argument(p, "--methods", metavar="METHOD", legacy_spaces=True,
                      help="methods as name or name:int (default: all; the interpreter combined and per stage)")


def main(args: argparse.Namespace) -> int:
    from iared.explain import cli as lib
    from iared.explain.evaluate import build_methods

    out = check_output_dir(args.out, "--out folder")
    if args.methods:
        build_methods(args.methods, args.threshold)  # unknown names fail before the model loads
    files = lib.explain_inputs(args.input, out)
    model = lib.load_explain_model(args.checkpoint, args.device, args.model, args.pretrained,
                                   allow_untrained=args.allow_untrained)
    for path in lib.explain_files(model, files, args.input, out, args.methods, args.threshold, args.device):
        print(path)
    return 0
