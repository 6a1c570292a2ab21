"""Threshold calibration on a deployment's own, unlabelled inputs: a kept-token budget in, thresholds out.

A threshold chosen on the training distribution keeps a different share of tokens on scenes the
interpreters never saw (their scores shift), so compute drifts away from what was measured.
:func:`calibrate_thresholds` picks each stage's threshold from a small sample of the inputs the
model will really see, no labels needed, so that the share of patch tokens kept meets a target::

    thresholds = iared.calibrate_thresholds(model, images, target_kept=0.3)   # (N, C, H, W), no labels
    model.calibrate(images, 0.3)            # the same, stored in model.inference (save_pruned keeps it)

The rule, stage by stage (earlier stages at their calibrated thresholds, so each stage sees the
tokens it will see at inference): the threshold is the score of this stage's interpreter that
leaves the wanted number of the sample's alive patch tokens above it (threshold mode keeps
``score > t``), pooled over the whole sample, so per-image counts still differ, which is what
threshold mode is for. The wanted number:

- ``target_kept=F`` (one value): every stage with an interpreter keeps the same share
  ``r = F ** (1 / G)`` of the patch tokens alive when it starts (G such stages): budget mode's
  uniform ``keep_ratio`` rule (:meth:`iared.stages.ReducedModel.macs_for_ratios`), so after the
  last stage ``F`` of the patch tokens are left on a ViT. One knob, no guess at a per-stage profile
  the sample cannot tell, and the count is taken from the tokens really alive, so the small excess
  or shortfall of a stage (tied scores) is not compounded by the next.
- ``target_kept=[F_0, ..., F_{G-1}]``: stage g keeps ``F_g`` of the patch tokens of its grid (the
  scale of :meth:`iared.stages.ReducedOutput.kept_fraction`), e.g. the profile a model has on its
  validation split; non-increasing on a ViT (a stage cannot bring tokens back).

Where tied scores make the wanted count unreachable, the nearest reachable count is taken (the
larger one on a tie). The returned thresholds lie in [0, 1], like every threshold.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_SAMPLES", "SMALL_SAMPLE", "calibrate_capacity", "calibrate_thresholds", "capacity_from_outputs",
           "check_calibration", "check_target_kept", "sample_inputs"]

# Fewer inputs than this: the pooled quantile still hits the target on the sample, but the sample says
# little about the image-to-image spread of the deployment's scores; worth a one-line warning.
SMALL_SAMPLE = 32
# The commands' default sample: seconds of forward passes on the shipped models, and ~10^4 tokens a stage.
DEFAULT_SAMPLES = 256


def check_target_kept(target_kept, num_stages: int | None = None, what: str = "--target-kept"):
    """``target_kept`` unchanged when valid (one value, or one per stage, each in (0, 1]), else a
    one-line ValueError naming it. ``num_stages``: also check a per-stage list's length."""
    values = list(target_kept) if isinstance(target_kept, (list, tuple)) else [target_kept]
    shown = ",".join(map(str, values))
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0]
    if not values or bad:
        raise ValueError(f"{what} {shown}: a fraction of patch tokens kept, in (0, 1] (got {bad[0] if bad else 'none'})")
    if num_stages is not None and len(values) not in (1, num_stages):
        raise ValueError(f"{what} {shown}: one value or {num_stages} (one per stage), got {len(values)}")
    return target_kept


def check_calibration(target_kept, threshold=None, samples: int | None = None) -> None:
    """A calibration request's refusals, one line each, before any model loads: the target
    (:func:`check_target_kept`), a threshold given as well (the two exclude each other), a sample
    size below 1. ``target_kept`` None: nothing is asked, nothing is checked."""
    if target_kept is None:
        return
    check_target_kept(target_kept)
    if threshold is not None:
        raise ValueError("--target-kept and --threshold exclude each other: --target-kept chooses the thresholds")
    if samples is not None and samples < 1:
        raise ValueError(f"--calibration-samples must be at least 1, got {samples}")


def sample_inputs(inputs: Tensor | Iterable, limit: int | None = None) -> Tensor:
    """The calibration sample as one tensor ``(N, ...)``: a tensor as it is, or the batches of an
    iterable (tensors, or ``(inputs, labels, ...)`` tuples of a loader: labels are never read),
    concatenated up to ``limit`` inputs."""
    if isinstance(inputs, Tensor):
        return inputs if limit is None else inputs[:limit]
    parts, n = [], 0
    for batch in inputs:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        parts.append(x if limit is None else x[: limit - n])
        n += len(parts[-1])
        if limit is not None and n >= limit:
            break
    if not parts:
        raise ValueError("calibration sample is empty: give at least one input")
    return torch.cat(parts)


def _threshold_for_count(scores: Tensor, want: int) -> float:
    """The threshold t (one of ``scores``' values, or 0) for which ``(scores > t).sum()`` is closest to
    ``want``, the larger count on a tie. ``scores``: 1-D, the alive patch tokens' scores."""
    values, counts = torch.unique(scores.float(), sorted=True, return_counts=True)  # ascending
    above = len(scores) - counts.cumsum(0)  # tokens strictly above each value
    candidates, kept = values, above
    if float(values[0]) > 0.0:  # 0 keeps every token (scores are probabilities)
        candidates = torch.cat([values.new_zeros(1), values])
        kept = torch.cat([above.new_full((1,), len(scores)), above])
    # argmin picks the first of equal distances: the smaller threshold, so the larger count
    best = int(torch.argmin((kept - want).abs()))
    return float(candidates[best])


