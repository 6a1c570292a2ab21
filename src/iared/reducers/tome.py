"""ToMe: token merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT but
Faster", ICLR 2023; facebookresearch/ToMe).

At every block, the alive tokens of an image are split alternately into sets A (even positions)
and B (odd positions); each A token finds its most similar B token (cosine similarity of the
attention keys); the ``r`` A tokens with the most similar matches are merged into their B match.
Merged features are size-weighted averages and every token carries its size ``s`` (how many
original patches it stands for) into *proportional attention* (``softmax(qk / sqrt(d) + log s)``):
both are :meth:`iared.tokens.Tokens.merge` with ``track_sizes=True``. Class / distillation tokens
are never merged, nor merged into. Training-free.

Where this differs from the paper (and why):

- Placement: ToMe merges *inside* every block, between attention and MLP, with that block's own
  keys. Our reducers sit *before* a stage and read the record of the block before it, so ToMe
  here is one stage per block from block 1 on (``r`` merges before blocks 1 .. depth-1, with the
  keys of blocks 0 .. depth-2; block 0 runs on every token, and the last merge happens before
  the MLP of the last block in the paper but before the whole last block here).
- Similarity metric: the keys with heads concatenated (``BlockRecord.keys``); the paper averages
  the keys over heads first.
- Order: merged tokens stay at the position of their B token; ToMe's code moves unmerged A
  tokens before B tokens after each merge, which changes the next block's alternation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from iared import flops
from iared.reducers.base import Reducer, StageInput
from iared.reducers.grid import from_grid, grid_width, patch_counts, ranks, to_grid
from iared.tokens import Decision, Tokens


def bipartite_merge_into(tokens: Tokens, keys, r: int):
    """ToMe's matching: token-aligned ``merge_into`` (positions in the current sequence).

    ``keys``: token-aligned ``(..., C)`` similarity metric. Per image, ``min(r, n // 2)`` A tokens
    merge (n = alive patch tokens: at most half of them leave, as in ToMe).
    """
    width = grid_width(tokens)
    patch = to_grid(tokens, tokens.patch_mask(), False, width)  # (B, W)
    metric = to_grid(tokens, F.normalize(keys.float(), dim=-1), 0.0, width)  # (B, W, C)
    a, b = metric[:, ::2], metric[:, 1::2]
    sim = a @ b.transpose(1, 2)  # (B, W_a, W_b)
    allowed = patch[:, ::2, None] & patch[:, None, 1::2]
    sim = sim.masked_fill(~allowed, float("-inf"))
    best, match = sim.max(dim=-1)  # (B, W_a): each A token's most similar B token
    rank = ranks(best.argsort(dim=-1, descending=True, stable=True))
    r_img = torch.clamp(patch_counts(tokens) // 2, max=r)  # (B,)
    merged = (rank < r_img[:, None]) & torch.isfinite(best)
    into = torch.arange(width, device=metric.device).expand(tokens.batch_size, width).clone()
    into[:, ::2] = torch.where(merged, 2 * match + 1, into[:, ::2])
    return from_grid(tokens, into)


class ToMe(Reducer):
    """Merge ``r`` tokens per image at this stage (one stage per block; see the module docstring).

    ``r`` = 0: no reduction. ``r`` is capped at half the image's alive patch tokens.
    """

    needs_record = True
    uses_policy = False

    def __init__(self, r: int, dim: int | None = None):
        super().__init__()
        if r < 0:
            raise ValueError(f"ToMe: r must be >= 0 (tokens merged per block), got {r}")
        self.r = int(r)
        self.dim = dim  # key width, for MAC estimates without a record (None: read from the record)

    def forward(self, x: StageInput) -> Decision:
        if self.r == 0:
            return Decision()
        if x.record is None or x.record.keys is None:
            raise ValueError(f"ToMe at stage {x.stage} needs the keys of the block before: "
                             "its stages must start at block 1 or later")
        t = x.tokens
        into = bipartite_merge_into(t, x.record.keys, self.r)
        macs = self.macs(t.lengths(), x.record.keys.shape[-1])
        return Decision(merge_into=into, track_sizes=True, macs=macs)

    def macs(self, n, dim: int | None = None):
        dim = dim or self.dim
        if dim is None or self.r == 0:
            return 0.0
        return flops.bipartite_matching_macs(n, dim) + flops.token_fusion_macs(n, dim)

    def describe(self) -> dict:
        return {"method": "tome", "r": self.r}
