"""Every method, every metric, one pass over a set of (image, mask) pairs.

The class explained (and scored by deletion / insertion) is the unpruned backbone's prediction
for each image, computed once per batch and handed to every method, so all methods explain the
same decision of the same weights. Deletion / insertion score with the backbone's fast path.
The interpreter maps come from the pruned model (threshold mode); the other methods explain
the backbone (see :mod:`iared.explain.methods`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from iared.explain.methods import Method, backbone_of, make_method
from iared.explain.metrics import SegmentationMeter, deletion_insertion
from iared.pruning import IARed

METRIC_NAMES = ("pixel_accuracy", "miou", "map", "pointing", "deletion", "insertion")
"""Reported per method; higher is better for all but ``deletion``."""

EXTRA_NAMES = ("ap_foreground", "iou_foreground", "iou_background", "seconds")
"""Also in each method's results (JSON), not in the printed table."""


def build_methods(names: Iterable[str], threshold: float | None = None) -> dict[str, Method]:
    """``{name: method}`` from specs like ``"interpreter"`` or ``"raw-attention:0"``."""
    methods = {}
    for name in names:
        kwargs = {"threshold": threshold} if name.partition(":")[0] == "interpreter" else {}
        methods[name] = make_method(name, **kwargs)
    return methods


def evaluate_explanations(
    model: IARed,
    batches: Iterable[tuple[Tensor, Tensor]],
    methods: Mapping[str, Method],
    *,
    steps: int = 16,
    baseline="rise",
    tolerance: float = 0.0,
    threshold: float | None = None,
    device: torch.device | str = "cpu",
    progress=None,
) -> dict:
    """Run ``methods`` on ``batches`` of ``(images (B, C, H, W), masks (B, H, W) bool)``.

    Returns ``{"n", "steps", "baseline", "tolerance", "threshold", "agreement", "methods":
    {name: {metric: value}}}`` with the metrics of :data:`METRIC_NAMES` and
    :data:`EXTRA_NAMES` (``seconds``: time spent computing that method's maps). ``agreement``
    is the share of images where the pruned model (threshold mode) predicts the backbone's
    class (None for a bare backbone). ``progress``: an object with ``update(n)`` (a tqdm bar).
    """
    model = model.eval().to(device)
    backbone = backbone_of(model)
    meters = {name: SegmentationMeter(tolerance) for name in methods}
    causal = {name: {"deletion": [], "insertion": []} for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    agree = n = 0
    for images, masks in batches:
        images, masks = images.to(device), masks.to(device).bool()
        with torch.no_grad():
            target = backbone(images).argmax(-1)
            if isinstance(model, IARed):
                agree += int((model(images, threshold=model.inference.threshold if threshold is None else threshold)
                              .logits.argmax(-1) == target).sum())
        for name, method in methods.items():
            start = time.perf_counter()
            maps = method(model, images, target)
            seconds[name] += time.perf_counter() - start
            meters[name].update(maps, masks)
            for kind, values in deletion_insertion(backbone, images, maps, target, steps=steps,
                                                   baseline=baseline).items():
                causal[name][kind].append(values.cpu())
        n += len(images)
        if progress is not None:
            progress.update(len(images))
    if n == 0:
        raise ValueError("explain-eval: no images to evaluate")
    results = {}
    for name in methods:
        scores = meters[name].compute()
        scores.update({kind: float(torch.cat(v).mean()) for kind, v in causal[name].items()})
        scores["seconds"] = seconds[name]
        results[name] = {k: scores[k] for k in (*METRIC_NAMES, *EXTRA_NAMES)}
    return {"n": n, "steps": steps, "baseline": baseline if isinstance(baseline, str) else "tensor",
            "tolerance": tolerance, "threshold": threshold,
            "agreement": agree / n if isinstance(model, IARed) else None, "methods": results}


def format_table(results: dict) -> str:
    """A fixed-width text table of :func:`evaluate_explanations`' per-method metrics."""
    header = ["method", "pixAcc", "mIoU", "mAP", "point", "del(v)", "ins(^)", "sec"]
    keys = [*METRIC_NAMES, "seconds"]

    def cell(key, value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.1f}" if key == "seconds" else f"{value:.4f}"

    rows = [[name] + [cell(k, m[k]) for k in keys] for name, m in results["methods"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
