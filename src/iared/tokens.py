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

The ``static`` selection (:meth:`Tokens.select_capacity`) is padded with a width fixed in advance
(a per-stage capacity, not the batch's longest count): shapes never depend on the scores, so a
threshold-mode pass makes no host synchronisation and compiles as one graph (``torch.compile(...,
fullgraph=True)``, CUDA graphs, exporters). The per-image counts live in the mask; an image that
wants more tokens than the capacity loses its lowest-scoring ones (the stage loop counts them).

Every layout carries ``index``: for each token, its position in the original sequence
(prefix tokens first, then patches in row-major order). That is how keep masks and scores are
reported in image coordinates no matter how many selections happened.

The first ``num_prefix`` tokens of every image (class, distillation and register tokens) are
never dropped: every ``select`` forces them to be kept, and their order stays at the front.

``has_class_token`` says whether the first of them is a class token. Per-image summaries (the
query of the IA-RED² interpreter, the "class attention" that EViT and ATS rank by) read the class
token when there is one, else the mean of the alive patch tokens (:meth:`Tokens.summary`).

Grid backbones (MViTv2, :mod:`iared.models.mvit`) pool neighbouring tokens, so their blocks read
tokens that were dropped. Their batches carry ``grid``: ``(B, N_grid, C)``, one row per position of
the current token grid (``index`` is then the position on that grid). A selection writes the
current features of the tokens it drops into ``grid`` (:meth:`Tokens.on_grid`): a dropped token's
row keeps its last features, rows of alive tokens go stale and are rewritten whenever a block reads
the grid. ViT batches carry no grid (None) and never pay for one, unless a dense head needs every
position's features (:meth:`Tokens.keeping_grid`, DPT in :mod:`iared.heads.dpt`): the same cache
then restores dropped tokens, each with the features it had when it was dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RaggedLayout = Literal["packed", "padded", "static"]
PackedAttention = Literal["auto", "varlen", "nested", "loop", "bucket"]


@dataclass
class Decision:
    """What a token reducer decided at a stage boundary (see :mod:`iared.reducers`).

    ``keep``: token-aligned bool, tokens that stay (prefix tokens always stay). ``merge_into``:
    token-aligned long, the position each token is merged into (its own position to stay; see
    :meth:`Tokens.merge`); ``merge_weight`` the averaging weights (default: sizes) and
    ``track_sizes`` whether survivors carry their sizes into proportional attention.
    ``scores``: token-aligned, the method's per-token score where it has one (heatmaps).
    ``log_prob``: ``(B,)`` log-probability of sampled decisions (policy-gradient training).
    ``macs``: the reducer's own multiply-accumulates per image (float or ``(B,)``), or a function of
    the ``(B,)`` alive counts it decided on, called only when someone reads the pass's MACs.
    ``kept_count``: when every image keeps the same number of tokens (prefix included) and that
    number is known without reading the device (budget / top-k), the selection stays dense and
    traceable (ONNX) without a host-side count.
    ``gate``: token-aligned multiplicative key weights (training-time masking, DynamicViT): no
    token leaves, :attr:`Tokens.weights` becomes ``weights * gate`` (applied before any keep /
    merge of the same decision), so attention to a token gated to 0 is exactly 0 while gradients
    still reach the gate; gates of successive stages multiply (a token gated out stays out).
    """

    keep: Tensor | None = None
    merge_into: Tensor | None = None
    merge_weight: Tensor | None = None
    track_sizes: bool = True
    scores: Tensor | None = None
    log_prob: Tensor | None = None
    macs: Tensor | float | Callable[[Tensor], Tensor | float] = 0.0
    kept_count: int | None = None
    gate: Tensor | None = None


@dataclass
class AttentionMap:
    """One block's attention probabilities as the block computed them, and where its tokens sit.

    ``weights``: ``(B, H, n, n)`` over the block's alive tokens (padded to the longest image for
    ragged layouts); ``index``: ``(B, n)`` their original positions; ``mask``: ``(B, n)`` real
    tokens, or None. :meth:`to_grid` puts any such tensor (the weights, or their gradients) on
    the original ``(B, H, N0, N0)`` token grid, zeros for tokens that were not alive.
    """

    weights: Tensor
    index: Tensor
    mask: Tensor | None = None

    def to_grid(self, total: int, values: Tensor | None = None) -> Tensor:
        values = self.weights if values is None else values
        B, H, n, _ = values.shape
        idx = self.index if self.mask is None else torch.where(self.mask, self.index, torch.full_like(self.index, total))
        rows = values.new_zeros(B, H, total + 1, n).scatter(2, idx[:, None, :, None].expand(B, H, n, n), values)
        grid = values.new_zeros(B, H, total + 1, total + 1).scatter(
            3, idx[:, None, None, :].expand(B, H, total + 1, n), rows)
        return grid[:, :, :total, :total]


@dataclass(frozen=True, eq=False)
class Tokens:
    """Base class of the token layouts. ``data`` holds the features, channels last."""

    data: Tensor
    index: Tensor
    num_prefix: int
    attention: PackedAttention = "auto"  # how a packed batch made from this one runs attention
    # Token-aligned key weights, or None (all 1): attention to token j is proportional to
    # ``w_j * exp(q.k_j)``. A token merged from s originals has weight s (ToMe's proportional
    # attention); a soft keep gate in [0, 1] gives DynamicViT's masked attention in training.
    weights: Tensor | None = None
    has_class_token: bool = True  # False: no class token; prefix tokens (if any) are registers
    # Grid backbones only (module docstring): ``(B, N_grid, C)`` last features of every grid position.
    grid: Tensor | None = None
    # Values that depend on the layout alone (a video block's segment plans): made by the first block
    # of a stage, reused by the rest. Only ``with_data`` passes it on; every other change (select,
    # merge, ``replace``) starts an empty one, so nothing stale can be read.
    _layout_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    def with_data(self, data: Tensor) -> Tokens:
        """The same layout with new features (what a block returns)."""
        out = replace(self, data=data)
        object.__setattr__(out, "_layout_cache", self._layout_cache)
        return out

    def per_layout(self, key, make: Callable[[], object]):
        """``make()`` once per layout under ``key``: every block of a stage gets the same value."""
        cache = self._layout_cache
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def layout(self) -> Tokens:
        """The same layout without features (zero channels, no grid cache): what lengths, masks and
        scatter need, cheap to keep after the pass (the stage loop's trace holds one per stage)."""
        return replace(self, data=self.data.new_empty(*self.data.shape[:-1], 0), grid=None)

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

    def select(self, keep: Tensor, ragged: RaggedLayout = "packed") -> Tokens:
        """Keep the tokens where ``keep`` (token-aligned bool) is True; prefix tokens always stay."""
        raise NotImplementedError

    def scatter(self, values: Tensor, total: int, fill: float = 0.0) -> Tensor:
        """Token-aligned ``values`` -> ``(B, total)`` in original token positions, ``fill`` elsewhere."""
        raise NotImplementedError

    # -- generic operations, written once over the flat rows of any layout ----------------------

    def apply(self, decision: Decision, ragged: RaggedLayout = "packed", capacity: int | None = None) -> Tokens:
        """The tokens after a reducer's decision (a merge or a selection, token-aligned with ``self``).
        ``ragged="static"``: a selection keeps at most ``capacity`` patch tokens per image (None: as
        many as there are rows now), padded to that width (:meth:`select_capacity`)."""
        if decision.gate is not None:  # soft / straight-through masking: multiply into the key weights
            gate = decision.gate.to(self.data.dtype)
            gated = replace(self, weights=gate if self.weights is None else self.weights * gate)
            return gated.apply(replace(decision, gate=None), ragged, capacity)
        if decision.merge_into is not None:
            if decision.keep is not None:
                raise ValueError("a decision either merges or keeps: express dropped tokens as merges")
            return self.merge(decision.merge_into, decision.merge_weight, decision.track_sizes,
                              "padded" if ragged == "static" else ragged)
        if decision.keep is not None:
            if decision.kept_count is not None and self.uniform_length() is not None:
                return self.select_count(decision.keep, decision.kept_count)
            if ragged == "static":
                return self.select_capacity(decision.keep, decision.scores, capacity)
            return self.select(decision.keep, ragged=ragged)
        return self

    def select_capacity(self, keep: Tensor, scores: Tensor | None = None, capacity: int | None = None) -> Tokens:
        """:meth:`select` into a padded batch of fixed width ``num_prefix + capacity`` (never wider
        than now): the static-shape selection (module docstring). When an image keeps more than
        ``capacity`` patch tokens, the lowest-``scores`` ones go (without scores: the last ones).
        Kept tokens stay in their order, padding after them, so whenever no image overflows the
        result holds exactly :meth:`select`'s tokens."""
        raise ValueError(f"a static-shape selection needs a batch with one row per image, not {type(self).__name__}")

    def select_count(self, keep: Tensor, count: int) -> Tokens:
        """:meth:`select` when every image keeps exactly ``count`` tokens (dense layouts only)."""
        return self.select(keep)

    def uniform_length(self) -> int | None:
        """Tokens per image when every image has the same count as a static shape (dense), else None."""
        return None

    def attention_map(self, weights: Tensor) -> AttentionMap:
        """Wrap the probabilities :meth:`attend` recorded for this batch with their token positions."""
        return AttentionMap(weights, self.index, self.valid())

    def image_ids(self) -> Tensor:
        """Token-aligned image number of every token (padding rows included)."""
        return self.per_token(torch.arange(self.batch_size, device=self.data.device))

    def positions(self) -> Tensor:
        """Token-aligned position of every token inside its image's current sequence."""
        raise NotImplementedError

    def patch_mask(self) -> Tensor:
        """Token-aligned bool: real tokens that a reducer may drop (not prefix, not padding)."""
        valid = self.valid()
        patch = ~self.is_prefix()
        return patch if valid is None else patch & valid

    def grid_groups(self, grid: tuple[int, ...], axes: tuple[int, ...]) -> Tensor:
        """Token-aligned long segment ids: the patch tokens of one input that share their coordinates on
        ``axes`` of the patch grid ``grid`` (row-major after the prefix tokens, read off :attr:`index`)
        get one id, unique across the batch (``image * prod(grid[axes]) + coordinate on axes``);
        prefix tokens and padding get -1.

        Video (TimeSformer, grid ``(T, H, W)``): ``axes=(1, 2)`` gives one segment per (clip, spatial
        position), the tokens of temporal attention; ``axes=(0,)`` one per (clip, frame), those of
        spatial attention. Ids need not be contiguous (see :func:`segments_as_packed`).
        """
        patch = (self.index - self.num_prefix).clamp_min(0)
        stride = [1] * len(grid)
        for a in range(len(grid) - 2, -1, -1):
            stride[a] = stride[a + 1] * grid[a + 1]
        coord = torch.zeros_like(patch)
        for a in axes:
            coord = coord * grid[a] + (patch // stride[a]) % grid[a]
        span = 1
        for a in axes:
            span *= grid[a]
        ids = self.image_ids() * span + coord
        return torch.where(self.patch_mask(), ids, torch.full_like(ids, -1))

    def sum_per_image(self, values: Tensor) -> Tensor:
        """Token-aligned ``values`` -> ``(B,)`` sums (padding rows must hold 0)."""
        flat_ids = self.image_ids().reshape(-1)
        return values.new_zeros(self.batch_size).index_add(0, flat_ids, values.reshape(-1))

    # -- grid backbones (module docstring) --------------------------------------------------------

    def on_grid(self) -> Tensor:
        """``(B, N_grid, C)``: every grid position's current features (the alive tokens' rows written
        into the cached grid). A dense batch holding the whole grid is the grid itself (no copy)."""
        if self.grid is None:
            raise ValueError("these tokens carry no grid: only grid backbones (MViTv2) keep one")
        if self.uniform_length() == self.grid.shape[1]:
            return self.data  # dense with every position: selections keep order, so row i is position i
        ids, index, data = self.image_ids(), self.index, self.data
        valid = self.valid()
        if valid is not None:
            ids, index, data = ids[valid], index[valid], data[valid]
        return self.grid.index_put((ids, index), data.to(self.grid.dtype))

    def keeping_grid(self) -> Tokens:
        """These tokens, from now on caching every position's last features in ``grid`` (a dense head
        reads them with :meth:`on_grid`): a token that a later selection drops keeps the features it
        had when it was dropped, in every layout. Needs the whole grid, as :meth:`embed` makes it."""
        if self.grid is not None:
            return self
        n = self.uniform_length()
        if n is None or not bool((self.index == torch.arange(n, device=self.index.device)).all()):
            raise ValueError("keeping_grid: start from the dense batch of every token (after embed)")
        return replace(self, grid=self.data)

    def from_grid(self, values: Tensor) -> Tensor:
        """Token-aligned rows of a per-image grid tensor ``(B, N_grid, ...)`` at the tokens' positions
        (padding rows read position 0)."""
        return values[self.image_ids(), self.index]

    def _grid_at_selection(self) -> Tensor | None:
        """The grid a selection from this batch carries: dropped tokens keep their current features."""
        return None if self.grid is None else self.on_grid()

    def attend_keys(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        """Attention of the alive tokens' queries to per-image keys (a grid backbone's pooled keys).

        ``q``: token-aligned ``(..., H, D)``; ``k, v``: ``(B, N_k, H, D)``, the same keys for every
        query of an image; ``bias``: token-aligned ``(..., H, N_k)`` added to the logits (relative
        positions). Returns token-aligned ``(..., H, D)``.
        """
        return _sdpa_heads(q, k, v, mask=None if bias is None else bias.transpose(1, 2).to(q.dtype))

    def max_per_image(self, values: Tensor) -> Tensor:
        """Token-aligned ``values`` -> ``(B,)`` maxima over the real tokens (-inf for an empty image)."""
        valid = self.valid()
        if valid is not None:
            values = values.masked_fill(~valid, float("-inf"))
        ids = self.image_ids().reshape(-1)
        peak = values.new_full((self.batch_size,), float("-inf"))
        return peak.scatter_reduce(0, ids, values.reshape(-1), "amax", include_self=True)

    def patch_mean(self, values: Tensor | None = None) -> Tensor:
        """``(B, ...)``: each image's mean of token-aligned ``values`` ``(..., *F)`` (default: the
        features) over its alive patch tokens; prefix tokens and padding are left out.

        A token counts with its weight (:attr:`weights`): a merged token as the ``s`` tokens it
        averages (so merging leaves the mean unchanged), a gated-out token not at all. An image
        without any alive patch token averages to 0.
        """
        values = self.data if values is None else values
        patch = self.patch_mask().reshape(-1, 1)
        w = patch.to(values.dtype)
        if self.weights is not None:  # a product, so gradients reach soft gates (DynamicViT)
            w = w * self.weights.reshape(-1, 1).to(values.dtype)
        ids = self.image_ids().reshape(-1)
        rows = values.reshape(ids.shape[0], -1)
        # Padding rows may hold anything (nobody reads them): zero them, as 0 * inf would poison the sum.
        rows = torch.where(patch, rows, torch.zeros_like(rows))
        total = rows.new_zeros(self.batch_size, rows.shape[1]).index_add(0, ids, rows * w)
        count = rows.new_zeros(self.batch_size, 1).index_add(0, ids, w)
        feature_shape = values.shape[self.index.dim():]
        return (total / count.clamp_min(1e-12)).reshape(self.batch_size, *feature_shape)

    def summary(self, values: Tensor) -> Tensor:
        """``(B, ...)``: each image's summary of token-aligned ``values``: the class token's row, or
        without a class token the :meth:`patch_mean` (an average token asks instead of a class token)."""
        if not self.has_class_token:
            return self.patch_mean(values)
        flat = values.reshape(-1, *values.shape[self.index.dim():])
        return flat[self.start_rows()] if self.batch_size else flat[:0]

    def softmax_per_image(self, logits: Tensor) -> Tensor:
        """Softmax of token-aligned ``logits`` ``(..., H)`` over the real tokens of each image."""
        valid = self.valid()
        if valid is not None:
            logits = logits.masked_fill(~valid[..., None], float("-inf"))
        ids = self.image_ids().reshape(-1)
        flat = logits.reshape(ids.shape[0], -1)
        peak = flat.new_full((self.batch_size, flat.shape[1]), float("-inf"))
        peak = peak.scatter_reduce(0, ids[:, None].expand_as(flat), flat, "amax", include_self=True)
        e = (flat - peak[ids]).exp()
        total = e.new_zeros(peak.shape).index_add(0, ids, e)
        return (e / total[ids]).reshape(logits.shape)

    def top_k(self, scores: Tensor, k: int) -> Tensor:
        """Token-aligned bool keeping the ``k`` highest-scoring patch tokens of every image.

        Needs the same number of alive tokens in every image (a dense batch): budget mode keeps the
        batch dense stage after stage, so a ragged batch here means an earlier stage was not budgeted.
        """
        raise ValueError("a fixed per-image token count (budget / top-k) needs a dense batch: "
                         "run every earlier stage with a fixed count too")

    def merge(self, into: Tensor, weight: Tensor | None = None, track_sizes: bool = True,
              ragged: RaggedLayout = "packed") -> Tokens:
        """Merge tokens into others of the same image, then drop the merged ones.

        ``into``: token-aligned long, the position (within the image's current sequence, see
        :meth:`positions`) of the token each token is merged into; a token with ``into ==`` its own
        position stays. Merged features are averages weighted by ``weight`` (default: the current
        sizes, i.e. :attr:`weights`, 1 when unset), so merging is associative as in ToMe.
        ``track_sizes``: the survivors' :attr:`weights` become the summed sizes (proportional
        attention); False keeps every survivor's own weight (EViT's fused token attends like the
        token it was fused into).
        Prefix tokens must stay (``into`` = own position).
        """
        own = self.positions()
        stays = into == own
        if bool((~stays & self.is_prefix()).any()):
            raise ValueError("merge: prefix (class / distillation) tokens cannot be merged away")
        sizes = self.weights if self.weights is not None else torch.ones_like(own, dtype=self.data.dtype)
        w = sizes if weight is None else weight.to(self.data.dtype)
        valid = self.valid()
        if valid is not None:
            w = w * valid
        # Flat rows: destination row = row of the token at position ``into`` in the same image.
        start = self.start_rows()
        dest = (start[self.image_ids()] + into).reshape(-1)
        rows = self.data.reshape(dest.shape[0], -1)
        wf = w.reshape(-1, 1)
        numer = torch.zeros_like(rows).index_add(0, dest, rows * wf)
        denom = rows.new_zeros(dest.shape[0], 1).index_add(0, dest, wf)
        merged = torch.where(denom > 0, numer / denom.clamp_min(1e-12), rows).reshape(self.data.shape)
        new_sizes = self.weights  # track_sizes=False: survivors keep their own weights (sizes, gates)
        if track_sizes:
            new_sizes = sizes.reshape(-1).new_zeros(dest.shape[0]).index_add(0, dest, sizes.reshape(-1))
            new_sizes = new_sizes.reshape(sizes.shape)
        out = replace(self, data=merged, weights=new_sizes)
        return out.select(stays, ragged=ragged)

    def start_rows(self) -> Tensor:
        """``(B,)`` flat row (in ``data.reshape(-1, C)``) where each image's sequence starts."""
        raise NotImplementedError


# When CPU attention runs as two batched matmuls and a softmax instead of torch's fused kernel: for
# many very short sequences only (a TimeSformer's temporal attention, 8 keys each, thousands of
# them), where the fused kernel's fixed cost per (batch, head, query block) piece dominates.
# `scripts/attention_crossover.py` on 2 cores (docs/attention-crossover-cpu.json), matmul / fused
# time: 288 or 1024 sequences of 8 keys x 4 heads of 36: 0.71-0.84; 16 keys or more, or 256 sequence-
# heads and fewer: 1.0-3.7 (one image: 1.2-3.4). After an explicit ``torch.set_num_threads`` the fused
# kernel is up to twice as slow on short sequences (the call also does ``mkl_set_dynamic(false)``,
# the likely cause: MKL GEMMs inside the kernel's own parallel loop may then go parallel too):
# matmul / fused drops to 0.3-0.8 up to 48 keys. So the commands set threads only when asked for a
# different count (:func:`iared.timing.use_threads`), and this rule is measured without such a call.
SHORT_KEYS_CPU = 8
MANY_SEQUENCES_CPU = 512  # batch x heads from which the matmul path pays


def _matmul_attention_pays(q: Tensor, k: Tensor) -> bool:
    """``q``, ``k``: ``(B, N, H, D)``, as :func:`_sdpa_heads` takes them. See SHORT_KEYS_CPU. Never
    while compiling, exporting or tracing, and checked before any shape is read: comparing a dynamic
    batch axis with a constant would make the tracer specialise the graph to this batch
    (``torch.export`` refuses a dynamic batch then)."""
    if q.device.type != "cpu" or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() \
            or torch.jit.is_tracing():
        return False
    return k.shape[1] <= SHORT_KEYS_CPU and q.shape[0] * q.shape[2] >= MANY_SEQUENCES_CPU


def _sdpa_heads(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                every_query_has_a_key: bool = False) -> Tensor:
    """SDPA on ``(B, N, H, D)`` inputs; returns ``(B, N, H, D)``. ``mask``: bool (True = attend) or an
    additive bias, broadcastable to ``(B, H, N, N_k)``. ``every_query_has_a_key``: the caller knows no
    query has all its keys masked (no query needs SDPA's zeros for that case)."""
    if _matmul_attention_pays(q, k):
        return _matmul_attention(q, k, v, mask, every_query_has_a_key)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                      every_query_has_a_key: bool = False) -> Tensor:
    """:func:`_sdpa_heads` as two batched matmuls and a softmax, ``(B, N, H, D)`` in and out.

    When q, k and v are slices of one ``qkv`` buffer (:func:`_stacked_qkv`), one copy lays all three
    out head-major instead of three; the scale and the mask enter the first matmul (``baddbmm``)."""
    B, N, H, D = q.shape
    Nk = k.shape[1]
    stacked = _stacked_qkv(q, k, v)
    if stacked is not None:
        q, k, v = stacked.permute(2, 0, 3, 1, 4).reshape(3, B * H, N, D)
    else:
        q, k, v = (t.transpose(1, 2).reshape(B * H, -1, D) for t in (q, k, v))
    scale = D ** -0.5
    if mask is None:
        attn = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        mask = mask.to(q.dtype)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        bias = mask.expand(B, H, mask.shape[-2], Nk).reshape(B * H, mask.shape[-2], Nk)
        attn = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    attn = attn.softmax(dim=-1)
    if mask is not None and not every_query_has_a_key:
        # a query with every key masked gets zeros, as torch's SDPA gives it, not the softmax's NaN
        attn = attn.nan_to_num(0.0)  # not in place: softmax's backward reads its output
    return torch.bmm(attn, v).view(B, H, N, D).transpose(1, 2)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, weights_out: list | None = None,
                        key_weights: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Attention with the probabilities materialised. ``(B, N, H, D)`` in and out.

    ``key_weights`` ``(B, N)``: attention to key j proportional to ``w_j exp(q.k_j)``, computed as a
    product (not a log bias) so gradients reach weights that are exactly 0 (DynamicViT's gates).
    ``key_mask`` ``(B, N)`` bool: keys that exist. ``weights_out``: the probabilities are appended.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if key_mask is not None:
        attn = attn.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if key_weights is None:
        attn = attn.softmax(dim=-1)
    else:
        e = (attn - attn.amax(-1, keepdim=True)).exp() * key_weights[:, None, None, :]
        attn = e / e.sum(-1, keepdim=True).clamp_min(1e-12)
    if weights_out is not None:
        weights_out.append(attn)
    return (attn @ v).transpose(1, 2)


def _key_bias(key_weights: Tensor | None, key_mask: Tensor | None) -> Tensor | None:
    """An SDPA ``attn_mask`` ``(B, 1, 1, N)`` from key weights (log) and/or a key mask, or None."""
    if key_weights is None:
        return None if key_mask is None else key_mask[:, None, None, :]
    bias = key_weights.clamp_min(1e-30).log()
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask, float("-inf"))
    return bias[:, None, None, :]


def _weighted_attention(q: Tensor, k: Tensor, v: Tensor, key_weights: Tensor | None,
                        key_mask: Tensor | None = None) -> Tensor:
    """Batched attention ``(B, N, H, D)`` with optional key weights and key mask."""
    if key_weights is not None and key_weights.requires_grad:
        return _explicit_attention(q, k, v, None, key_weights, key_mask)
    bias = _key_bias(key_weights, key_mask)
    return _sdpa_heads(q, k, v, mask=None if bias is None else bias.to(q.dtype) if bias.dtype != torch.bool else bias)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                     key_weights: Tensor | None = None) -> Tensor:
    """Attention over ``G`` equal sequences ``(G, N, H, D)`` in and out, with keys that may be masked out
    (``key_mask`` ``(G, N)`` bool, True = attend) or weighted (``key_weights`` ``(G, N)``, as
    :attr:`Tokens.weights`): the backend every layout uses, for a model that lays its own sequences
    out (a video block's frames and positions)."""
    return _weighted_attention(q, k, v, key_weights, key_mask)


@dataclass(frozen=True, eq=False)
class _RowsTokens(Tokens):
    """Layouts with one row of ``data`` per image, ``(B, N, C)``: dense and padded."""

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    def prefix(self):
        return self.data[:, : self.num_prefix]

    def per_token(self, per_image):
        return per_image.unsqueeze(1).expand(per_image.shape[0], self.data.shape[1], *per_image.shape[1:])

    def positions(self):
        B, N = self.index.shape
        return torch.arange(N, device=self.data.device).expand(B, N)

    def start_rows(self):
        B, N = self.index.shape
        return torch.arange(B, device=self.data.device) * N

    def summary(self, values):
        # the class token is row 0 of every image: a view, no index arithmetic
        return values[:, 0] if self.has_class_token else self.patch_mean(values)

    def select_capacity(self, keep, scores=None, capacity=None):
        n = self.data.shape[1]
        prefix = self.is_prefix()
        valid = self.valid()
        keep = keep | prefix if valid is None else (keep | prefix) & valid
        width = n if capacity is None else min(n, self.num_prefix + int(capacity))
        # Which tokens fill the width: prefix first, then kept ones by score, then padding. Scores are
        # keep probabilities (or attention weights), within [0, 1]: the integer parts rank the groups.
        if scores is None:  # no scores: the earliest tokens stay, as a stable order would keep them
            rank = (1 - torch.arange(n, device=keep.device, dtype=torch.float32) / n).expand(keep.shape)
        else:
            rank = scores.detach().float().nan_to_num(0.0).clamp(0, 1)
        rank = rank + 2 * keep.float() + 4 * prefix.float()
        if valid is not None:
            rank = rank.masked_fill(~valid, -1.0)
        chosen = rank.topk(width, dim=1, sorted=False).indices
        real = keep.gather(1, chosen)
        # Back in sequence order, real tokens first: the layout PaddedTokens promises.
        order = chosen.gather(1, torch.argsort((~real).long() * n + chosen, dim=1))
        mask = keep.gather(1, order)
        data = self.data.gather(1, order.unsqueeze(-1).expand(-1, -1, self.data.shape[-1]))
        index = torch.where(mask, self.index.gather(1, order), torch.zeros_like(order))
        weights = None if self.weights is None else self.weights.gather(1, order) * mask
        return PaddedTokens(data, index, self.num_prefix, self.attention, weights, self.has_class_token,
                            self._grid_at_selection(), mask=mask)


@dataclass(frozen=True, eq=False)
class DenseTokens(_RowsTokens):
    """``data``: ``(B, N, C)``; ``index``: ``(B, N)`` original positions."""

    @staticmethod
    def from_embeddings(x: Tensor, num_prefix: int, has_class_token: bool = True) -> DenseTokens:
        B, N, _ = x.shape
        index = torch.arange(N, device=x.device).expand(B, N)
        return DenseTokens(x, index, num_prefix, has_class_token=has_class_token)

    def attend(self, q, k, v, weights_out=None):
        if weights_out is not None:
            return _explicit_attention(q, k, v, weights_out, self.weights)
        return _weighted_attention(q, k, v, self.weights)

    def lengths(self):
        B, N = self.index.shape
        return torch.full((B,), N, dtype=torch.long, device=self.data.device)

    def uniform_length(self):
        return self.data.shape[1]

    def top_k(self, scores, k):
        patch = self.patch_mask()
        ranked = torch.where(patch, scores, torch.full_like(scores, float("-inf")))
        top = ranked.topk(k, dim=1).indices
        return torch.zeros_like(patch).scatter(1, top, True)

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
            return PaddedTokens(self.data, self.index, self.num_prefix, self.attention, self.weights,
                                self.has_class_token, self.grid, mask=torch.ones_like(keep)).select(keep)
        return PackedTokens.from_dense(self.data, self.index, keep, self.num_prefix, self.attention, self.weights,
                                       self.has_class_token, grid=self._grid_at_selection())

    def select_count(self, keep, count):
        if count == self.data.shape[1]:
            return self
        # Kept tokens first, in their current order: a static-shape topk, no host-side count.
        n = self.data.shape[1]
        pos = torch.arange(n, device=keep.device)
        key = (keep | self.is_prefix()).to(torch.float32) * n + (n - pos)
        return self.gather(key.topk(count, dim=1).indices)

    def gather(self, order: Tensor) -> DenseTokens:
        """Keep tokens ``order`` ``(B, K)`` (positions in the current sequence) in that order."""
        data = self.data.gather(1, order.unsqueeze(-1).expand(-1, -1, self.data.shape[-1]))
        weights = None if self.weights is None else self.weights.gather(1, order)
        return replace(self, data=data, index=self.index.gather(1, order), weights=weights,
                       grid=self._grid_at_selection())

    def scatter(self, values, total, fill=0.0):
        out = values.new_full((self.batch_size, total), fill)
        return out.scatter(1, self.index, values)


@dataclass(frozen=True, eq=False)
class PaddedTokens(_RowsTokens):
    """``data``: ``(B, N_max, C)``; ``mask``: ``(B, N_max)`` True for real tokens, real ones first."""

    mask: Tensor = None  # type: ignore[assignment]

    def valid(self):
        return self.mask

    def attend(self, q, k, v, weights_out=None):
        # Padding is masked out as keys; padded queries compute garbage that nobody reads.
        if weights_out is not None:
            return _explicit_attention(q, k, v, weights_out, self.weights, self.mask)
        return _weighted_attention(q, k, v, self.weights, self.mask)

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
        weights = None if self.weights is None else self.weights.gather(1, order) * mask
        return replace(self, data=data, index=index, weights=weights, mask=mask, grid=self._grid_at_selection())

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
                    attention: PackedAttention = "auto", weights: Tensor | None = None,
                    has_class_token: bool = True, grid: Tensor | None = None) -> PackedTokens:
        offsets = F.pad(counts.cumsum(0), (1, 0))
        sizes = tuple(counts.tolist())
        image = torch.repeat_interleave(torch.arange(len(sizes), device=data.device), counts,
                                        output_size=sum(sizes))
        return PackedTokens(data, index, num_prefix, attention, weights, has_class_token, grid, counts=counts,
                            offsets=offsets, image=image, sizes=sizes)

    @staticmethod
    def from_dense(data: Tensor, index: Tensor, keep: Tensor, num_prefix: int,
                   attention: PackedAttention = "auto", weights: Tensor | None = None,
                   has_class_token: bool = True, grid: Tensor | None = None) -> PackedTokens:
        """Pack the kept rows of a ``(B, N, C)`` batch (``keep``: ``(B, N)`` bool)."""
        return PackedTokens.from_counts(data[keep], index[keep], keep.sum(1), num_prefix, attention,
                                        None if weights is None else weights[keep], has_class_token, grid)

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

    def image_ids(self):
        return self.image

    def positions(self):
        return torch.arange(self.data.shape[0], device=self.data.device) - self.offsets[self.image]

    def start_rows(self):
        return self.offsets[:-1]

    def select(self, keep, ragged="packed"):
        keep = keep | self.is_prefix()
        counts = torch.zeros_like(self.counts).index_add_(0, self.image, keep.long())
        weights = None if self.weights is None else self.weights[keep]
        return PackedTokens.from_counts(self.data[keep], self.index[keep], counts, self.num_prefix, self.attention,
                                        weights, self.has_class_token, self._grid_at_selection())

    def scatter(self, values, total, fill=0.0):
        out = values.new_full((self.batch_size, total), fill)
        return out.index_put((self.image, self.index), values)

    # -- attention ---------------------------------------------------------------------------

    def attend(self, q, k, v, weights_out=None):
        """Block-diagonal attention: each image's rows attend only to that image's rows.

        ``q, k, v``: ``(T, H, D)``. Strategies (``self.attention``; ``auto`` asks
        :func:`default_packed_attention`): ``loop`` runs one SDPA per image, ``varlen`` torch's fused
        varlen kernel directly (CUDA only), ``nested`` the same kernel through a jagged nested-tensor
        SDPA, ``bucket`` sorts the images by
        length into a few groups and runs one padded SDPA per group. All give the same result as
        running each image alone (up to float rounding).
        """
        strategy = self.attention if self.attention != "auto" else default_packed_attention(q.device)
        if strategy not in ("varlen", "nested", "bucket", "loop"):
            raise ValueError(f"unknown packed attention {strategy!r}; expected one of auto, varlen, nested, loop, "
                             "bucket")
        counts = self.sizes
        if len(set(counts)) == 1 or weights_out is not None:
            if weights_out is not None and len(set(counts)) != 1:
                # Explainers: a padded view gives per-image probability maps (B, H, N_max, N_max).
                padded = self.to_padded()
                outs = _explicit_attention(*(self.pad_rows(t) for t in (q, k, v)), weights_out,
                                           padded.weights, padded.mask)
                return outs[padded.mask]
            # Every image kept the same number of tokens: a plain batched SDPA is exact and fastest.
            B, n = len(counts), counts[0]
            shape = (B, n) + q.shape[1:]
            w = None if self.weights is None else self.weights.view(B, n)
            if weights_out is not None:
                return _explicit_attention(q.view(shape), k.view(shape), v.view(shape), weights_out,
                                           w).reshape(q.shape)
            return _weighted_attention(q.view(shape), k.view(shape), v.view(shape), w).reshape(q.shape)
        if self.weights is not None:
            # Key weights (merged tokens / soft gates): one weighted attention per image.
            return self._attend_loop(q, k, v, counts)
        if strategy == "varlen":
            return self._attend_varlen(q, k, v)
        if strategy == "nested":
            return self._attend_nested(q, k, v)
        if strategy == "bucket":
            return self._attend_bucketed(q, k, v, counts)
        return self._attend_loop(q, k, v, counts)

    def attend_keys(self, q, k, v, bias=None):
        # Every image has its own queries but a full set of keys: pad the queries per image (padding
        # queries compute something nobody reads), one batched SDPA, real rows back out.
        padded = super().attend_keys(self.pad_rows(q), k, v, None if bias is None else self.pad_rows(bias))
        return padded[self.image, self.positions()]

    def attention_map(self, weights):
        padded = self.to_padded()
        return AttentionMap(weights, padded.index, padded.mask)

    def to_padded(self) -> PaddedTokens:
        """The same tokens padded to the longest image (explainers, reference checks)."""
        width = max(self.sizes)
        pos = self.positions()
        data = self.pad_rows(self.data)
        mask = torch.zeros(self.batch_size, width, dtype=torch.bool, device=self.data.device)
        mask[self.image, pos] = True
        index = torch.zeros(self.batch_size, width, dtype=self.index.dtype, device=self.data.device)
        index[self.image, pos] = self.index
        weights = None if self.weights is None else self.pad_rows(self.weights)
        return PaddedTokens(data, index, self.num_prefix, self.attention, weights, self.has_class_token, self.grid,
                            mask=mask)

    def pad_rows(self, rows: Tensor) -> Tensor:
        """Token-aligned ``(T, ...)`` -> ``(B, N_max, ...)``, zeros in the padding."""
        out = rows.new_zeros((self.batch_size, max(self.sizes)) + rows.shape[1:])
        out[self.image, self.positions()] = rows
        return out

    def _attend_loop(self, q, k, v, counts):
        """One SDPA call per image: no padding at all, Python overhead of B calls per block."""
        ws = [None] * len(counts) if self.weights is None else self.weights.split(counts)
        outs = [
            _weighted_attention(qi[None], ki[None], vi[None], None if wi is None else wi[None])[0]
            for qi, ki, vi, wi in zip(q.split(counts), k.split(counts), v.split(counts), ws)
        ]
        return torch.cat(outs)

    def _attend_varlen(self, q, k, v):
        """One fused varlen kernel for the whole batch, called as torch's jagged SDPA calls it inside
        (``aten._flash_attention_forward`` for float16 / bfloat16, ``aten._efficient_attention_forward``
        for float32, with cumulative lengths), without the nested-tensor subclass around it: on an
        H200 that subclass's Python dispatch cost about 3.5 ms per block whatever the batch (DeiT-S,
        bf16: ``nested`` 46 ms at batch 64 where the unpruned model takes 3 ms). CUDA only; both
        kernels have their backward in torch, so training runs through it too."""
        if q.device.type != "cuda":
            raise RuntimeError(f"packed attention 'varlen' needs CUDA (tensors on {q.device}); use 'bucket'")
        head_dim = q.shape[-1]
        scale = head_dim ** -0.5
        if head_dim % 8:  # the kernels want a head size that is a multiple of 8: pad, then cut
            q, k, v = (F.pad(t, (0, 8 - head_dim % 8)) for t in (q, k, v))
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        cu = self.cu_seqlens
        longest = max(self.sizes)
        try:
            if q.dtype in (torch.float16, torch.bfloat16):
                out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, False, False,
                                                              scale=scale)[0]
            else:
                out = torch.ops.aten._efficient_attention_forward(
                    q[None], k[None], v[None], None, cu, cu, longest, longest, 0.0, 0,
                    torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)), scale=scale)[0][0]
        except (RuntimeError, NotImplementedError) as e:
            raise RuntimeError(
                f"packed attention 'varlen' failed on device {q.device} with {q.dtype} inputs "
                f"(torch {torch.__version__}): {str(e).splitlines()[0]}; use attention='bucket' or 'nested'"
            ) from e
        return out[..., :head_dim]

    @functools.cached_property
    def cu_seqlens(self) -> Tensor:
        """``offsets`` as the int32 cumulative lengths the varlen kernels take: made once per selection,
        read by every block of the stage."""
        return self.offsets.to(torch.int32)

    def _attend_nested(self, q, k, v):
        """Jagged nested tensors: one fused varlen kernel on CUDA (flash / memory-efficient / cuDNN).

        Off CUDA, torch's jagged SDPA has only its math path, which it picks only for contiguous
        inputs; with strided views (what ``qkv(x).unbind`` gives) it goes on to probe cuDNN and
        fails inside CUDA initialisation on a machine without a driver. So off CUDA the inputs are
        made contiguous and any failure is re-raised naming the strategy to use instead.
        """
        offsets = self.offsets
        if q.device.type != "cuda":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

        def nest(t):
            nt = torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min(self.sizes),
                                                        max_seqlen=max(self.sizes))
            return nt.transpose(1, 2)

        try:
            out = F.scaled_dot_product_attention(nest(q), nest(k), nest(v))
        except (RuntimeError, NotImplementedError) as e:  # torch.AcceleratorError is a RuntimeError
            raise RuntimeError(
                f"packed attention 'nested' failed on device {q.device} with {q.dtype} inputs "
                f"(torch {torch.__version__}): {str(e).splitlines()[0]}; use attention='bucket' or 'loop'"
            ) from e
        return out.transpose(1, 2).values()

    def _attend_bucketed(self, q, k, v, counts, buckets: int = 8):
        """Sort images by length, cut into at most ``buckets`` groups, pad within each group only.

        The cut points minimise the padded attention work plus a per-group overhead (see
        :func:`_bucket_cuts`). Per group: one gather builds the padded ``(G, W, 3, H, D)`` input
        (one gather for q, k and v together when they are slices of one ``qkv`` buffer, as
        :class:`iared.models.vit.Attention` makes them), one SDPA with a key mask, one gather of the
        real rows out of the padded output. Padding queries are computed and never read.
        """
        overhead = _BUCKET_OVERHEAD.get(q.device.type, _BUCKET_OVERHEAD["cuda"])
        plan = _cached_bucket_plan(counts, buckets, q.device, overhead)
        H, D = q.shape[1:]
        qkv = _stacked_qkv(q, k, v)
        out = None if plan.dest is None else q.new_empty(q.shape)
        for g in range(len(plan.groups)):
            group, width, mask, rows = plan.groups[g], plan.widths[g], plan.masks[g], plan.gather[g]
            if qkv is not None:
                qb, kb, vb = qkv.index_select(0, rows).view(group, width, 3, H, D).unbind(2)
            else:
                qb, kb, vb = (t.index_select(0, rows).view(group, width, H, D) for t in (q, k, v))
            # padding is masked as keys only, and every image has a real token: no query lacks a key
            res = _sdpa_heads(qb, kb, vb, mask=mask, every_query_has_a_key=True)  # (group, width, H, D), strided
            # (real rows of the group, H, D); one row gather (SDPA's output is (group, width, H, D)-contiguous)
            real = res.reshape(group * width, H, D).index_select(0, plan.slots[g])
            if out is None:
                return real  # one group holding every image in order: already packed order
            out.index_copy_(0, plan.dest[g], real)
        return out


