"""``iared compare``: every token reducer across its knob on the same backbone, images and clock
(:mod:`iared.compare`); options map one to one onto :class:`iared.compare.CompareConfig`."""

from __future__ import annotations

import argparse

from iared.commands import (
    add_checkpoint_argument,
    add_config_file_argument,
    add_json_argument,
    add_list_argument,
    add_old_option,
    add_out_argument,
    add_task_argument,
    check_json_path,
    resolve_task,
    write_report,
)
from iared.compare import CompareConfig

def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared import compare

    d = CompareConfig()
    p = subparsers.add_parser("compare", help="IA-RED², ToMe, EViT, DynamicViT, ATS and the floors on one backbone",
                              description=compare.__doc__.split("\n\n")[0])
    add_config_file_argument(p)
    add_task_argument(p, "digits-clutter, digits-natural, moving-digits (video), an image folder or a video folder")
    add_checkpoint_argument(p, "the backbone every method runs on: backbone weights, or a pruned IA-RED² checkpoint "
                               "(its backbone, and its interpreters instead of training new ones); default: the "
                               "task's shipped backbone")
    # before --checkpoint: the backbone and the trained interpreters were two options
    add_old_option(p, "--backbone", "--checkpoint", metavar="FILE")
    add_old_option(p, "--iared-checkpoint", "--checkpoint", metavar="FILE")
    p.add_argument("--model", metavar="NAME", help="backbone name, to build --checkpoint's weights with")
    add_list_argument(p, "--methods", default=d.methods,
                      help=f"methods compared (default {','.join(compare.DEFAULT_METHODS)}, plus framediff on a "
                           "video backbone)")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help="optimiser steps per IA-RED² stage; DynamicViT gets as many in total (default %(default)s)")
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    add_list_argument(p, "--dynamicvit-ratios", float, default=d.dynamicvit_ratios, metavar="R",
                      help="keep ratios to train one DynamicViT each for")
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="> 0: also a fine-tuned variant of every method but the floors (iared+ft, evit+ft, ...): "
                        "a copy of the backbone trained this many steps under the method (default %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    add_list_argument(p, "--finetune-methods", default=d.finetune_methods, metavar="METHOD",
                      help="the methods that get a fine-tuned variant (default: all but the floors)")
    p.add_argument("--device", default=d.device,
                   help="where training, evaluation and timing run (default %(default)s); train on an "
                        "accelerator with --batch-sizes '' (no timing), then rerun on the CPU with the same --out: "
                        "everything trained is reloaded from there")
    p.add_argument("--prerender", type=int, default=d.prerender, metavar="N",
                   help="render the embedded task's training split up front in N processes, for training on a "
                        "fast accelerator (default: render each sample when a step needs it)")
    p.add_argument("--test-samples", type=int, default=d.test_samples)
    add_list_argument(p, "--batch-sizes", int, default=d.batch_sizes, metavar="B",
                      help="timed batch sizes, the first one ranks the summary ('': no timing)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="interleaved timed calls; the median is reported")
    p.add_argument("--seed", type=int, default=d.seed)
    add_out_argument(p, d.out, "folder for compare.json, compare.md, compare.png and training runs")
    add_json_argument(p, "also write the JSON report to PATH")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images, 4 training steps, 1 knob per method")
    p.add_argument("--overhead", action="store_true",
                   help="instead: each way of reducing (drop / score+drop / fuse / merge / sample) at equal kept-token "
                        "counts on --model with random weights (default deit_small_patch16_224), timed interleaved")
    p.add_argument("--keep", type=float, default=0.7, help="with --overhead: kept fraction per stage (default 0.7)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from iared.checkpoint import read_checkpoint
    from iared.compare import format_markdown, run_compare
    from iared.files import check_output_dir
    from iared.loading import is_pruned

    check_output_dir(args.out, "--out folder")
    check_json_path(args.json)
    if args.overhead:
        return _overhead(args)
    fields = {k: v for k, v in vars(args).items() if k in CompareConfig.__dataclass_fields__}
    if args.checkpoint is not None:
        if args.backbone is not None or args.iared_checkpoint is not None:
            raise ValueError("--checkpoint replaces --backbone and --iared-checkpoint: give one or the old pair")
        pruned = is_pruned(read_checkpoint(args.checkpoint))
        # a pruned checkpoint brings its backbone and its trained interpreters
        fields.update(backbone=args.checkpoint, iared_checkpoint=args.checkpoint if pruned else None)
    fields["task"] = resolve_task(args.task, fields.get("backbone") or fields.get("iared_checkpoint"), args.model)
    result = run_compare(CompareConfig(**fields))
    write_report(result, format_markdown(result), args.json)
    return 0


def _overhead(args: argparse.Namespace) -> int:
    from iared.compare import format_overhead, measure_overhead
    from iared.models import create_model

    if not 0 < args.keep <= 1:
        raise ValueError(f"--keep {args.keep}: must lie in (0, 1]")
    backbone = create_model(args.model or "deit_small_patch16_224").eval()
    result = measure_overhead(backbone, args.keep, args.batch_sizes, args.repeats, args.seed)
    result["model"] = args.model or "deit_small_patch16_224"
    write_report(result, format_overhead(result), args.json)
    return 0