@torch.no_grad()
def calibrate_thresholds(model, inputs: Tensor | Iterable, target_kept: float | Sequence[float], *,
                         batch_size: int = 64, warn: bool = True) -> list[float]:
    """Per-stage thresholds for ``model`` (an :class:`iared.pruning.IARed` or any
    :class:`iared.stages.ReducedModel` whose reducers score tokens) such that threshold mode keeps
    ``target_kept`` of the patch tokens on ``inputs`` (module docstring for the rule).

    ``inputs``: the unlabelled sample, ``(N, C, H, W)`` images or ``(N, T, C, H, W)`` clips, or an
    iterable of batches (:func:`sample_inputs`). ``batch_size``: forward passes are run in chunks of
    it (one pass over the sample per stage with a reducer). Stages without a reducer get 0.0 (unused).
    ``warn``: one line on stderr when the sample holds fewer than :data:`SMALL_SAMPLE` inputs.
    """
    G = model.num_stages
    check_target_kept(target_kept, G, "target_kept")
    x = sample_inputs(inputs)
    if len(x) == 0:
        raise ValueError("calibration sample is empty: give at least one input")
    if warn and len(x) < SMALL_SAMPLE:
        print(f"iared: calibrating thresholds on only {len(x)} input(s) (fewer than {SMALL_SAMPLE}): the kept "
              "fraction on other inputs may differ more from the target", file=sys.stderr)
    staged = [g for g in range(G) if model.reducer(g) is not None]
    if not staged:
        raise ValueError("nothing to calibrate: the model has no reducer that scores tokens")
    per_stage = isinstance(target_kept, (list, tuple)) and len(target_kept) > 1
    if not per_stage:
        ratio = float(target_kept[0] if isinstance(target_kept, (list, tuple)) else target_kept) ** (1 / len(staged))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    thresholds = [0.0] * G
    try:
        for stage in staged:
            # this stage and later ones keep every alive token (-1 is below any score): keep[stage] then
            # marks the tokens alive when this stage starts, scores[stage] scores them
            trial = thresholds[:stage] + [-1.0] * (G - stage)
            scores, alive_before, grid = [], 0, 0
            for start in range(0, len(x), batch_size):
                out = model(x[start: start + batch_size].to(device), "threshold", threshold=trial)
                p = out.num_prefix
                alive = out.keep[stage][:, p:]
                if out.scores[stage] is None:
                    raise ValueError(f"stage {stage}'s reducer gives no scores: its threshold cannot be calibrated")
                scores.append(out.scores[stage][:, p:][alive].float().cpu())
                alive_before += int(alive.sum())
                grid += alive.numel()
            if per_stage:
                want = round(float(target_kept[stage]) * grid)
            else:
                want = round(ratio * alive_before)
            thresholds[stage] = _threshold_for_count(torch.cat(scores), want) if alive_before else 0.0
    finally:
        model.train(was_training)
    return thresholds


@torch.no_grad()
def calibrate_capacity(model, inputs: Tensor | Iterable, threshold: float | Sequence[float], *,
                       quantile: float = 1.0, batch_size: int = 64) -> list[int | None]:
    """Per-stage token capacities for threshold mode's ``static`` layout
    (``model(x, "threshold", threshold=t, layout="static", capacity=caps)``): stage g's is the
    ``quantile`` of the per-image counts of patch tokens alive after stage g at ``threshold`` on
    ``inputs`` (unlabelled; :func:`sample_inputs`), rounded up. ``quantile=1.0``: the largest count
    seen, so no input of the sample overflows; lower: narrower graphs, and the rare image above the
    capacity loses its lowest-scored tokens (counted in ``output.overflow``). Stages without a
    reducer get None (no cap). Choose it on the validation split, as the thresholds."""
    _check_quantile(quantile)
    x = sample_inputs(inputs)
    if len(x) == 0:
        raise ValueError("calibration sample is empty: give at least one input")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        outputs = [model(x[start: start + batch_size].to(device), "threshold", threshold=threshold)
                   for start in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return capacity_from_outputs(model, outputs, quantile)


def capacity_from_outputs(model, outputs: Sequence, quantile: float = 1.0) -> list[int | None]:
    """:func:`calibrate_capacity`'s rule on threshold-mode outputs already computed
    (:class:`iared.stages.ReducedOutput`, one per batch): no second forward pass."""
    _check_quantile(quantile)
    per_image = torch.cat([torch.stack([k[:, out.num_prefix:].sum(1) for k in out.keep], 1).float().cpu()
                           for out in outputs])  # (N, G)
    caps = torch.quantile(per_image, quantile, dim=0).ceil().long().clamp(min=1)
    return [int(c) if model.reducer(g) is not None else None for g, c in enumerate(caps)]


def _check_quantile(quantile: float) -> None:
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"capacity quantile must lie in (0, 1], got {quantile}")
