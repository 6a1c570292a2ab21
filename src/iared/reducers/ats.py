"""ATS: adaptive token sampling (Fayyaz et al., "Adaptive Token Sampling for Efficient Vision
Transformers", ECCV 2022).

Significance of patch token j: ``S_j = a_j ||v_j|| / sum_i a_i ||v_i||`` over the alive patch
tokens, with ``a_j`` the class token's attention to j and ``v_j`` its value (both from the block
before: ``BlockRecord.cls_attention``, ``BlockRecord.values_norm``). Tokens are sorted by
significance, the cumulative distribution ``F`` is built, and K evenly spaced quantiles
``y_k = (k + 1/2) / K`` are mapped back through ``F^-1`` (inverse transform sampling at fixed
points: deterministic at inference, as the paper). A token is kept if any quantile lands on it,
so an image keeps *at most* K patch tokens: fewer when its significance is concentrated. Counts
differ per image, so the batch becomes packed (or padded). Training-free.

Where this differs from the paper (and why):

- Placement: ATS samples inside a block, from that block's attention, and keeps the sampled
  rows of the attention output. Here it sits before a stage and reads the block before it.
- Value norm: ``BlockRecord.values_norm`` is the mean over heads of the per-head norms; the
  paper takes the norm of the concatenated heads.
- Quantiles: the paper's code spaces its points from the smallest non-zero CDF value to 1 and
  picks the token with the *closest* CDF value; we use mid-point quantiles and the proper
  inverse (the first token whose CDF reaches the quantile), so the share of quantiles landing on
  a token is its significance, and K = n quantiles of a uniform significance keep every token.
- No lower bound on K (the paper's code keeps at least 8 tokens).
- A backbone without class token (average pooling): ``a_j`` is the attention of the mean of the
  alive patch tokens' queries (see :class:`iared.models.vit.BlockRecord`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from iared import flops
from iared.reducers.base import Reducer, StageInput
from iared.reducers.grid import from_grid, grid_width, patch_counts, to_grid
from iared.tokens import Decision, Tokens


def inverse_transform_keep(tokens: Tokens, significance: Tensor, samples: Tensor) -> Tensor:
    """Token-aligned bool: the patch tokens hit by ``samples`` (``(B,)``: K per image) evenly spaced
    quantiles of the significance CDF. ``significance``: token-aligned, >= 0 on patch tokens."""
    patch = tokens.patch_mask()
    width = grid_width(tokens)
    B = tokens.batch_size
    # Non-patch slots sort first (-1) and add nothing to the CDF, so no quantile > 0 lands on them.
    sig = significance.float()
    grid = to_grid(tokens, torch.where(patch, sig, torch.full_like(sig, -1.0)), -1.0, width)
    ordered, order = grid.sort(dim=1, stable=True)
    cdf = ordered.clamp_min(0).cumsum(dim=1)
    total = cdf[:, -1:]
    # An image whose significance is all zero: treat it as uniform (every patch equally significant).
    flat = (ordered >= 0).float().cumsum(dim=1)
    cdf = torch.where(total > 0, cdf / total.clamp_min(1e-30), flat / flat[:, -1:].clamp_min(1))
    kmax = int(samples.max()) if samples.numel() else 0
    k = torch.arange(kmax, device=grid.device)
    quantiles = (k + 0.5) / samples.clamp_min(1)[:, None].to(torch.float64)  # (B, K_max)
    hit = torch.searchsorted(cdf.contiguous(), quantiles.float().contiguous(), side="left")
    pos = order.gather(1, hit.clamp_max(width - 1))
    unused = k[None, :] >= samples[:, None]  # images with fewer quantiles: those go to a dump slot
    pos = torch.where(unused, torch.full_like(pos, width), pos)
    keep = torch.zeros(B, width + 1, dtype=torch.bool, device=grid.device).scatter_(1, pos, True)[:, :width]
    return from_grid(tokens, keep) & patch


class ATS(Reducer):
    """Adaptive token sampling with K = ``max_tokens`` or ``round(ratio * n)`` quantiles per image.

    Give one of ``ratio`` (fraction of the alive patch tokens, in (0, 1]) or ``max_tokens``
    (an absolute K). ``ratio=1`` (or ``max_tokens=None`` with ``ratio=None``) means no reduction:
    the stage keeps everything without sampling (K = n quantiles would still drop tokens whose
    significance is small; that is the method, not "no reduction").
    """

    needs_record = True
    uses_policy = False

    def __init__(self, ratio: float | None = None, max_tokens: int | None = None):
        super().__init__()
        if ratio is not None and max_tokens is not None:
            raise ValueError("ATS: give ratio or max_tokens, not both")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"ATS: ratio must be in (0, 1], got {ratio}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"ATS: max_tokens must be >= 1, got {max_tokens}")
        self.ratio = None if ratio is None else float(ratio)
        self.max_tokens = max_tokens

    @property
    def off(self) -> bool:
        return self.max_tokens is None and (self.ratio is None or self.ratio >= 1)

    def samples(self, n: Tensor) -> Tensor:
        """``(B,)`` K per image for ``n`` alive patch tokens."""
        if self.max_tokens is not None:
            return n.clamp(max=self.max_tokens)
        return torch.round(n.double() * self.ratio).long().clamp_min(1).minimum(n)

    def forward(self, x: StageInput) -> Decision:
        if self.off:
            return Decision()
        rec = x.record
        if rec is None or rec.cls_attention is None or rec.values_norm is None:
            raise ValueError(f"ATS at stage {x.stage} needs the class attention and value norms of the "
                             "block before: its stages must start at block 1 or later")
        t = x.tokens
        sig = significance(t, rec.cls_attention, rec.values_norm)
        keep = inverse_transform_keep(t, sig, self.samples(patch_counts(t)))
        scores = torch.where(t.is_prefix(), torch.ones_like(sig), sig)
        return Decision(keep=keep, scores=scores, macs=self.macs)

    def macs(self, n):
        return 0.0 if self.off else flops.significance_macs(n)

    def describe(self) -> dict:
        return {"method": "ats", "ratio": self.ratio, "max_tokens": self.max_tokens}


def significance(tokens: Tokens, cls_attention: Tensor, values_norm: Tensor) -> Tensor:
    """Token-aligned ``a_j ||v_j||`` normalised to sum 1 over each image's patch tokens (0 elsewhere)."""
    patch = tokens.patch_mask()
    raw = torch.where(patch, cls_attention * values_norm, torch.zeros_like(cls_attention))
    total = tokens.sum_per_image(raw)
    return raw / tokens.per_token(total).clamp_min(1e-30)
