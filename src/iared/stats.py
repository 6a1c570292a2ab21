"""Statistics shared by the reports: paired bootstrap intervals for differences between two methods."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def paired_bootstrap(correct_a: Tensor, correct_b: Tensor, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` accuracy and its percentile bootstrap interval, resampling clusters.

    ``correct_a`` / ``correct_b``: ``(S,)`` or ``(S, T)`` 0/1 outcomes of two methods on the same
    items; with two dimensions each row is a cluster (a video stream: its frames are not independent)
    and whole rows are resampled. Returns ``{"mean", "lo", "hi"}`` as fractions.
    """
    flat_a = correct_a.double().reshape(correct_a.shape[0], -1)
    flat_b = correct_b.double().reshape(correct_b.shape[0], -1)
    return paired_bootstrap_statistic(flat_a, flat_b, lambda x: x.mean(dim=(-2, -1)), resamples, seed, level)


def paired_bootstrap_statistic(values_a: Tensor, values_b: Tensor, statistic: Callable[[Tensor], Tensor],
                               resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """``statistic(a) - statistic(b)`` and its percentile bootstrap interval, items resampled in pairs.

    ``values_a`` / ``values_b``: ``(S, ...)`` per-item values of two methods on the same S items (for a
    ratio of sums such as a pooled IoU: each item's numerator and denominator). ``statistic`` maps
    ``(R, S, ...)`` (R resamples of the S items; ``R = 1`` for the observed value) to ``(R,)``. The same
    resampled items score both methods, so the interval is that of the paired difference.
    Returns ``{"mean", "lo", "hi"}``.
    """
    if values_a.shape != values_b.shape:
        raise ValueError(f"paired bootstrap needs outcomes on the same items: {tuple(values_a.shape)} vs "
                         f"{tuple(values_b.shape)}")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(values_a.shape[0], (resamples, values_a.shape[0]), generator=g)
    diffs = (statistic(values_a[picks]) - statistic(values_b[picks])).double()
    tail = (1 - level) / 2
    lo, hi = torch.quantile(diffs, torch.tensor([tail, 1 - tail], dtype=diffs.dtype)).tolist()
    observed = float(statistic(values_a[None]) - statistic(values_b[None]))
    return {"mean": observed, "lo": lo, "hi": hi}
