"""Evaluation of a backbone, and of a pruned model against its backbone (``iared eval``'s library).

- :func:`evaluate_classifier`: top-1 and loss of any model over any loader of ``(image, label, ...)``.
- :func:`evaluate_backbone`: a backbone chosen as every command chooses one
  (:func:`iared.loading.load_backbone`: ``checkpoint`` and / or ``model``; nothing on
  ``digits-clutter`` means the shipped backbone) on a task's split.
- :func:`evaluate_pruned`: an IA-RED² checkpoint against its own backbone (or ``reference``) in
  one run on the same data: top-1 of both, kept fraction per stage, GFLOPs and the FLOPs-ideal
  speed-up (:func:`iared.measure.accuracy_and_compute`), and measured throughput of both on one
  batch (:func:`iared.measure.compare_throughput`).

The command (:mod:`iared.commands.eval`) parses options, calls these and prints
:func:`format_backbone` / :func:`format_pruned`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iared.timing import REPEATS

__all__ = [
    "build_loader",
    "evaluate_backbone",
    "evaluate_classifier",
    "evaluate_pruned",
    "format_backbone",
    "format_pruned",
    "resolve_device",
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


def build_loader(task: str, split: str, model_cfg, batch_size: int = 256, workers: int = 0,
                 limit: int | None = None, seed: int = 0) -> torch.utils.data.DataLoader:
    """Evaluation loader for a task name or an image folder, matched to the model's input
    (:func:`iared.loading.task_dataset`). ``limit``: first N samples only."""
    from iared.data import TASKS
    from iared.loading import check_labels_fit, task_dataset

    if task in TASKS:
        dataset = task_dataset(task, split, model_cfg, seed=seed, **({"length": limit} if limit is not None else {}))
    else:
        dataset = task_dataset(task, split, model_cfg)
        check_labels_fit(dataset, model_cfg.num_classes, task)
        if limit is not None:
            dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_backbone(*, checkpoint: str | None = None, model: str | None = None, pretrained: bool = False,
                      overrides: dict | None = None, task: str = "digits-clutter", split: str = "test",
                      batch_size: int = 256, workers: int = 0, limit: int | None = None, device: str = "auto",
                      progress: bool = False) -> dict[str, Any]:
    """Top-1 and loss of the backbone named by ``checkpoint`` / ``model`` on ``task``'s ``split``;
    with neither, the task's shipped backbone (:data:`iared.models.TASK_BACKBONES`)."""
    from iared.loading import load_backbone
    from iared.models import TASK_BACKBONES

    dev = resolve_device(device)
    default = TASK_BACKBONES.get(task)
    if checkpoint is None and model is None and default is None:
        raise ValueError(f"nothing to evaluate: --task {task} has no shipped backbone; give --checkpoint FILE, "
                         "or --model NAME --pretrained")
    net = load_backbone(checkpoint, model, pretrained, overrides, default=default).to(dev)
    loader = build_loader(task, split, net.cfg, batch_size, workers, limit)
    start = time.perf_counter()
    metrics = evaluate_classifier(net, loader, dev, progress=progress)
    if checkpoint is not None:
        source = str(checkpoint)
    elif model is not None:
        source = f"{model}:pretrained"
    else:
        source = f"{default}:shipped"
    return {"top1": metrics["top1"], "loss": metrics["loss"], "n": metrics["n"], "checkpoint": source,
            "model": model, "task": task, "split": split, "seconds": round(time.perf_counter() - start, 3)}


def format_backbone(result: dict[str, Any]) -> str:
    return (f"{result['task']} {result['split']}: top-1 {100 * result['top1']:.2f}%  loss {result['loss']:.4f}  "
            f"(n={result['n']}, checkpoint {result['checkpoint']})")


def _reference_model(spec: str, model):
    """The unpruned comparison model: a registered name (pretrained weights) or a checkpoint file."""
    from iared.loading import load_backbone
    from iared.models import MODEL_CONFIGS

    ref = load_backbone(None, spec, pretrained=True) if spec in MODEL_CONFIGS else load_backbone(spec)
    if ref.cfg.to_dict() != model.backbone.cfg.to_dict():
        raise ValueError(f"--reference {spec}: its geometry differs from the pruned model's backbone")
    return ref


