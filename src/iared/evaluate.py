"""``iared eval``: top-1 accuracy and loss of a backbone on a task's split.

Where the weights come from (:func:`load_backbone`):

- ``--checkpoint F``: an iared training checkpoint (it carries the model config);
- ``--model NAME --checkpoint F``: official DeiT (``{"model": sd}``), plain state dicts,
  safetensors, or iared checkpoints, built as ``NAME``;
- ``--model digits_vit --pretrained`` (no checkpoint): the backbone shipped with the package.

``--pruned F.pt`` (an IA-RED² checkpoint from :func:`iared.pruning.save_pruned`) instead
evaluates the pruned model against its own backbone in one run on the same data: top-1 of both,
kept fraction per stage, GFLOPs of both and the FLOPs-ideal speed-up (from
:func:`iared.measure.accuracy_and_compute`), and measured throughput of both on one batch of
``--throughput-batch`` images on the current device (:func:`iared.measure.compare_throughput`).

The library side is :func:`evaluate_classifier` (any model, any loader of ``(image, label, ...)``
batches). The command is built from small pieces (:func:`add_common_arguments`,
:func:`build_loader`, one ``run_*`` function per kind of evaluation) so other evaluations can
join the same command with their own options and their own ``run_*``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "add_common_arguments",
    "add_parser",
    "build_loader",
    "evaluate_classifier",
    "load_backbone",
    "report",
    "report_pruned",
    "run_backbone_eval",
    "run_pruned_eval",
]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device | str = "cpu",
                        progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over ``loader``.

    ``loader`` yields ``(images (B, C, H, W), labels (B,), ...)``; extra items (masks) are
    ignored. Returns ``{"top1": fraction in [0, 1], "loss": mean CE, "n": samples,
    "correct": int, "loss_sum": float}`` (the sums make results from shards easy to combine).
    The model is put in eval mode and left there.
    """
    model.eval()
    device = torch.device(device)
    correct, loss_sum, n = 0, 0.0, 0
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="eval", dynamic_ncols=True, mininterval=1.0)
    for batch in loader:
        images, labels = batch[0].to(device, non_blocking=True), torch.as_tensor(batch[1]).to(device)
        logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += labels.numel()
    if n == 0:
        raise ValueError("evaluation loader yielded no samples")
    return {"top1": correct / n, "loss": loss_sum / n, "n": n, "correct": correct, "loss_sum": loss_sum}


def load_backbone(checkpoint: str | None, model_name: str | None = None, pretrained: bool = False,
                  overrides: dict | None = None) -> nn.Module:
    """A backbone from the command-line choices (see the module docstring). Raises
    ``CheckpointError`` / ``ValueError`` with one-line messages naming the file or the name."""
    from iared.models import create_model, load_model

    overrides = overrides or {}
    if checkpoint is not None:
        if model_name is not None:
            return create_model(model_name, checkpoint=checkpoint, **overrides)
        if overrides:
            raise ValueError("--model-override needs --model NAME (an iared checkpoint carries its own config)")
        return load_model(checkpoint)
    if model_name is None:
        raise ValueError("nothing to evaluate: give --checkpoint FILE, or --model NAME --pretrained")
    if not pretrained:
        raise ValueError(f"--model {model_name} without --checkpoint evaluates random weights; "
                         "add --pretrained or --checkpoint FILE")
    return create_model(model_name, pretrained=True, **overrides)


