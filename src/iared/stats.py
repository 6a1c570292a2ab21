"""Statistics shared by the reports: paired bootstrap intervals for accuracy differences."""

from __future__ import annotations

import torch
from torch import Tensor


def paired_bootstrap(correct_a: Tensor, correct_b: Tensor, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of ``a - b`` accuracy and its percentile bootstrap interval, resampling clusters.

    ``correct_a`` / ``correct_b``: ``(S,)`` or ``(S, T)`` 0/1 outcomes of two methods on the same
    items; with two dimensions each row is a cluster (a video stream: its frames are not independent)
    and whole rows are resampled. Returns ``{"mean", "lo", "hi"}`` as fractions.
    """
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"paired bootstrap needs outcomes on the same items: {tuple(correct_a.shape)} vs "
                         f"{tuple(correct_b.shape)}")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    diff = (correct_a.double() - correct_b.double())
    diff = diff.reshape(diff.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(diff.shape[0], (resamples, diff.shape[0]), generator=g)
    means = diff[picks].mean(dim=(1, 2))
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return {"mean": float(diff.mean()), "lo": lo, "hi": hi}