def segments_as_packed(segments: Tensor, attention: PackedAttention = "auto",
                       weights: Tensor | None = None) -> tuple[Tensor, PackedTokens]:
    """Rows ``(R,)`` labelled with segment ids (any non-negative longs, e.g. :meth:`Tokens.grid_groups`)
    as a packed batch whose "images" are the segments, so that attention runs within each segment.

    Returns ``order`` ``(R,)``, the rows sorted by segment (stable: rows keep their order inside a
    segment), and a feature-less :class:`PackedTokens` over the sorted rows: ``rows[order]`` attend
    through its :meth:`PackedTokens.attend` (block-diagonal per segment, cu_seqlens-style offsets,
    every packed strategy), and ``out.new_empty(out.shape).index_copy_(0, order, out)`` puts the
    results back. ``weights`` ``(R,)``: key weights of the rows (merged sizes, gates), carried along.
    """
    order = torch.argsort(segments, stable=True)
    _, counts = torch.unique_consecutive(segments[order], return_counts=True)
    rows = segments.new_empty(order.shape[0], 0, dtype=torch.float32)
    packed = PackedTokens.from_counts(rows, order, counts, 0, attention,
                                      None if weights is None else weights[order], has_class_token=False)
    return order, packed


def _stacked_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """A ``(..., 3, H, D)`` view whose ``[..., i, :, :]`` are q, k, v (each ``(..., H, D)``), when the
    three are evenly spaced slices of one buffer (``qkv(x).unflatten(...).unbind(...)``); else None.
    Inference only (no autograd, no tracing), where one gather or copy of the three instead of three
    saves two passes over the activations."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if torch.compiler.is_compiling():
        return None
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()
            and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        return None
    ptr = q.untyped_storage().data_ptr()
    if k.untyped_storage().data_ptr() != ptr or v.untyped_storage().data_ptr() != ptr:
        return None
    step = k.storage_offset() - q.storage_offset()
    if step <= 0 or v.storage_offset() - k.storage_offset() != step:
        return None
    *lead, H, D = q.shape
    *lead_strides, sh, sd = q.stride()
    return q.as_strided((*lead, 3, H, D), (*lead_strides, step, sh, sd), q.storage_offset())


@dataclass(frozen=True)
class _BucketPlan:
    """Device-side indices for :meth:`PackedTokens._attend_bucketed`, one entry per group.

    ``gather[g]``: ``(groups[g] * widths[g],)`` packed rows forming group g's padded batch (its
    images in increasing image order; padding slots repeat a real row of the same image).
    ``masks[g]``: ``(groups[g], 1, 1, widths[g])`` valid keys, or None when the group has no padding.
    ``slots[g]``: for every real token of the group, image by image, its row
    ``image in group * width + position`` in the padded output. ``dest[g]``: those tokens' packed
    rows; ``dest`` is None when one group holds every image (then the real tokens come out in
    packed order and no scatter is needed).
    """

    groups: tuple[int, ...]
    widths: tuple[int, ...]
    masks: tuple[Tensor | None, ...]
    gather: tuple[Tensor, ...]
    slots: tuple[Tensor, ...]
    dest: tuple[Tensor, ...] | None


# Per-group overhead in units of padded query-key pairs (one SDPA call, two gathers), per device type.
# CPU: every group adds a few parallel regions, so fewer groups than on a GPU; measured on the shipped
# digits-natural model at batch 64 (one group per stage of widths 29-31 at 65536, two of 19 and
# 29-31 at 16384, three at 4096), the three stages' attention took 3.7-3.8 / 3.1-3.2 / 3.3-3.4 ms in
# three runs, 2 cores.
_BUCKET_OVERHEAD = {"cuda": 4096, "cpu": 16384}


def _bucket_cuts(lengths: list[int], buckets: int, overhead: float = 4096) -> list[int]:
    """Cut points of sorted ``lengths`` into at most ``buckets`` contiguous groups minimising
    ``sum(group_size * max_len**2) + overhead * groups`` (exact DP over the sorted lengths)."""
    import numpy as np

    L = np.asarray(lengths, dtype=np.float64)
    n = len(L)
    # cost of a group covering sorted positions [i, j): (j - i) * L[j-1]^2 + overhead
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    w2 = np.concatenate([[0.0], L**2])[None, :]  # L[j-1]^2
    seg = np.where(j > i, (j - i) * w2 + overhead, np.inf)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choices = []
    results = []
    for _ in range(min(buckets, n)):
        total = best[:, None] + seg
        arg = total.argmin(0)
        best = total[arg, np.arange(n + 1)]
        choices.append(arg)
        results.append(best[n])
    k = int(np.argmin(results))
    cuts, end = [n], n
    for level in range(k, -1, -1):
        end = int(choices[level][end])
        cuts.append(end)
    return cuts[::-1]


@functools.lru_cache(maxsize=64)
def _bucket_plan(counts: tuple[int, ...], buckets: int, device: torch.device, overhead: float = 4096) -> _BucketPlan:
    """Group images by length (cached: a selection's counts serve every block of its stage)."""
    import numpy as np

    sizes = np.asarray(counts, dtype=np.int64)
    order = np.argsort(sizes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cuts = _bucket_cuts(sizes[order].tolist(), buckets, overhead)

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    groups, widths, masks, gathers, slots, dest = [], [], [], [], [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        members = np.sort(order[lo:hi])  # image order inside a group
        n, s = sizes[members][:, None], starts[members][:, None]
        width = int(n.max())
        t = np.arange(width)[None, :]
        valid = t < n  # (group, width)
        gathers.append(dev((s + np.minimum(t, n - 1)).reshape(-1)))
        rows_in_group, pos = np.nonzero(valid)  # row-major: image by image, positions ascending
        slots.append(dev(rows_in_group * width + pos))
        dest.append(dev((s + t)[valid]))
        masks.append(None if bool(valid.all()) else torch.from_numpy(valid[:, None, None, :].copy()).to(device))
        groups.append(len(members))
        widths.append(width)
    return _BucketPlan(tuple(groups), tuple(widths), tuple(masks), tuple(gathers), tuple(slots),
                       None if len(groups) == 1 else tuple(dest))


@torch.compiler.disable
def _cached_bucket_plan(counts: tuple[int, ...], buckets: int, device: torch.device,
                        overhead: float = 4096) -> _BucketPlan:
    """:func:`_bucket_plan` outside torch.compile: host-side numpy planning, cached per counts."""
    return _bucket_plan(counts, buckets, device, overhead)


def default_packed_attention(device: torch.device) -> PackedAttention:
    """The strategy ``auto`` picks on ``device`` (measure with ``iared bench``).

    CUDA: ``varlen``, torch's fused varlen kernels called directly (one launch, no padding; ``nested``
    reaches the same kernels through the nested-tensor subclass, whose Python dispatch made it slower
    than ``bucket`` on an H200, see ``_attend_varlen``). Elsewhere: never
    ``nested`` (off CUDA torch's jagged SDPA is a per-image math path, and on CPU-only machines it
    can fail inside CUDA initialisation); ``bucket``, which on CPU ties ``loop`` with one thread
    (DeiT-S, batch 64, keep 0.7: both within 1% of budget mode), ties it with 2 threads on an idle
    machine, and is faster when threads are contended (each of ``loop``'s per-image SDPA calls is a
    separate parallel region; 1.18x on the digits model at batch 64).
    """
    return "varlen" if device.type == "cuda" else "bucket"
