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
from iared.explain.metrics import SegmentationMeter, deletion_insertion, pooled_miou
from iared.stats import paired_bootstrap_statistic
from iared.pruning import IARed

METRIC_NAMES = ("pixel_accuracy", "miou", "map", "pointing", "deletion", "insertion")
"""Reported per method; higher is better for all but ``deletion``."""

EXTRA_NAMES = ("ap_foreground", "iou_foreground", "iou_background", "seconds")
"""Also in each method's results (JSON), not in the printed table."""

DELETION_MODEL = "unpruned backbone (all tokens, fast path); target: its predicted class"
"""What deletion / insertion perturb and score, written into every report."""

INTERVAL_METRICS = {
    "miou": lambda d: pooled_miou(d["intersection"], d["union"]),
    "map": lambda d: torch.nanmean(d["ap"], -1),
    "ap_foreground": lambda d: torch.nanmean(d["ap_foreground"], -1),
    "deletion": lambda d: d["deletion"].mean(-1),
    "insertion": lambda d: d["insertion"].mean(-1),
}
"""metric -> its value from per-image values ``{key: (R, n, ...)}``: the statistics that
:func:`paired_differences` bootstraps (the set-level mIoU as a ratio of sums, the rest as means)."""

SELECTION_METRICS = (("miou", True), ("map", True), ("deletion", False))
"""(metric, higher is better): what a readout is chosen on (:func:`choose_by_rank`)."""


def build_methods(names: Iterable[str], threshold: float | None = None) -> dict[str, Method]:
    """``{name: method}`` from specs like ``"interpreter"`` or ``"raw-attention:0"``."""
    methods = {}
    for name in names:
        kwargs = {"threshold": threshold} if name.startswith("interpreter") else {}
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
    per_image: bool = False,
) -> dict:
    """Run ``methods`` on ``batches`` of ``(images (B, C, H, W), masks (B, H, W) bool)``.

    Returns ``{"n", "steps", "baseline", "tolerance", "threshold", "agreement", "methods":
    {name: {metric: value}}}`` with the metrics of :data:`METRIC_NAMES` and
    :data:`EXTRA_NAMES` (``seconds``: time spent computing that method's maps). ``agreement``
    is the share of images where the pruned model (threshold mode) predicts the backbone's
    class (None for a bare backbone). ``progress``: an object with ``update(n)`` (a tqdm bar).
    ``per_image``: also return ``"per_image": {name: {metric: (n, ...) tensor}}`` (the meter's
    :meth:`~iared.explain.metrics.SegmentationMeter.per_image` plus ``deletion`` / ``insertion``),
    what :func:`paired_differences` resamples; tensors, so not for JSON as they are.
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
    report = {"n": n, "steps": steps, "baseline": baseline if isinstance(baseline, str) else "tensor",
              "tolerance": tolerance, "threshold": threshold,
              "agreement": agree / n if isinstance(model, IARed) else None,
              "deletion_model": DELETION_MODEL, "methods": results}
    if per_image:
        report["per_image"] = {name: {**meters[name].per_image(),
                                      **{kind: torch.cat(v).double() for kind, v in causal[name].items()}}
                               for name in methods}
    return report


def paired_differences(per_image: Mapping[str, Mapping[str, Tensor]], method: str, others,
                       resamples: int = 2000, seed: int = 0) -> dict:
    """``{other: {metric: {"mean", "lo", "hi"}}}``: ``method`` minus each of ``others`` on every metric
    of :data:`INTERVAL_METRICS`, with a 95 % paired bootstrap interval over images (the same
    resampled images score both; :func:`iared.stats.paired_bootstrap_statistic`). Positive is better
    for ``method`` on every metric but deletion."""
    mine = per_image[method]
    return {other: {metric: _paired(mine, per_image[other], statistic, resamples, seed)
                    for metric, statistic in INTERVAL_METRICS.items()}
            for other in others}


def _paired(a: dict, b: dict, statistic, resamples: int, seed: int) -> dict:
    """:func:`paired_bootstrap_statistic` over dicts of per-image tensors: their columns are packed
    into one ``(n, k)`` tensor per method so one set of resampled images serves every key."""
    keys = list(a)
    widths = [1 if a[k].dim() == 1 else a[k].shape[1] for k in keys]

    def pack(d):
        return torch.cat([d[k].double().reshape(d[k].shape[0], -1) for k in keys], 1)

    def unpack(x):  # (R, n, k) -> {key: (R, n) or (R, n, w)}
        parts = torch.split(x, widths, dim=-1)
        return {k: p[..., 0] if a[k].dim() == 1 else p for k, p in zip(keys, parts)}

    return paired_bootstrap_statistic(pack(a), pack(b), lambda x: statistic(unpack(x)), resamples, seed)


def choose_by_rank(methods: Mapping[str, Mapping[str, float]], metrics=SELECTION_METRICS) -> tuple[str, dict]:
    """The method with the best mean rank over ``metrics`` (1 = best; ties share the mean rank),
    ties broken by the first metric, then by order. Returns ``(name, {name: mean rank})``."""
    names = list(methods)
    ranks = dict.fromkeys(names, 0.0)
    for metric, higher in metrics:
        values = {n: methods[n][metric] * (-1 if higher else 1) for n in names}  # smaller is better
        for n in names:
            better = sum(values[m] < values[n] for m in names)
            tied = sum(values[m] == values[n] for m in names)
            ranks[n] += (better + (tied + 1) / 2) / len(metrics)
    first, higher = metrics[0]
    best = min(names, key=lambda n: (ranks[n], -methods[n][first] if higher else methods[n][first],
                                     names.index(n)))
    return best, ranks


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