def build_loader(task: str, split: str, model_cfg, batch_size: int = 256, workers: int = 0,
                 limit: int | None = None, seed: int = 0) -> torch.utils.data.DataLoader:
    """Evaluation loader for a task name or an image folder, matched to the model's input
    (image size, mean / std for folders). ``limit``: first N samples only."""
    from iared.data import TASKS, build_dataset, eval_transform

    if task in TASKS:
        kw: dict[str, Any] = {"seed": seed}
        if limit is not None:
            kw["length"] = limit
        dataset = build_dataset(task, split, **kw)
    else:
        tf = eval_transform(model_cfg.img_size, mean=model_cfg.mean, std=model_cfg.std)
        dataset = build_dataset(task, split, transform=tf)
        if limit is not None:
            dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every evaluation shares: weights, data, device, output."""
    p.add_argument("--checkpoint", metavar="FILE", help="iared training checkpoint, or any weights file with --model")
    p.add_argument("--model", metavar="NAME", help="model name (see iared.models.list_models)")
    p.add_argument("--pretrained", action="store_true", help="with --model and no --checkpoint: shipped/timm weights")
    p.add_argument("--model-override", action="append", metavar="KEY=VALUE", default=[],
                   help="change a ViTConfig field of --model (repeatable)")
    p.add_argument("--task", default="digits-clutter", help="task name or image folder (default: digits-clutter)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples only")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _thresholds(text: str) -> float | list[float]:
    """``"0.5"`` -> 0.5; ``"0.3,0.5,0.5"`` -> one threshold per stage."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


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
                        "original when the backbone was fine-tuned: an iared checkpoint, or digits_vit for the "
                        "shipped one)")
    g.add_argument("--throughput-batch", type=int, default=64, metavar="B",
                   help="batch size of the throughput measurement (default: 64; the first images of the data, "
                        "repeated if fewer)")
    g.add_argument("--repeats", type=int, default=5, help="timed calls per throughput figure (median; default: 5)")
    p.set_defaults(func=main)
    return p


add_eval_parser = add_parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_backbone_eval(args: argparse.Namespace) -> dict[str, Any]:
    """The plain (unpruned) backbone evaluation behind ``iared eval``."""
    from iared.train.common import parse_overrides

    device = resolve_device(args.device)
    model = load_backbone(args.checkpoint, args.model, args.pretrained, parse_overrides(args.model_override))
    model.to(device)
    loader = build_loader(args.task, args.split, model.cfg, args.batch_size, args.workers, args.limit)
    start = time.perf_counter()
    metrics = evaluate_classifier(model, loader, device, progress=not args.json and sys.stderr.isatty())
    source = args.checkpoint or (f"{args.model}:pretrained" if args.model else None)
    return {"top1": metrics["top1"], "loss": metrics["loss"], "n": metrics["n"], "checkpoint": source,
            "model": args.model, "task": args.task, "split": args.split,
            "seconds": round(time.perf_counter() - start, 3)}


def report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{result['task']} {result['split']}: top-1 {100 * result['top1']:.2f}%  loss {result['loss']:.4f}  "
              f"(n={result['n']}, checkpoint {result['checkpoint']})")


