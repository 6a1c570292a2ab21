"""``iared train-interpreters``: options of :class:`iared.train.interpreters.InterpreterTrainConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from iared.commands import (
    add_checkpoint_argument,
    add_config_file_argument,
    add_list_argument,
    add_out_argument,
    add_task_argument,
    resolve_task,
)
from iared.files import json_safe
from iared.train.interpreters import InterpreterTrainConfig, default_reward, default_tau, train_from_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared.train import interpreters

    p = subparsers.add_parser("train-interpreters", help="train IA-RED² interpreters on a frozen backbone",
                              description=interpreters.__doc__.split("\n\n")[0])
    d = InterpreterTrainConfig()
    add_config_file_argument(p)
    add_task_argument(p, "embedded task or an ImageFolder directory (ImageNet wnid folders keep the standard "
                         "1000-class labels)")
    add_checkpoint_argument(p, "backbone weights: an iared checkpoint, an official DeiT .pth, a state dict or "
                               "safetensors (geometry read off the weights unless --model names it); default: the "
                               "task's shipped backbone", dest="backbone", old=("--backbone",))
    p.add_argument("--model", default=d.model, metavar="NAME", help="backbone name (e.g. deit_small_patch16_224)")
    p.add_argument("--pretrained", action="store_true", help="with --model and no --checkpoint: timm's download")
    add_out_argument(p, d.out, "run folder: pruned.pt, config.json / config.yaml, log.jsonl / log.csv, train_state.pt")
    p.add_argument("--steps-per-stage", type=int, default=d.steps_per_stage)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--tau", type=float, default=None,
                   help=f"penalty of a wrong prediction (reward -tau; default {d.tau:g}, digits-natural "
                        f"{default_tau('digits-natural'):g}: iared.train.interpreters.TASK_TAU)")
    add_list_argument(p, "--stage-weights", float, default=d.stage_weights, legacy_spaces=True, metavar="W",
                      help="weight of the compute term, per stage (one value: every stage)")
    p.add_argument("--baseline", choices=["self-critical", "mean"], default=d.baseline)
    p.add_argument("--reward", choices=["correct", "probability"], default=None,
                   help="correct: 1 - w f^2 if right, -tau if wrong (the paper's); probability: the same, continuous "
                        f"in the pruned model's probability of the true class (iared.rl.probability_reward); default "
                        f"{d.reward}, moving-digits {default_reward('moving-digits')} (iared.train.interpreters.TASK_REWARD)")
    p.add_argument("--exploration", type=float, default=d.exploration)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--initial-score", type=float, default=d.initial_score,
                   help="every token's score when a stage starts training (0.5 = unbiased)")
    p.add_argument("--num-stages", type=int, default=d.num_stages)
    p.add_argument("--interpreter-heads", type=int, default=d.interpreter_heads)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="fine-tune the backbone under the learned policy with distillation (0: off)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--distill-weight", type=float, default=d.distill_weight)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="skip up to N steps whose loss or gradient is NaN / inf (default 0: the first one stops the "
                        "run, keeping the last good train_state.pt)")
    p.add_argument("--prerender", type=int, default=d.prerender, metavar="N",
                   help="render the embedded task's train split once, in N processes, before training (a GPU would "
                        "otherwise wait on rendering; keeps it in memory)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(InterpreterTrainConfig)}
    fields = {k: v for k, v in vars(args).items() if k in names}
    fields["stage_weights"] = tuple(fields["stage_weights"])
    saved = _saved_run_settings(Path(fields["out"])) if args.resume else {}
    # resuming: the run's own task; else the backbone's, else the embedded default
    task = fields["task"] if fields["task"] is not None else saved.get("task")
    fields["task"] = resolve_task(task, fields["backbone"], fields["model"])
    if fields.get("tau") is None:  # resuming: the run's own value, not a default that may have changed
        fields["tau"] = saved.get("tau", default_tau(fields["task"]))
    if fields.get("reward") is None:
        fields["reward"] = saved.get("reward", default_reward(fields["task"]))
    cfg = InterpreterTrainConfig(**fields)
    model, history = train_from_config(cfg, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(json_safe(history[-1] if history else {})))
        print(f"saved {Path(cfg.out) / 'pruned.pt'}", file=sys.stderr)
    return 0


def _saved_run_settings(out: Path) -> dict:
    """The settings of the run being resumed (its ``config.json``), or {} when there is none."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot resume: {path} is unreadable ({e})") from e
    return saved if isinstance(saved, dict) else {}
