"""Token batch layouts: the one module that knows how a batch of token sets is laid out.

A ViT block only needs three things from the batch it runs on: the token features (any leading
shape, channels last), a way to run attention *within* each image, and a way to drop tokens.
Everything that depends on how images are stacked lives here, so the models never change when
a new layout arrives:

``DenseTokens``   ``(B, N, C)``: every image has the same N tokens. Budget mode (top-k) stays
                  dense; so does the unpruned model.
``PaddedTokens``  ``(B, N_max, C)`` plus a validity mask: images keep different counts, padded to
                  the longest one, padding masked out of attention. This is the reference that
                  ATS / A-ViT style methods use; it spends compute on padding.
``PackedTokens``  ``(T, C)`` with per-image lengths: the kept tokens of all images concatenated.
                  LayerNorm, MLP and projections run on the rows directly; attention is
                  block-diagonal per image. No compute is spent on dropped tokens.

Every layout carries ``index``: for each token, its position in the original sequence
(prefix tokens first, then patches in row-major order). That is how keep masks and scores are
reported in image coordinates no matter how many selections happened.

The first ``num_prefix`` tokens of every image (class token, distillation token) are never
dropped: every ``select`` forces them to be kept, and their order stays at the front.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RaggedLayout = Literal["packed", "padded"]
PackedAttention = Literal["auto", "nested", "loop", "bucket"]


@dataclass(frozen=True, eq=False)
class Tokens:
    """Base class of the token layouts. ``data`` holds the features, channels last."""

    data: Tensor
    index: Tensor
    num_prefix: int
    attention: PackedAttention = "auto"  # how a packed batch made from this one runs attention

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    def with_data(self, data: Tensor) -> "Tokens":
        """The same layout with new features (what a block returns)."""
        return replace(self, data=data)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, weights_out: list | None = None) -> Tensor:
        """Softmax attention within each image.

        q, k, v: token-aligned ``(..., H, D)`` (same leading shape as ``data``). Returns the
        same shape. ``weights_out``: if a list is given, the explicit path runs and the attention
        probabilities ``(B, H, N, N)`` are appended (dense layout only; used by explainers).
        """
        raise NotImplementedError

    def prefix(self) -> Tensor:
        """``(B, num_prefix, C)``: the always-kept tokens of every image."""
        raise NotImplementedError

    def per_token(self, per_image: Tensor) -> Tensor:
        """Broadcast a ``(B, ...)`` tensor to one row per token (token-aligned leading shape)."""
        raise NotImplementedError

    def lengths(self) -> Tensor:
        """``(B,)`` number of tokens alive in each image, prefix included."""
        raise NotImplementedError

    def valid(self) -> Tensor | None:
        """Token-aligned bool mask of real (non-padding) tokens, or None when all are real."""
        return None

    def is_prefix(self) -> Tensor:
        """Token-aligned bool: True for class / distillation tokens."""
        return self.index < self.num_prefix

    def select(self, keep: Tensor, ragged: RaggedLayout = "packed") -> "Tokens":
        """Keep the tokens where ``keep`` (token-aligned bool) is True; prefix tokens always stay."""
        raise NotImplementedError

    def scatter(self, values: Tensor, total: int, fill: float = 0.0) -> Tensor:
        """Token-aligned ``values`` -> ``(B, total)`` in original token positions, ``fill`` elsewhere."""
        raise NotImplementedError


def _sdpa_heads(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA on ``(B, N, H, D)`` inputs; returns ``(B, N, H, D)``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, weights_out: list) -> Tensor:
    """Attention with the probabilities materialised, for explainers. ``(B, N, H, D)`` in and out."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    weights_out.append(attn)
    return (attn @ v).transpose(1, 2)


