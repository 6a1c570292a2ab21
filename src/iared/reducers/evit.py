"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., "Not All Patches are
What You Need", ICLR 2022; youweiliang/evit).

At a reduction stage, the alive patch tokens of an image are ranked by the class token's
attention to them (mean over heads); the top ``ceil(keep_rate * n)`` stay, and all the others
are fused into ONE token, their attention-weighted average. The fusion is a merge
(:meth:`iared.tokens.Tokens.merge`): every inattentive token points at one representative (the
most attentive of them, whose original position the fused token reports), weighted by its
attention, without sizes (``track_sizes=False``: the fused token attends like any other, as in
EViT). Training-free (the paper also fine-tunes; that is a training loop's business).

Where this differs from the paper (and why):

- Placement: EViT reduces inside a block, after its attention (using that block's class
  attention) and before its MLP. Our reducers sit before a stage and read the block before, so
  "EViT at block 3" here reduces before block 3 using block 2's class attention.
- Fusion: the paper describes a weighted average; its public code sums ``a_i x_i`` without
  dividing by ``sum a_i``. We take the average (a merge is an average).
- The fused token stays at its representative's place in the sequence instead of moving to the
  end (attention does not see order).
- A backbone without class token (average pooling) ranks by the attention of the mean of the
  alive patch tokens' queries (see :class:`iared.models.vit.BlockRecord`).
"""

from __future__ import annotations

import math

import torch

from iared import flops
from iared.reducers.base import Reducer, StageInput
from iared.reducers.grid import descending_rank, patch_counts
from iared.tokens import Decision


def keep_count(n, keep_rate: float):
    """Patch tokens EViT keeps out of ``n`` (int or tensor): ``ceil(keep_rate * n)``, at least one.

    The small slack stops float noise from rounding up (0.7 * 10 = 7.000000000000001)."""
    if isinstance(n, torch.Tensor):
        k = torch.ceil(n.double() * keep_rate - 1e-9).long()
        return torch.where(n > 0, k.clamp_min(1), k.clamp_min(0))
    return max(1, math.ceil(n * keep_rate - 1e-9)) if n else 0


class EViT(Reducer):
    """Keep the top ``ceil(keep_rate * n)`` patch tokens by class attention, fuse the rest into one.

    ``keep_rate`` in (0, 1]; 1 = no reduction. Alive patch tokens after the stage: ``k + 1``
    (k kept + the fused token) when at least two are inattentive, else all n stay.
    """

    needs_record = True
    uses_policy = False

    def __init__(self, keep_rate: float, dim: int | None = None):
        super().__init__()
        if not 0 < keep_rate <= 1:
            raise ValueError(f"EViT: keep_rate must be in (0, 1], got {keep_rate}")
        self.keep_rate = float(keep_rate)
        self.dim = dim

    def forward(self, x: StageInput) -> Decision:
        if self.keep_rate >= 1:
            return Decision()
        if x.record is None or x.record.cls_attention is None:
            raise ValueError(f"EViT at stage {x.stage} needs the class attention of the block before: "
                             "its stages must start at block 1 or later")
        t = x.tokens
        attn = x.record.cls_attention.to(t.data.dtype)  # token-aligned
        patch = t.patch_mask()
        n = patch_counts(t)
        keep = keep_count(n, self.keep_rate)
        k = t.per_token(keep)
        rank = descending_rank(t, attn)
        # A lone inattentive token would be "fused" with itself: it simply stays.
        inattentive = patch & (rank >= k) & t.per_token(n - keep >= 2)
        if not bool(inattentive.any()):
            return Decision(scores=attn)
        pos = t.positions()
        # Representative: the most attentive inattentive token (rank == k), one per image.
        representative = t.sum_per_image(torch.where(patch & (rank == k), pos, torch.zeros_like(pos)))
        into = torch.where(inattentive, t.per_token(representative), pos)
        # Tokens that stay alone get weight 1 (their features pass through bit for bit).
        weight = torch.where(inattentive, attn, torch.ones_like(attn))
        macs = flops.token_fusion_macs(t.lengths(), t.data.shape[-1])
        return Decision(merge_into=into, merge_weight=weight, track_sizes=False, scores=attn, macs=macs)

    def macs(self, n, dim: int | None = None):
        dim = dim or self.dim
        return 0.0 if dim is None or self.keep_rate >= 1 else flops.token_fusion_macs(n, dim)

    def describe(self) -> dict:
        return {"method": "evit", "keep_rate": self.keep_rate}
