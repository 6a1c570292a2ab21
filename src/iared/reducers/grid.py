"""Per-image views of token-aligned values, for reducers that rank, sort or pair tokens within an image.

A reducer's per-token work is layout-free (token-aligned tensors in, token-aligned out), but
ranking and pairing need every image's tokens side by side. :func:`to_grid` lays token-aligned
values out as ``(B, W, ...)`` at each token's position in its image's current sequence
(:meth:`iared.tokens.Tokens.positions`), :func:`from_grid` reads them back. Only the generic
members of :class:`iared.tokens.Tokens` are used (``image_ids``, ``positions``, ``valid``), so
these work on the dense, padded and packed layouts alike and know nothing about them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from iared.tokens import Tokens


def grid_width(tokens: Tokens) -> int:
    """``W``: one more than the largest position of any token (dense: N, no device read)."""
    n = tokens.uniform_length()
    if n is not None:
        return n
    pos = tokens.positions()
    return int(pos.max()) + 1 if pos.numel() else 0


def to_grid(tokens: Tokens, values: Tensor, fill, width: int | None = None) -> Tensor:
    """Token-aligned ``values`` ``(..., *F)`` -> ``(B, W, *F)``; ``fill`` where no real token sits."""
    width = grid_width(tokens) if width is None else width
    lead = tokens.index.dim()
    ids, pos = tokens.image_ids().reshape(-1), tokens.positions().reshape(-1)
    flat = values.reshape(ids.shape[0], *values.shape[lead:])
    valid = tokens.valid()
    if valid is not None:
        real = valid.reshape(-1)
        ids, pos, flat = ids[real], pos[real], flat[real]
    out = values.new_full((tokens.batch_size, width, *values.shape[lead:]), fill)
    out[ids, pos] = flat
    return out


def from_grid(tokens: Tokens, grid: Tensor) -> Tensor:
    """``(B, W, *F)`` -> token-aligned ``(..., *F)`` (padding rows read whatever sits at their slot)."""
    return grid[tokens.image_ids(), tokens.positions()]


def patch_counts(tokens: Tokens) -> Tensor:
    """``(B,)`` long: alive tokens per image that a reducer may remove (not prefix, not padding)."""
    return tokens.sum_per_image(tokens.patch_mask().long())


def descending_rank(tokens: Tokens, scores: Tensor) -> Tensor:
    """Token-aligned long: 0 for the highest-scoring patch token of its image, 1 for the next, ...

    Ties keep sequence order (stable), so the ranks do not depend on the layout. Prefix and
    padding tokens rank after every patch token.
    """
    patch = tokens.patch_mask()
    grid = to_grid(tokens, torch.where(patch, scores, torch.full_like(scores, float("-inf"))), float("-inf"))
    return from_grid(tokens, ranks(grid.argsort(dim=1, descending=True, stable=True)))


def ranks(order: Tensor) -> Tensor:
    """``(B, W)`` the inverse permutation of ``order`` along dim 1: where each slot sits in the order."""
    steps = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, steps)


def fractional_rank(tokens: Tokens, scores: Tensor) -> Tensor:
    """Token-aligned, in (0, 1): ``(rank + 0.5) / n`` among the image's n patch tokens, ascending,
    tied scores sharing their mean rank. A threshold t then keeps about ``(1 - t) n`` patches, and
    tied tokens are all kept or all dropped. Prefix and padding tokens get 0 (callers override)."""
    patch = tokens.patch_mask()
    inf = torch.full_like(scores, float("inf"))
    grid = to_grid(tokens, torch.where(patch, scores, inf), float("inf"))
    ordered = grid.sort(dim=1).values.contiguous()
    below = torch.searchsorted(ordered, grid.contiguous(), side="left")
    upto = torch.searchsorted(ordered, grid.contiguous(), side="right")
    n = patch_counts(tokens).clamp_min(1)[:, None]
    frac = (below + upto).to(scores.dtype) / (2 * n)
    return torch.where(patch, from_grid(tokens, frac), torch.zeros_like(scores))