@dataclass(frozen=True, eq=False)
class DenseTokens(Tokens):
    """``data``: ``(B, N, C)``; ``index``: ``(B, N)`` original positions."""

    @staticmethod
    def from_embeddings(x: Tensor, num_prefix: int) -> "DenseTokens":
        B, N, _ = x.shape
        index = torch.arange(N, device=x.device).expand(B, N)
        return DenseTokens(x, index, num_prefix)

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    def attend(self, q, k, v, weights_out=None):
        if weights_out is not None:
            return _explicit_attention(q, k, v, weights_out)
        return _sdpa_heads(q, k, v)

    def prefix(self):
        return self.data[:, : self.num_prefix]

    def per_token(self, per_image):
        return per_image.unsqueeze(1).expand(per_image.shape[0], self.data.shape[1], *per_image.shape[1:])

    def lengths(self):
        B, N = self.index.shape
        return torch.full((B,), N, dtype=torch.long, device=self.data.device)

    def select(self, keep, ragged="packed"):
        keep = keep | self.is_prefix()
        counts = keep.sum(1)
        if bool((counts == counts[0]).all()):
            # Same count everywhere (budget mode, or nothing dropped): stay dense.
            if int(counts[0]) == keep.shape[1]:
                return self
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
            return self.gather(order)
        if ragged == "padded":
            return PaddedTokens(self.data, self.index, self.num_prefix, mask=torch.ones_like(keep)).select(keep)
        return PackedTokens.from_dense(self.data, self.index, keep, self.num_prefix, self.attention)

    def gather(self, order: Tensor) -> "DenseTokens":
        """Keep tokens ``order`` ``(B, K)`` (positions in the current sequence) in that order."""
        data = self.data.gather(1, order.unsqueeze(-1).expand(-1, -1, self.data.shape[-1]))
        return DenseTokens(data, self.index.gather(1, order), self.num_prefix, self.attention)

    def scatter(self, values, total, fill=0.0):
        out = values.new_full((self.batch_size, total), fill)
        return out.scatter(1, self.index, values)