def _trained_threshold(path) -> float:
    """The threshold recorded in a pruned checkpoint's training config, else 0.5."""
    from iared.checkpoint import read_checkpoint

    config = read_checkpoint(path).get("config")
    train = config.get("train") if isinstance(config, dict) else None
    value = train.get("threshold") if isinstance(train, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.5


def _reference_model(spec: str, model):
    """The unpruned comparison model: a registered name (pretrained weights) or a checkpoint file."""
    from iared.models import MODEL_CONFIGS, create_model, load_model

    ref = create_model(spec, pretrained=True) if spec in MODEL_CONFIGS else load_model(spec)
    if ref.cfg.to_dict() != model.backbone.cfg.to_dict():
        raise ValueError(f"--reference {spec}: its geometry differs from the pruned model's backbone")
    return ref


def run_pruned_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``iared eval --pruned``: pruned model vs its own backbone, one run, the same data.

    Accuracy and compute come from :func:`iared.measure.accuracy_and_compute`, called per loader
    batch (so large folders are never held in memory at once) and combined weighted by batch size;
    throughput from :func:`iared.measure.compare_throughput` on the first ``--throughput-batch`` images.
    """
    from iared.measure import accuracy_and_compute, compare_throughput
    from iared.pruning import load_pruned

    if args.checkpoint is not None or args.model is not None or args.pretrained or args.model_override:
        raise ValueError("--pruned takes no --checkpoint / --model / --pretrained / --model-override "
                         "(the pruned checkpoint carries its backbone)")
    if args.throughput_batch < 1 or args.repeats < 1:
        raise ValueError("--throughput-batch and --repeats must be at least 1")
    device = resolve_device(args.device)
    model = load_pruned(args.pruned).to(device)
    threshold = args.threshold if args.threshold is not None else _trained_threshold(args.pruned)
    if isinstance(threshold, list) and len(threshold) != model.num_stages:
        raise ValueError(f"--threshold: one value or {model.num_stages} (one per stage), got {len(threshold)}")
    loader = build_loader(args.task, args.split, model.backbone.cfg, args.batch_size, args.workers, args.limit)
    reference = _reference_model(args.reference, model).to(device) if getattr(args, "reference", None) else None

    start = time.perf_counter()
    n, sums, kept_sum, first = 0, {"accuracy_full": 0.0, "accuracy_pruned": 0.0, "gflops_pruned": 0.0}, None, []
    gflops_full = None
    for batch in loader:
        images, labels = batch[0], torch.as_tensor(batch[1])
        m = accuracy_and_compute(model, images, labels, threshold=threshold, batch_size=len(images), device=device,
                                 reference=reference)
        n += m["n"]
        for k in sums:
            sums[k] += m[k] * m["n"]
        kept = torch.tensor(m["kept_fraction"], dtype=torch.float64) * m["n"]
        kept_sum = kept if kept_sum is None else kept_sum + kept
        gflops_full = m["gflops_full"]
        if sum(len(x) for x in first) < args.throughput_batch:
            first.append(images)
    if n == 0:
        raise ValueError("evaluation loader yielded no samples")
    result: dict[str, Any] = {
        "checkpoint": args.pruned, "task": args.task, "split": args.split, "n": n, "threshold": threshold,
        "accuracy_full": sums["accuracy_full"] / n, "accuracy_pruned": sums["accuracy_pruned"] / n,
        "kept_fraction": [round(float(v), 4) for v in kept_sum / n],
        "gflops_full": gflops_full, "gflops_pruned": sums["gflops_pruned"] / n,
    }
    result["flops_reduction"] = 1 - result["gflops_pruned"] / gflops_full
    result["speedup_ideal"] = gflops_full / result["gflops_pruned"]
    result["seconds_accuracy"] = round(time.perf_counter() - start, 3)

    images = torch.cat(first)
    if len(images) < args.throughput_batch:  # too few samples: cycle them to fill the batch
        images = images[torch.arange(args.throughput_batch) % len(images)]
    speed = compare_throughput(model, images[: args.throughput_batch].to(device), threshold=threshold,
                               batch_size=args.throughput_batch, repeats=args.repeats)
    result.update(throughput_full=speed["throughput_full"], throughput_pruned=speed["throughput_pruned"],
                  speedup=speed["speedup"], throughput_batch=speed["batch_size"], device=speed["device"],
                  threads=speed["threads"])
    return result


def report_pruned(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    kept = ", ".join(f"{100 * v:.1f}%" for v in r["kept_fraction"])
    print(f"{r['task']} {r['split']} (n={r['n']}, threshold {r['threshold']}, checkpoint {r['checkpoint']})\n"
          f"{'':30}{'unpruned':>12}{'IA-RED²':>12}\n"
          f"{'top-1 accuracy':30}{r['accuracy_full']:>12.2%}{r['accuracy_pruned']:>12.2%}\n"
          f"{'GFLOPs / image':30}{r['gflops_full']:>12.4f}{r['gflops_pruned']:>12.4f}\n"
          f"{'throughput (img/s, batch ' + str(r['throughput_batch']) + ')':30}"
          f"{r['throughput_full']:>12.0f}{r['throughput_pruned']:>12.0f}\n"
          f"patch tokens kept after each stage: {kept}\n"
          f"speed-up: measured {r['speedup']:.2f}x ({r['device']}, {r['threads']} threads), "
          f"FLOPs-ideal {r['speedup_ideal']:.2f}x")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "pruned", None) is not None:
        report_pruned(run_pruned_eval(args), args.json)
    else:
        report(run_backbone_eval(args), args.json)
    return 0
