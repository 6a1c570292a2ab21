"""``iared demo``: the whole IA-RED² story on the embedded task (:mod:`iared.demo`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from iared.commands import (
    add_checkpoint_argument,
    add_config_file_argument,
    add_out_argument,
    add_task_argument,
    resolve_task,
)
from iared.demo import DEMO_MAX_LOSS, DEMO_SCHEDULES, DEMO_VAL_SAMPLES, format_table, run_demo
from iared.models import TASK_BACKBONES
from iared.timing import use_threads
from iared.train.interpreters import InterpreterTrainConfig, default_reward, default_tau


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared import demo

    p = subparsers.add_parser("demo", help="train interpreters on the embedded task, evaluate, draw pictures",
                              description=demo.__doc__.split("\n\n")[0])
    d = InterpreterTrainConfig()
    add_config_file_argument(p)
    add_task_argument(p, "embedded task (each has its shipped backbone)", choices=sorted(TASK_BACKBONES))
    add_out_argument(p, "demo-out", "output folder (results.json, PNGs, checkpoint)")
    p.add_argument("--steps-per-stage", type=int, default=None,
                   help="REINFORCE steps per stage (default per task: " +
                        ", ".join(f"{t} {s}" for t, (s, _) in DEMO_SCHEDULES.items()) + ")")
    p.add_argument("--test-samples", type=int, default=2000, help="test images evaluated (and timed: the first 64)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="validation images per progress check")
    add_checkpoint_argument(p, "backbone weights the interpreters are trained on (a pruned checkpoint: its "
                               "backbone; default: the task's shipped backbone)", old=("--backbone",))
    p.add_argument("--threshold", type=float, default=None,
                   help=f"the threshold earlier stages run at while later ones train (default {d.threshold}); "
                        "given without --max-loss, also the one the demo reports at")
    p.add_argument("--max-loss", type=float, default=None, metavar="PT",
                   help=f"report at the cheapest threshold within PT points of the unpruned top-1 on the validation "
                        f"split (default {DEMO_MAX_LOSS}, unless --threshold is given)")
    p.add_argument("--val-samples", type=int, default=None,
                   help="validation inputs the operating threshold is chosen on (default: "
                        + ", ".join(f"{t} {n}" for t, n in DEMO_VAL_SAMPLES.items()) + ", else 1000)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="fine-tune the backbone under the learned policy, distilling from the unpruned one (default per "
                        "task: " + ", ".join(f"{t} {f}" for t, (_, f) in DEMO_SCHEDULES.items()) + ")")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    use_threads(max(1, os.cpu_count() or 1))
    args.task = resolve_task(args.task, args.checkpoint)
    if args.task not in DEMO_SCHEDULES:
        raise ValueError(f"--task {args.task}: the demo runs on an embedded task ({', '.join(DEMO_SCHEDULES)})")
    steps, finetune = DEMO_SCHEDULES[args.task]
    steps = steps if args.steps_per_stage is None else args.steps_per_stage
    finetune = finetune if args.finetune_steps is None else args.finetune_steps
    max_loss = args.max_loss if args.max_loss is not None or args.threshold is not None else DEMO_MAX_LOSS
    if args.val_samples is not None and args.val_samples < 1:
        raise ValueError(f"--val-samples must be at least 1, got {args.val_samples}")
    threshold = InterpreterTrainConfig().threshold if args.threshold is None else args.threshold
    cfg = InterpreterTrainConfig(steps_per_stage=steps, threshold=threshold, seed=args.seed,
                                 tau=default_tau(args.task), reward=default_reward(args.task),
                                 eval_samples=args.eval_samples, backbone=args.checkpoint,
                                 finetune_steps=finetune, task=args.task,
                                 model=None if args.checkpoint else TASK_BACKBONES[args.task],
                                 pretrained=args.checkpoint is None)
    results = run_demo(Path(args.out), cfg, test_samples=args.test_samples, progress=not args.quiet,
                       max_loss=max_loss, val_samples=args.val_samples)
    print(format_table(results))
    print(f"wrote {Path(args.out) / 'results.json'}, {len(results['pictures'])} pictures and "
          f"{Path(args.out) / 'accuracy_vs_throughput.png'} "
          f"({results['total_seconds']:.0f} s)", file=sys.stderr)
    return 0
