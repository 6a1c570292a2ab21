"""Accuracy, compute and speed of a pruned model against its own backbone, in one run on the same data.

Used by ``iared eval`` (of a pruned checkpoint), ``iared demo`` and the interpreter trainer's periodic
evaluation, so the three report the same figures the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iared.pruning import IARed
from iared.timing import REPEATS, median_ms, speed_probe_ms, synchronize, time_interleaved  # noqa: F401  (synchronize: re-exported)


@torch.no_grad()
def accuracy_and_compute(model: IARed, images: Tensor, labels: Tensor, *, threshold: float = 0.5,
                         batch_size: int = 256, device: torch.device | str = "cpu",
                         include_full: bool = True, mode="threshold", reference=None) -> dict:
    """Top-1 of the unpruned and pruned (threshold mode) model, kept fractions and GFLOPs.

    ``images``: ``(N, C_in, H, W)``; ``labels``: ``(N,)``. Pruned compute is averaged per image.
    ``mode``: ``threshold`` for every stage, or one mode per stage (curriculum evaluation runs
    the stages not trained yet in ``all``). ``reference``: the unpruned model to compare with
    (default ``model.backbone``; pass the original backbone when ``model``'s was fine-tuned).
    """
    reference = model.backbone if reference is None else reference.eval()
    model.eval()
    full_correct = pruned_correct = 0
    macs, kept = [], []
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].to(device)
        y = labels[start: start + batch_size].to(device)
        if include_full:
            full_correct += int((reference(x).argmax(-1) == y).sum())
        # accuracy does not depend on the layout (tests check packed == padded); padded is the
        # cheapest to run for arbitrary per-image counts on every device
        out = model(x, mode, threshold=threshold, layout="padded")
        pruned_correct += int((out.logits.argmax(-1) == y).sum())
        macs.append(out.macs.cpu())
        kept.append(out.kept_fraction().cpu())
    n = len(images)
    full_macs = model.full_macs()
    mean_macs = float(torch.cat(macs).mean())
    result = {
        "n": n,
        "threshold": threshold,
        "accuracy_pruned": pruned_correct / n,
        "kept_fraction": [round(float(v), 4) for v in torch.cat(kept).mean(0)],
        "gflops_full": full_macs / 1e9,
        "gflops_pruned": mean_macs / 1e9,
        "flops_reduction": 1 - mean_macs / full_macs,
        "speedup_ideal": full_macs / mean_macs,
    }
    if include_full:
        result["accuracy_full"] = full_correct / n
    return result


@torch.inference_mode()  # as iared bench times: the same model and batch give the same number
def compare_throughput(model: IARed, images: Tensor, *, threshold: float = 0.5, batch_size: int = 64,
                       repeats: int = REPEATS, clock: str = "wall") -> dict:
    """Measured images/s of the unpruned backbone and the pruned model (packed threshold mode),
    timed interleaved by :func:`iared.timing.time_interleaved` (median of ``repeats``; ``clock`` as there)."""
    model.eval()
    batch = images[:batch_size]
    runs = {"full": lambda: model.backbone(batch), "pruned": lambda: model(batch, threshold=threshold)}
    times = time_interleaved(runs, batch.device, repeats=repeats, clock=clock)
    full, pruned = (len(batch) * 1e3 / median_ms(times[n]) for n in ("full", "pruned"))
    # the probe says how fast the machine ran: two commands' speed-ups compare when their probes do
    return {"batch_size": len(batch), "device": str(batch.device), "threads": torch.get_num_threads(),
            "clock": clock, "throughput_full": full, "throughput_pruned": pruned, "speedup": pruned / full,
            "speed_probe_ms": round(speed_probe_ms(batch.device), 4)}


@torch.inference_mode()
def accuracy_throughput_curve(model: IARed, images: Tensor, labels: Tensor, thresholds, *, batch_size: int = 64,
                              repeats: int = REPEATS, clock: str = "wall", reference=None) -> dict:
    """Top-1 on ``images`` and measured images/s at ``batch_size`` of the unpruned model and of the
    pruned one at every threshold, all timed interleaved in one run on the same batch.

    Returns ``{"batch_size", "clock", "unpruned": {...}, "points": [{"threshold", "top1", "gflops",
    "images_per_s", "speedup"}, ...]}`` (points in the order of ``thresholds``)."""
    reference = model.backbone if reference is None else reference.eval()
    model.eval()
    batch = images[:batch_size]
    if len(batch) < batch_size:  # too few images: cycle them to fill the batch
        batch = images[torch.arange(batch_size) % len(images)]
    points = []
    full_top1 = None
    for i, t in enumerate(thresholds):
        r = accuracy_and_compute(model, images, labels, threshold=t, include_full=i == 0, reference=reference)
        if i == 0:
            full_top1, full_gflops = r["accuracy_full"], r["gflops_full"]
        points.append({"threshold": t, "top1": r["accuracy_pruned"], "gflops": r["gflops_pruned"]})
    fns = {"unpruned": lambda: reference(batch)}
    for p in points:
        fns[str(p["threshold"])] = lambda t=p["threshold"]: model(batch, threshold=t)
    times = time_interleaved(fns, batch.device, repeats=repeats, clock=clock)
    full_ips = len(batch) * 1e3 / median_ms(times["unpruned"])
    for p in points:
        p["images_per_s"] = len(batch) * 1e3 / median_ms(times[str(p["threshold"])])
        p["speedup"] = p["images_per_s"] / full_ips
    return {"batch_size": len(batch), "clock": clock, "points": points,
            "unpruned": {"top1": full_top1, "gflops": full_gflops, "images_per_s": full_ips}}
