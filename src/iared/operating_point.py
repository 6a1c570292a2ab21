"""Choosing where a pruned model runs, on the validation split: the cheapest threshold within a loss.

``--max-loss PT`` (``iared demo``, ``iared eval``) sweeps threshold mode over :data:`SWEEP` on
labelled validation inputs and keeps the threshold with the fewest GFLOPs whose top-1 is at most
``PT`` points below the unpruned model's on the same inputs; the test split is then evaluated once,
at that threshold. "Cheapest" is counted in FLOPs, not in measured time: on one model threshold
mode's time follows its FLOPs, and a FLOPs count does not move with the load of a shared machine,
so the choice is reproducible. No threshold within the loss: the one of highest top-1 (fewest
GFLOPs among equals), with a one-line warning.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import Tensor

SWEEP: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def check_max_loss(max_loss: float | None) -> None:
    """One line when ``--max-loss`` is not a loss in points in [0, 100)."""
    if max_loss is not None and not 0.0 <= max_loss < 100.0:
        raise ValueError(f"--max-loss {max_loss}: a top-1 loss in points, in [0, 100)")


def choose_threshold(model, images: Tensor, labels: Tensor, max_loss: float, *,
                     thresholds: Sequence[float] = SWEEP, reference=None, batch_size: int = 256,
                     warn: bool = True) -> dict:
    """The cheapest threshold of ``thresholds`` within ``max_loss`` points of the unpruned top-1.

    ``model``: an :class:`iared.pruning.IARed`; ``images`` / ``labels``: the validation inputs
    ``(N, ...)`` and ``(N,)``; ``reference``: the unpruned model (default ``model.backbone``).
    Returns ``{"threshold", "max_loss", "within", "n", "accuracy_full", "points": [{"threshold",
    "top1", "loss_pt", "gflops", "kept_fraction"}, ...]}`` (the sweep, in the order given).
    """
    from iared.measure import accuracy_and_compute

    check_max_loss(max_loss)
    if not thresholds:
        raise ValueError("choose_threshold: no thresholds to choose from")
    points, full = [], None
    for i, t in enumerate(thresholds):
        r = accuracy_and_compute(model, images, labels, threshold=t, include_full=i == 0, reference=reference,
                                 batch_size=batch_size)
        full = r["accuracy_full"] if i == 0 else full
        points.append({"threshold": t, "top1": r["accuracy_pruned"],
                       "loss_pt": round(100 * (full - r["accuracy_pruned"]), 4),
                       "gflops": r["gflops_pruned"], "kept_fraction": r["kept_fraction"]})
    # a small tolerance: 100 * (a - b) of two fractions of the same n is not exact in floating point
    within = [p for p in points if p["loss_pt"] <= max_loss + 1e-9]
    if within:
        best = min(within, key=lambda p: (p["gflops"], -p["top1"]))
    else:
        best = min(points, key=lambda p: (-p["top1"], p["gflops"]))
        if warn:
            print(f"iared: no threshold of {', '.join(f'{t:g}' for t in thresholds)} stays within --max-loss "
                  f"{max_loss:g} pt on the {len(images)} validation inputs; using {best['threshold']:g} (loss "
                  f"{best['loss_pt']:.2f} pt, the smallest)", file=sys.stderr)
    return {"threshold": best["threshold"], "max_loss": max_loss, "within": bool(within), "n": len(images),
            "accuracy_full": full, "points": points}