def evaluate_pruned(pruned: str, *, threshold: float | Sequence[float] | None = None, reference: str | None = None,
                    task: str = "digits-clutter", split: str = "test", batch_size: int = 256, workers: int = 0,
                    limit: int | None = None, device: str = "auto", throughput_batch: int = 64,
                    repeats: int = REPEATS, clock: str = "wall", target_kept: float | Sequence[float] | None = None,
                    calibration_samples: int | None = None, on_calibrated=None) -> dict[str, Any]:
    """An IA-RED² checkpoint vs its own backbone (or ``reference``), one run, the same data.

    Accuracy and compute come from :func:`iared.measure.accuracy_and_compute`, called per loader
    batch (so large folders are never held in memory at once) and combined weighted by batch size;
    throughput from :func:`iared.measure.compare_throughput` on the first ``throughput_batch`` images.
    ``threshold``: one value or one per stage; None: the one the checkpoint was trained with, else 0.5.
    ``target_kept``: instead, thresholds calibrated on the first ``calibration_samples`` (default
    :data:`iared.calibration.DEFAULT_SAMPLES`) inputs of the
    evaluated data, labels unread (:meth:`iared.pruning.IARed.calibrate`), so the kept fraction meets
    it; ``on_calibrated(model)`` is called then. The result then also holds the file's threshold.
    """
    from iared.calibration import DEFAULT_SAMPLES, check_calibration, check_target_kept, sample_inputs
    from iared.loading import load_pruned_checked
    from iared.measure import accuracy_and_compute, compare_throughput
    from iared.reducers.base import check_threshold

    if throughput_batch < 1 or repeats < 1:
        raise ValueError("--throughput-batch and --repeats must be at least 1")
    check_threshold(threshold)  # before the model loads
    check_calibration(target_kept, threshold, calibration_samples)
    dev = resolve_device(device)
    model = load_pruned_checked(pruned).to(dev)
    stored = model.inference.threshold
    if target_kept is not None:
        check_target_kept(target_kept, model.num_stages)
    threshold = threshold if threshold is not None else stored
    if isinstance(threshold, (list, tuple)):
        threshold = list(threshold)
        if len(threshold) != model.num_stages:
            raise ValueError(f"--threshold: one value or {model.num_stages} (one per stage), got {len(threshold)}")
    loader = build_loader(task, split, model.backbone.cfg, batch_size, workers, limit)
    ref_model = _reference_model(reference, model).to(dev) if reference else None
    calibration = {}
    if target_kept is not None:
        sample = sample_inputs(loader, calibration_samples or DEFAULT_SAMPLES)
        threshold = model.calibrate(sample, target_kept, batch_size=batch_size).threshold
        calibration = {"target_kept": model.inference.target_kept, "calibration_samples": len(sample),
                       "threshold_stored": stored}
        if on_calibrated is not None:
            on_calibrated(model)

    start = time.perf_counter()
    n, sums, kept_sum, first = 0, {"accuracy_full": 0.0, "accuracy_pruned": 0.0, "gflops_pruned": 0.0}, None, []
    gflops_full = None
    for batch in loader:
        images, labels = batch[0], torch.as_tensor(batch[1])
        m = accuracy_and_compute(model, images, labels, threshold=threshold, batch_size=len(images), device=dev,
                                 reference=ref_model)
        n += m["n"]
        for k in sums:
            sums[k] += m[k] * m["n"]
        kept = torch.tensor(m["kept_fraction"], dtype=torch.float64) * m["n"]
        kept_sum = kept if kept_sum is None else kept_sum + kept
        gflops_full = m["gflops_full"]
        if sum(len(x) for x in first) < throughput_batch:
            first.append(images)
    if n == 0:
        raise ValueError("evaluation loader yielded no samples")
    result: dict[str, Any] = {
        "checkpoint": str(pruned), "task": task, "split": split, "n": n, "threshold": threshold, **calibration,
        "accuracy_full": sums["accuracy_full"] / n, "accuracy_pruned": sums["accuracy_pruned"] / n,
        "kept_fraction": [round(float(v), 4) for v in kept_sum / n],
        "gflops_full": gflops_full, "gflops_pruned": sums["gflops_pruned"] / n,
    }
    result["flops_reduction"] = 1 - result["gflops_pruned"] / gflops_full
    result["speedup_ideal"] = gflops_full / result["gflops_pruned"]
    result["seconds_accuracy"] = round(time.perf_counter() - start, 3)

    images = torch.cat(first)
    if len(images) < throughput_batch:  # too few samples: cycle them to fill the batch
        images = images[torch.arange(throughput_batch) % len(images)]
    speed = compare_throughput(model, images[:throughput_batch].to(dev), threshold=threshold,
                               batch_size=throughput_batch, repeats=repeats, clock=clock)
    result.update(throughput_full=speed["throughput_full"], throughput_pruned=speed["throughput_pruned"],
                  speedup=speed["speedup"], throughput_batch=speed["batch_size"], device=speed["device"],
                  threads=speed["threads"], clock=speed["clock"], speed_probe_ms=speed["speed_probe_ms"])
    return result


def format_pruned(result: dict[str, Any]) -> str:
    r = result
    kept = ", ".join(f"{100 * v:.1f}%" for v in r["kept_fraction"])
    threshold = (f"thresholds {', '.join(f'{t:.4g}' for t in r['threshold'])} calibrated on "
                 f"{r['calibration_samples']} unlabelled inputs for kept {r['target_kept']} (file's: "
                 f"{r['threshold_stored']})" if "target_kept" in r else f"threshold {r['threshold']}")
    return (f"{r['task']} {r['split']} (n={r['n']}, {threshold}, checkpoint {r['checkpoint']})\n"
          f"{'':30}{'unpruned':>12}{'IA-RED²':>12}\n"
          f"{'top-1 accuracy':30}{r['accuracy_full']:>12.2%}{r['accuracy_pruned']:>12.2%}\n"
          f"{'GFLOPs / image':30}{r['gflops_full']:>12.4f}{r['gflops_pruned']:>12.4f}\n"
          f"{'throughput (img/s, batch ' + str(r['throughput_batch']) + ')':30}"
          f"{r['throughput_full']:>12.0f}{r['throughput_pruned']:>12.0f}\n"
          f"patch tokens kept after each stage: {kept}\n"
          f"speed-up: measured {r['speedup']:.2f}x ({r['device']}, {r['threads']} threads"
          + (f", speed probe {r['speed_probe_ms']:.3f} ms" if r.get("speed_probe_ms") is not None else "")
          + f"), FLOPs-ideal {r['speedup_ideal']:.2f}x")
