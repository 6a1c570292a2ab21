"""``iared explain-eval``: every explanation method x every metric (:func:`iared.explain.cli.evaluate_methods`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from iared.commands import add_config_file_argument, add_json_argument, add_list_argument, write_report
from iared.commands.explain import add_methods_argument, add_model_options
from iared.files import check_output_file


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared.explain.cli import DIGITS_DEFAULT_LIMIT
    from iared.explain.methods import SELECTION_CANDIDATES
    from iared.explain.metrics import BASELINES

    p = subparsers.add_parser("explain-eval", help="score explanation methods against ground-truth masks",
                              description="Pixel accuracy, mIoU, mAP (ImageNet-segmentation protocol), "
                                          "pointing game, deletion and insertion AUC (RISE) for every method.")
    add_config_file_argument(p)
    add_model_options(p)
    p.add_argument("--task", metavar="TASK", choices=("digits-clutter", "digits-natural"),
                   help="embedded task whose test split (with its digit masks) is read (default: the one the "
                        "model's input fits: 1 channel digits-clutter, RGB digits-natural)")
    p.add_argument("--images", help="folder of images (default: an embedded task's test split, see --task)")
    p.add_argument("--masks", help="folder of binary masks paired with --images by file stem")
    p.add_argument("--limit", type=int, metavar="N",
                   help=f"evaluate the first N samples (default: {DIGITS_DEFAULT_LIMIT} on digits, all pairs "
                        "in folders)")
    add_methods_argument(p)
    add_list_argument(p, "--readouts", metavar="READOUT",
                      help="choose the interpreter's readout among these on the val split (first --val-limit "
                           "samples), then report it once on test beside --methods' baselines, with paired "
                           "bootstrap intervals; e.g. " + ",".join(SELECTION_CANDIDATES))
    p.add_argument("--val-limit", type=int, default=200, metavar="N",
                   help="with --readouts: validation samples the choice is made on (default 200)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="R",
                   help="with --readouts: bootstrap resamples of the test images (default 2000)")
    add_json_argument(p, "write all figures as JSON to PATH (and the bar chart beside it, .png)")
    p.add_argument("--plot", help="write the bar chart PNG here (default: beside --json)")
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    p.add_argument("--baseline", choices=BASELINES, default="rise",
                   help="what deleted / not yet inserted pixels become (default rise: zero for deletion, "
                        "blurred image for insertion)")
    p.add_argument("--tolerance", type=float, default=0.0, help="pointing-game tolerance in pixels")
    p.add_argument("--threshold", type=float, help="keep threshold of the pruned pass every method explains "
                   "(default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="digits test-split sample seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from iared.explain import cli as lib
    from iared.explain.evaluate import build_methods, format_table
    from iared.explain.metrics import UndefinedMetricWarning

    if (args.images is None) != (args.masks is None):
        raise ValueError("--images and --masks go together: give both folders or neither")
    if args.task and args.images is not None:
        raise ValueError("--task and --images/--masks exclude each other: which images should be explained?")
    if args.readouts and args.images is not None:
        raise ValueError("--readouts chooses on an embedded task's val split: not with --images/--masks")
    for flag, value in (("--limit", args.limit), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--val-limit", args.val_limit), ("--bootstrap", args.bootstrap)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    to_file = args.json not in (None, "-")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if to_file else None)
    for flag, path in (("--json file", args.json if to_file else None), ("--plot file", plot)):
        if path:
            check_output_file(path, flag)  # before the evaluation, not after it
    if args.readouts:
        lib.check_readouts(args.readouts)
    for names in (args.methods, args.readouts):
        if names:
            build_methods(names, args.threshold)  # unknown names fail before the model loads
    pairs = lib.pair_folders(args.images, args.masks)[: args.limit] if args.images is not None else None
    model = lib.load_explain_model(args.checkpoint, args.device, args.model, args.pretrained, task=args.task)
    total = len(pairs) if pairs is not None else (args.limit or lib.DIGITS_DEFAULT_LIMIT)
    total += args.val_limit if args.readouts else 0
    options = dict(limit=args.limit, batch_size=args.batch_size, seed=args.seed, steps=args.steps,
                   baseline=args.baseline, tolerance=args.tolerance, threshold=args.threshold, device=args.device,
                   task=args.task)
    with tqdm(total=total, desc="explain-eval", unit="img", file=sys.stderr, disable=args.quiet) as bar, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UndefinedMetricWarning)
        if args.readouts:
            results = lib.evaluate_readouts(model, args.readouts, val_limit=args.val_limit, method_names=args.methods,
                                            resamples=args.bootstrap, progress=bar, **options)
        else:
            results = lib.evaluate_methods(model, images=args.images, masks=args.masks, pairs=pairs,
                                           method_names=args.methods, progress=bar, **options)
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)))
    for note in notes:  # said once, however many methods hit it
        print(f"iared explain-eval: warning: {note}", file=sys.stderr)
    # by name: a shared report does not name this machine's folders
    results["checkpoint"] = Path(args.checkpoint).name if args.checkpoint else (
        args.model or f"{lib.default_checkpoint_path(args.task).name} (shipped)")
    results["warnings"] = notes
    text = [format_table(results),
            f"n={results['n']}  pruned model agrees with backbone on {results['agreement']:.1%}; "
            f"deletion/insertion: {args.steps} steps, baseline {args.baseline}"]
    if "selection" in results:
        sel, diff = results["selection"], results["differences"]
        text.append(f"readout chosen on {sel['split']} (n={sel['n']}, {sel['rule']}): {sel['chosen']}")
        for other, metrics in diff["against"].items():
            text.append(f"  {sel['chosen']} - {other}: " + "  ".join(
                f"{m} {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for m, d in metrics.items()))
    if plot:
        from iared.explain.render import bar_chart

        bar_chart(results, plot)
        text.append(f"wrote {plot}")
    if to_file:
        text.append(f"wrote {args.json}")
    write_report(results, "\n".join(text), args.json)
    return 0