@dataclass(frozen=True, eq=False)
class PaddedTokens(Tokens):
    """``data``: ``(B, N_max, C)``; ``mask``: ``(B, N_max)`` True for real tokens, real ones first."""

    mask: Tensor = None  # type: ignore[assignment]

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    def valid(self):
        return self.mask

    def attend(self, q, k, v, weights_out=None):
        if weights_out is not None:
            raise ValueError("explicit attention weights are only recorded on dense token batches")
        # Padding is masked out as keys; padded queries compute garbage that nobody reads.
        return _sdpa_heads(q, k, v, mask=self.mask[:, None, None, :])

    def prefix(self):
        return self.data[:, : self.num_prefix]

    def per_token(self, per_image):
        return per_image.unsqueeze(1).expand(per_image.shape[0], self.data.shape[1], *per_image.shape[1:])

    def lengths(self):
        return self.mask.sum(1)

    def select(self, keep, ragged="padded"):
        keep = (keep | self.is_prefix()) & self.mask
        counts = keep.sum(1)
        width = int(counts.max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        data = self.data.gather(1, order.unsqueeze(-1).expand(-1, -1, self.data.shape[-1]))
        mask = keep.gather(1, order)
        # Padding rows keep a harmless index (0) so scatter never writes past the sequence.
        index = torch.where(mask, self.index.gather(1, order), torch.zeros_like(order))
        return PaddedTokens(data, index, self.num_prefix, self.attention, mask=mask)

    def is_prefix(self):
        return (self.index < self.num_prefix) & self.mask

    def scatter(self, values, total, fill=0.0):
        out = values.new_full((self.batch_size, total + 1), fill)
        # Padding goes to a dump column that is cut off.
        index = torch.where(self.mask, self.index, torch.full_like(self.index, total))
        return out.scatter(1, index, values)[:, :total]


@dataclass(frozen=True, eq=False)
class PackedTokens(Tokens):
    """``data``: ``(T, C)``, images one after another; ``counts``: ``(B,)`` tokens per image.

    ``image`` ``(T,)`` says which image each row belongs to; ``offsets`` ``(B + 1,)`` where each
    image starts. ``attention`` picks how block-diagonal attention is run (see ``attend``).
    """

    counts: Tensor = None  # type: ignore[assignment]
    offsets: Tensor = None  # type: ignore[assignment]
    image: Tensor = None  # type: ignore[assignment]
    sizes: tuple[int, ...] = ()  # counts on the host: read once per selection, not once per block

    @staticmethod
    def from_counts(data: Tensor, index: Tensor, counts: Tensor, num_prefix: int,
                    attention: PackedAttention = "auto") -> "PackedTokens":
        offsets = F.pad(counts.cumsum(0), (1, 0))
        sizes = tuple(counts.tolist())
        image = torch.repeat_interleave(torch.arange(len(sizes), device=data.device), counts,
                                        output_size=sum(sizes))
        return PackedTokens(data, index, num_prefix, attention, counts=counts, offsets=offsets, image=image,
                            sizes=sizes)

    @staticmethod
    def from_dense(data: Tensor, index: Tensor, keep: Tensor, num_prefix: int,
                   attention: PackedAttention = "auto") -> "PackedTokens":
        """Pack the kept rows of a ``(B, N, C)`` batch (``keep``: ``(B, N)`` bool)."""
        return PackedTokens.from_counts(data[keep], index[keep], keep.sum(1), num_prefix, attention)

    @property
    def batch_size(self) -> int:
        return self.counts.shape[0]

    def prefix(self):
        rows = self.offsets[:-1, None] + torch.arange(self.num_prefix, device=self.data.device)
        return self.data[rows]

    def per_token(self, per_image):
        return per_image[self.image]

    def lengths(self):
        return self.counts

    def select(self, keep, ragged="packed"):
        keep = keep | self.is_prefix()
        counts = torch.zeros_like(self.counts).index_add_(0, self.image, keep.long())
        return PackedTokens.from_counts(self.data[keep], self.index[keep], counts, self.num_prefix, self.attention)

    def scatter(self, values, total, fill=0.0):
        out = values.new_full((self.batch_size, total), fill)
        return out.index_put((self.image, self.index), values)

    # -- attention ---------------------------------------------------------------------------

    def attend(self, q, k, v, weights_out=None):
        if weights_out is not None:
            raise ValueError("explicit attention weights are only recorded on dense token batches")
        counts = list(self.sizes)
        if len(set(counts)) == 1:
            # Every image kept the same number of tokens: a plain batched SDPA is exact and fastest.
            B, n = len(counts), counts[0]
            shape = (B, n) + q.shape[1:]
            return _sdpa_heads(q.view(shape), k.view(shape), v.view(shape)).reshape(q.shape)
        strategy = self.attention if self.attention != "auto" else default_packed_attention(q.device)
        if strategy == "nested":
            return self._attend_nested(q, k, v)
        if strategy == "bucket":
            return self._attend_bucketed(q, k, v, counts)
        return self._attend_loop(q, k, v, counts)

    def _attend_loop(self, q, k, v, counts):
        """One SDPA call per image: no padding at all, Python overhead of B calls per block."""
        outs = [
            _sdpa_heads(qi[None], ki[None], vi[None])[0]
            for qi, ki, vi in zip(q.split(counts), k.split(counts), v.split(counts))
        ]
        return torch.cat(outs)

    def _attend_nested(self, q, k, v):
        """Jagged nested tensors: one fused varlen kernel on CUDA (flash / memory-efficient)."""
        offsets = self.offsets

        def nest(t):
            return torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)

        out = F.scaled_dot_product_attention(nest(q), nest(k), nest(v))
        return out.transpose(1, 2).values()

    def _attend_bucketed(self, q, k, v, counts, buckets: int = 4):
        """Sort images by length, split into a few buckets, pad within each bucket only."""
        order = sorted(range(len(counts)), key=counts.__getitem__)
        out = torch.empty_like(q)
        size = -(-len(order) // buckets)
        groups = [order[i: i + size] for i in range(0, len(order), size)]
        starts = self.offsets.tolist()
        for group in groups:
            width = max(counts[i] for i in group)
            rows = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in group]).to(q.device)
            mask = torch.zeros(len(group), width, dtype=torch.bool, device=q.device)
            for j, i in enumerate(group):
                mask[j, : counts[i]] = True
            def pad(t):
                dense = t.new_zeros((len(group), width) + t.shape[1:])
                dense[mask] = t[rows]
                return dense
            res = _sdpa_heads(pad(q), pad(k), pad(v), mask=mask[:, None, None, :])
            out[rows] = res[mask]
        return out


def default_packed_attention(device: torch.device) -> PackedAttention:
    """Measured choice per device type (see ``iared bench`` and the README's layout section)."""
    return "nested" if device.type == "cuda" else "loop"
