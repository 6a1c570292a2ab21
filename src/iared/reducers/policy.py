"""From per-token scores to keep decisions: the one place for the threshold, sampling and top-k rules."""

from __future__ import annotations

import torch
from torch import Tensor

from iared.reducers.base import MODES, StageSettings
from iared.tokens import Decision, Tokens


def budget_count(alive: int, ratio: float) -> int:
    """Patch tokens kept by a budget (top-k) stage out of ``alive``: at least one while any is alive."""
    return max(1, round(ratio * alive)) if alive else 0


def budget_counts(num_patches: int, ratios) -> list[int]:
    """Patch tokens alive after each budget stage, stage after stage."""
    counts, alive = [], num_patches
    for r in ratios:
        alive = budget_count(alive, r)
        counts.append(alive)
    return counts


def keep_from_scores(tokens: Tokens, scores: Tensor, settings: StageSettings, macs=0.0) -> Decision:
    """The decision for ``scores`` under ``settings``: token-aligned keeps, and the ``(B,)``
    log-probability when sampling; ``macs`` is the scoring method's own cost."""
    keep, log_prob, count = _keep(tokens, scores, settings)
    if tokens.num_prefix == 0 and count is None:
        keep = keep_best_if_empty(tokens, keep, scores)
    return Decision(keep=keep, scores=scores, log_prob=log_prob, macs=macs, kept_count=count)


def keep_best_if_empty(tokens: Tokens, keep: Tensor, scores: Tensor) -> Tensor:
    """``keep`` where an image that would keep no token at all keeps its best-scoring one.

    Only a backbone without prefix tokens (no class token, no registers) can lose every token; an
    empty sequence has nothing to attend to or pool, so its best token stays (in sample mode that
    token's log-probability is still the one of the draw that dropped it: a rare, forced keep)."""
    kept = tokens.sum_per_image((keep & tokens.patch_mask()).to(scores.dtype))
    real = tokens.patch_mask()
    best = real & (scores >= tokens.per_token(tokens.max_per_image(torch.where(real, scores, -torch.inf))))
    return keep | (best & tokens.per_token(kept == 0))


def _keep(tokens: Tokens, scores: Tensor, settings: StageSettings):
    mode = settings.mode
    if mode == "threshold":
        return scores > settings.threshold, None, None
    if mode == "sample":
        eps = settings.exploration
        probs = (eps + (1 - 2 * eps) * scores).clamp(1e-6, 1 - 1e-6)
        if settings.noise is not None:
            u = settings.noise.to(probs.device)[tokens.image_ids(), tokens.index]
        else:
            u = torch.rand_like(probs)
        keep = (u < probs.detach())
        log_p = torch.where(keep, probs.log(), (1 - probs).log()) * tokens.patch_mask()
        return keep, tokens.sum_per_image(log_p), None
    if mode == "budget":
        if settings.keep_ratio is None:
            raise ValueError("budget mode needs a keep ratio")
        alive = tokens.uniform_length()
        if alive is None:
            raise ValueError("budget mode needs a dense batch: run earlier stages in budget mode too")
        k = budget_count(alive - tokens.num_prefix, settings.keep_ratio)
        return tokens.top_k(scores, k), None, k + tokens.num_prefix
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
