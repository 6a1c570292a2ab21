"""``iared compare``: every token reducer across its knob on the same backbone, images and clock
(:mod:`iared.compare`); options map one to one onto :class:`iared.compare.CompareConfig`."""

from __future__ import annotations

import argparse
import sys

from iared.compare import CompareConfig


def _csv(cast):
    return lambda s: tuple(cast(x) for x in s.split(",") if x)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared import compare

    d = CompareConfig()
    p = subparsers.add_parser("compare", help="IA-RED², ToMe, EViT, DynamicViT, ATS and the floors on one backbone",
                              description=compare.__doc__.split("\n\n")[0])
    p.add_argument("--task", default=d.task, help="digits-clutter, digits-natural, moving-digits (video), an image "
                                                  "folder or a video folder (default %(default)s)")
    p.add_argument("--backbone", metavar="FILE", help="backbone weights (default: the task's shipped backbone)")
    p.add_argument("--model", metavar="NAME", help="backbone name, to build --backbone's weights with")
    p.add_argument("--methods", type=_csv(str), default=d.methods,
                   help=f"comma list (default {','.join(compare.DEFAULT_METHODS)}, plus framediff on a video backbone)")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help="optimiser steps per IA-RED² stage; DynamicViT gets as many in total (default %(default)s)")
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--iared-checkpoint", metavar="FILE",
                   help="interpreters already trained on this same backbone (skips their training)")
    p.add_argument("--dynamicvit-ratios", type=_csv(float), default=d.dynamicvit_ratios,
                   help="keep ratios to train one DynamicViT each for (default 0.7,0.5)")
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="> 0: also a fine-tuned variant of every method but the floors (iared+ft, evit+ft, ...): "
                        "a copy of the backbone trained this many steps under the method (default %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-methods", type=_csv(str), default=d.finetune_methods,
                   help="comma list of the methods that get a fine-tuned variant (default: all but the floors)")
    p.add_argument("--device", default=d.device,
                   help="where training, evaluation and timing run (default %(default)s); train on an "
                        "accelerator with --batch-sizes '' (no timing), then rerun on the CPU with the same --out: "
                        "everything trained is reloaded from there")
    p.add_argument("--prerender", type=int, default=d.prerender, metavar="N",
                   help="render the embedded task's training split up front in N processes, for training on a "
                        "fast accelerator (default: render each sample when a step needs it)")
    p.add_argument("--test-samples", type=int, default=d.test_samples)
    p.add_argument("--batch-sizes", type=_csv(int), default=d.batch_sizes,
                   help="timed batch sizes, the first one ranks the summary (default 64,1; '': no timing)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="interleaved timed calls; the median is reported")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="folder for compare.json, compare.md, compare.png and training runs")
    p.add_argument("--json", metavar="FILE", help="also write the JSON report here ('-': stdout)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images, 4 training steps, 1 knob per method")
    p.add_argument("--overhead", action="store_true",
                   help="instead: each way of reducing (drop / score+drop / fuse / merge / sample) at equal kept-token "
                        "counts on --model with random weights (default deit_small_patch16_224), timed interleaved")
    p.add_argument("--keep", type=float, default=0.7, help="with --overhead: kept fraction per stage (default 0.7)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.compare import format_markdown, run_compare
    from iared.files import check_output_dir, check_output_file

    check_output_dir(args.out, "--out folder")
    if args.json and args.json != "-":
        check_output_file(args.json, "--json")
    if args.overhead:
        return _overhead(args)
    names = set(CompareConfig.__dataclass_fields__)
    cfg = CompareConfig(**{k: v for k, v in vars(args).items() if k in names})
    result = run_compare(cfg)
    return _report(result, format_markdown(result), args.json)


def _report(result: dict, table: str, json_path: str | None) -> int:
    """The JSON to ``json_path`` ('-': stdout, the table then goes to stderr) and the table."""
    import json

    from iared.files import json_safe, write_json

    if json_path == "-":
        print(json.dumps(json_safe(result), indent=2))
    elif json_path:
        write_json(json_path, result)
    print(table, file=sys.stderr if json_path == "-" else sys.stdout)
    return 0


def _overhead(args: argparse.Namespace) -> int:
    from iared.compare import format_overhead, measure_overhead
    from iared.models import create_model

    if not 0 < args.keep <= 1:
        raise ValueError(f"--keep {args.keep}: must lie in (0, 1]")
    backbone = create_model(args.model or "deit_small_patch16_224").eval()
    result = measure_overhead(backbone, args.keep, args.batch_sizes, args.repeats, args.seed)
    result["model"] = args.model or "deit_small_patch16_224"
    return _report(result, format_overhead(result), args.json)
