"""TimeSformer (Bertasius et al., ICML 2021) whose forward pass is ours and whose weights are the
official release's.

The state-dict keys and shapes are those of ``facebookresearch/TimeSformer``'s
``timesformer.models.vit.VisionTransformer`` (the ``model.`` prefix of its ``.pyth`` checkpoints
stripped): ``patch_embed.proj``, ``cls_token``, ``pos_embed`` ``(1, 1 + H*W, C)``, ``time_embed``
``(1, T, C)``, and per block ``norm1``, ``attn.{qkv,proj}``, ``temporal_norm1``,
``temporal_attn.{qkv,proj}``, ``temporal_fc``, ``norm2``, ``mlp.{fc1,fc2}``; then ``norm``, ``head``.
That layout is the contract: :func:`load_timesformer_weights` reads the official ``.pyth`` files
(``{"model_state": {"model.<key>": ...}, ...}``, always ``weights_only=True``), and
:func:`from_hf_timesformer` maps Hugging Face ``transformers``' ``TimesformerForVideoClassification``
onto it (tests compare the logits).

Input: clips ``(B, T, C, H, W)`` (``transformers``' ``pixel_values`` layout; the official code takes
``(B, C, T, H, W)``: ``clips.transpose(1, 2)``), normalised with ``cfg.mean`` / ``cfg.std``.

Tokens: the class token, then the ``T * H * W`` patch tokens in ``(T, H, W)`` row-major order
(:attr:`TimeSformer.token_grid`; frame-major, so a frame's tokens are contiguous and per-frame
heatmaps are a reshape). The official code orders patches ``(H, W, T)``; attention does not depend on
the order, so the logits are the same.

Attention (``cfg.attention_type``), per block:

* ``divided_space_time`` (the paper's default): temporal attention among the tokens of one spatial
  position across frames, its output through ``temporal_fc`` added to the patch tokens; then spatial
  attention within each frame, where the class token takes part in every frame's attention (as a
  query and a key) and its T outputs are averaged; then the MLP. Exactly the official ``Block``.
* ``joint_space_time``: one attention over all tokens of a clip (a ViT block with a time embedding).
* ``space_only``: every frame is an image with its own class token (no time embedding); the head
  averages the T class tokens before the final norm, as the official code averages its frames.
  Here the T class tokens are the T prefix tokens (frame t's at position t, ``num_prefix_tokens =
  T``); reducers and the interpreter ask with the first one (frame 0's).

Pruning (how dropped tokens meet the divided attention): attention runs among the *alive* tokens of
each segment. Temporal attention: the alive tokens of each (clip, spatial position); spatial: the
alive tokens of each (clip, frame) plus the class token. Segment ids come from the tokens' original
positions (:meth:`iared.tokens.Tokens.grid_groups`) and every layout (dense, padded, packed) runs the
same segment attention (:func:`iared.tokens.segments_as_packed`); a clip with every token alive in
the dense layout takes the reshape path of the official code. A frame whose patch tokens were all
dropped still holds the class token: there it attends to itself, and the class token's update stays
the mean over all T frames. A spatial position with one alive token attends to itself.

MACs (:meth:`TimeSformer.block_macs`): linear layers at the alive counts (the class token's T
copies in spatial attention included); the attention products depend on how alive tokens spread over
positions and frames, which an alive count does not say: ``block_macs`` assumes an even spread
(``n_p / (H W)`` tokens per position, ``n_p / T`` per frame), which is exact with nothing dropped and
otherwise a lower bound (a sum of squares is smallest when spread evenly);
:meth:`TimeSformer.layout_block_macs` gives the exact count of a given layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared import flops
from iared.models.vit import BlockRecord, Mlp, conv_stem_stages, run_stem, stem_widths
from iared.tokens import DenseTokens, Tokens, masked_attention, segments_as_packed

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")
# SlowFast / TimeSformer's DATA.MEAN and DATA.STD (what the official checkpoints were trained on).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


@dataclass
class TimeSformerConfig:
    """Geometry of a TimeSformer. ``mean`` / ``std`` describe the input the weights expect (the
    official configs' ``DATA.MEAN`` / ``DATA.STD``); the model itself does not normalise."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_frames: int = 8
    num_classes: int = 400
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention_type: str = "divided_space_time"
    norm_eps: float = 1e-6
    # A convolutional stem applied to every frame (``patch_embed.backbone``, then a 1x1
    # ``patch_embed.proj``), as a hybrid ViT's (:class:`iared.models.vit.ViTConfig`'s ``conv_stem``):
    # stage widths, each 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool, so 2 ** len(conv_stem) == patch_size.
    conv_stem: tuple[int, ...] = ()
    mean: tuple[float, ...] = field(default=KINETICS_MEAN)
    std: tuple[float, ...] = field(default=KINETICS_STD)

    def __post_init__(self):
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type {self.attention_type!r} not supported: "
                             f"one of {', '.join(ATTENTION_TYPES)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        self.conv_stem = tuple(int(w) for w in self.conv_stem)
        if self.conv_stem and (2 ** len(self.conv_stem) != self.patch_size or min(self.conv_stem) < 1):
            raise ValueError(f"conv_stem {self.conv_stem}: each stage halves the resolution, so it needs "
                             f"log2(patch_size) = {math.log2(self.patch_size):g} positive widths")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        return self.grid_size**2

    @property
    def num_patches(self) -> int:
        """Patch tokens of a clip: ``T * H * W``."""
        return self.num_frames * self.patches_per_frame

    @property
    def num_prefix_tokens(self) -> int:
        """One class token, or one per frame for ``space_only``."""
        return self.num_frames if self.attention_type == "space_only" else 1

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return (self.num_frames, self.grid_size, self.grid_size)

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head attention (official keys ``qkv``, ``proj``) within the segments that ``groups``
    holds: a Tokens batch whose "images" are the segments (a dense ``(G, n, C)`` reshape, or a packed
    batch from :func:`iared.tokens.segments_as_packed`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, groups: Tokens, qkv_out: list | None = None) -> Tensor:
        """``x``: rows aligned with ``groups`` ``(..., C)``; ``qkv_out``: receives ``(q, k, v)``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        if qkv_out is not None:
            qkv_out.append((q, k, v))
        return self.proj(groups.attend(q, k, v).flatten(-2))


class Block(nn.Module):
    """One TimeSformer block on any token layout (module docstring: attention types and pruning)."""

    def __init__(self, cfg: TimeSformerConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.attention_type = cfg.attention_type
        self.grid = cfg.token_grid
        self.num_tokens = cfg.num_prefix_tokens + cfg.num_patches
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        if cfg.attention_type == "divided_space_time":
            self.temporal_norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
            self.temporal_attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
            self.temporal_fc = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, tokens: Tokens, weights_out: list | None = None, record: BlockRecord | None = None) -> Tokens:
        if self.attention_type == "joint_space_time":  # a ViT block: one attention over the clip
            x = tokens.data
            q, k, v = self.attn.qkv(self.norm1(x)).unflatten(-1, (3, self.attn.num_heads, -1)).unbind(-3)
            x = x + self.attn.proj(tokens.attend(q, k, v, weights_out).flatten(-2))
            if record is not None:
                record.fill(tokens, q, k, v)
            return tokens.with_data(x + self.mlp(self.norm2(x)))
        if weights_out is not None:
            raise NotImplementedError(f"{self.attention_type} attention has no single (N, N) attention map per clip; "
                                      "explainers read the interpreter's scores")
        whole = tokens.weights is None and tokens.uniform_length() == self.num_tokens
        if whole:
            x = self._whole(tokens.data, record, tokens)
        elif tokens.data.dim() == 3 and (tokens.weights is None or not tokens.weights.requires_grad):
            x = self._on_grid(tokens, record)
        else:
            x = self._segments(tokens, record)
        return tokens.with_data(x + self.mlp(self.norm2(x)))

    # -- every token alive, dense: the official code's reshapes ----------------------------------

    def forward_frames(self, x: Tensor, mlp: nn.Module | None = None) -> Tensor:
        """Divided attention on dense clip rows ``(B, 1 + T' H W, C)`` of any number of frames ``T'``
        (a temporal subsample of the clip, :mod:`iared.reducers.vared`); ``mlp`` replaces the block's
        own (a narrower one of its hidden units). The same arithmetic as :meth:`forward` on a whole clip."""
        x = self._whole(x, None, None)
        return x + (self.mlp if mlp is None else mlp)(self.norm2(x))

    def _whole(self, x: Tensor, record: BlockRecord | None, tokens: Tokens) -> Tensor:
        B, N, C = x.shape
        T, H, W = self.grid
        S = H * W
        if self.attention_type == "divided_space_time":  # the frames the rows hold (all, or a subsample)
            T = (N - 1) // S
        P = N - T * S
        patches = x[:, P:].reshape(B, T, S, C)
        if self.attention_type == "divided_space_time":
            xt = patches.transpose(1, 2).reshape(B * S, T, C)  # (clip, position) segments of T frames
            res = self.temporal_attn(self.temporal_norm1(xt), _dense(xt))
            patches = patches + self.temporal_fc(res.reshape(B, S, T, C).transpose(1, 2))
            cls = x[:, :1].expand(B, T, C)  # the class token joins every frame
        else:  # space_only: frame t's own class token
            cls = x[:, :T]
        xs = torch.cat([cls.reshape(B * T, 1, C), patches.reshape(B * T, S, C)], dim=1)
        qkv: list | None = [] if record is not None else None
        res = self.attn(self.norm1(xs), _dense(xs), qkv).reshape(B, T, 1 + S, C)
        patches = patches + res[:, :, 1:]
        if self.attention_type == "divided_space_time":
            prefix = x[:, :1] + res[:, :, 0].mean(1, keepdim=True)
        else:
            prefix = x[:, :T] + res[:, :, 0]
        if record is not None:
            q, k, v = (t.reshape(B, T, 1 + S, *t.shape[-2:]) for t in qkv[0])
            record.fill(tokens, *(self._token_aligned(t, P) for t in (q, k, v)))
        return torch.cat([prefix, patches.reshape(B, T * S, C)], dim=1)

    @staticmethod
    def _token_aligned(t: Tensor, num_prefix: int) -> Tensor:
        """Spatial attention's per-frame rows ``(B, T, 1 + S, ...)`` -> token order ``(B, N, ...)``
        (the class token's row from frame 0: its T copies are identical)."""
        B = t.shape[0]
        prefix = t[:, :1, 0] if num_prefix == 1 else t[:, :, 0]
        return torch.cat([prefix, t[:, :, 1:].reshape(B, -1, *t.shape[3:])], dim=1)

    # -- one row per clip (dense or padded): attention on the full grid, alive keys masked ------

    def _on_grid(self, tokens: Tokens, record: BlockRecord | None) -> Tensor:
        """Divided / space-only attention for a ``(B, W, C)`` batch of alive tokens (a budget stage's
        dense rows, a threshold stage's padded ones) with static shapes and no host synchronisation,
        so it compiles as one graph. Norms and projections run on the W rows; only q, k, v go onto
        the ``(T, H, W)`` grid, where the official reshapes run attention with dropped tokens masked
        out as keys. The attention products then cost what the unpruned block's do, a few per cent
        of a block (linear layers: ~17 C^2 per token, attention: ~2 (T + H W) C), which is what
        :meth:`macs` leaves out. Alive tokens get exactly :meth:`_segments`' results."""
        x, B, C = tokens.data, tokens.data.shape[0], tokens.data.shape[-1]
        T, Hg, Wg = self.grid
        S = Hg * Wg
        P = self.num_tokens - T * S
        patch = tokens.patch_mask()  # (B, W): real patch rows
        cell = (tokens.index - P).clamp(0, T * S - 1)  # each row's grid cell (garbage off patch rows)
        batch = torch.arange(B, device=x.device)[:, None].expand_as(cell)
        # Rows are written to the grid by one index_copy of every row, prefix and padding rows into a
        # spare cell past the grid that is cut off: a boolean selection of the patch rows would give
        # a data-dependent shape (a host sync, and no CUDA graph).
        target = (batch * (T * S + 1) + torch.where(patch, cell, T * S)).reshape(-1)

        def on_grid(rows: Tensor) -> Tensor:  # (B, W, ...) patch rows -> (B, T * S, ...), zeros elsewhere
            flat = rows.reshape(-1, *rows.shape[2:])
            grid = flat.new_zeros(B * (T * S + 1), *rows.shape[2:]).index_copy(0, target, flat)
            return grid.unflatten(0, (B, T * S + 1))[:, : T * S]

        alive = on_grid(patch)
        weights = None if tokens.weights is None else on_grid(tokens.weights.to(x.dtype))

        def attend(q, k, v, key_mask, key_weights):
            # a segment with no alive key (every frame of a position dropped) attends to all of its
            # zeros instead: its queries are nobody's, and this keeps them (and their gradients) finite
            return masked_attention(q, k, v, key_mask | ~key_mask.any(-1, keepdim=True), key_weights)

        heads = self.attn.num_heads
        if self.attention_type == "divided_space_time":
            q, k, v = on_grid(self.temporal_attn.qkv(self.temporal_norm1(x))).unflatten(-1, (3, heads, -1)).unbind(-3)
            by_position = lambda t: t.reshape(B, T, S, *t.shape[2:]).transpose(1, 2).reshape(B * S, T, *t.shape[2:])  # noqa: E731
            kw = None if weights is None else by_position(weights)
            out = attend(*map(by_position, (q, k, v)), by_position(alive), kw)
            out = out.reshape(B, S, T, -1).transpose(1, 2).reshape(B, T * S, -1)[batch, cell]
            x = x + torch.where(patch[..., None], self.temporal_fc(self.temporal_attn.proj(out)), 0.0)
        rows_qkv = self.attn.qkv(self.norm1(x)).unflatten(-1, (3, heads, -1))  # (B, W, 3, heads, D)
        grid = on_grid(rows_qkv).reshape(B, T, S, 3, heads, -1)
        # the class token joins every frame (divided); space-only: frame t's own class token (row t)
        prefix = rows_qkv[:, :1].expand(B, T, *rows_qkv.shape[2:]) if P == 1 else rows_qkv[:, :T]
        frames = torch.cat([prefix[:, :, None], grid], dim=2).reshape(B * T, 1 + S, 3, heads, -1)
        key_mask = torch.cat([alive.new_ones(B, T, 1), alive.reshape(B, T, S)], dim=2).reshape(B * T, 1 + S)
        key_weights = None
        if weights is not None:
            prefix_w = tokens.weights[:, :1].expand(B, T) if P == 1 else tokens.weights[:, :T]
            key_weights = torch.cat([prefix_w[..., None].to(x.dtype), weights.reshape(B, T, S)], 2).reshape(B * T, -1)
        out = attend(*frames.unbind(2), key_mask, key_weights)
        out = self.attn.proj(out.flatten(-2)).reshape(B, T, 1 + S, C)
        cls_out = out[:, :, 0].mean(1, keepdim=True) if P == 1 else out[:, :, 0]
        patch_out = out[:, :, 1:].reshape(B, T * S, C)[batch, cell]
        update = torch.where(patch[..., None], patch_out, 0.0)
        update = torch.cat([update[:, :P] + cls_out, update[:, P:]], dim=1)
        if record is not None:
            record.fill(tokens, *rows_qkv.unbind(2))  # the rows' own q, k, v: what the grid holds for them
        return x + update

    # -- any layout: attention within segments of alive tokens ----------------------------------

    def _segments(self, tokens: Tokens, record: BlockRecord | None) -> Tensor:
        plan = tokens.per_layout(("timesformer-segments", self.grid, self.attention_type),
                                 lambda: _SegmentPlan.of(tokens, self.grid, self.attention_type))
        shape = tokens.data.shape
        rows = tokens.data.reshape(-1, shape[-1])
        patch, prefix_rows, n = plan.patch, plan.prefix_rows, plan.patch.numel()
        xp = rows[patch]
        if plan.temporal is not None:
            xp = xp + self.temporal_fc(_attend(self.temporal_attn, self.temporal_norm1(xp), plan.temporal))
        xs = torch.cat([xp, rows[prefix_rows]])
        qkv: list | None = [] if record is not None else None
        res = _attend(self.attn, self.norm1(xs), plan.spatial, qkv)
        out = rows.clone()
        out[patch] = xp + res[:n]
        if self.attention_type == "divided_space_time":
            out[plan.start] = rows[plan.start] + res[n:].reshape(plan.start.shape[0], self.grid[0], -1).mean(1)
        else:
            out[prefix_rows] = rows[prefix_rows] + res[n:]
        if record is not None:
            aligned = []
            for t in qkv[0]:
                full = t.new_zeros(rows.shape[0], *t.shape[1:])
                full[patch] = t[:n]
                full[prefix_rows] = t[n:]  # the class token's copies are equal: any one will do
                aligned.append(full.reshape(*shape[:-1], *t.shape[1:]))
            record.fill(tokens, *aligned)
        return out.reshape(shape)

    # -- compute ------------------------------------------------------------------------------------

    def macs(self, n, dim: int, mlp_hidden: int):
        """MACs on ``n`` alive tokens (int or tensor), prefix included, alive tokens spread evenly
        over positions and frames (module docstring)."""
        T, H, W = self.grid
        S = H * W
        if self.attention_type == "joint_space_time":  # a ViT block
            return flops.block_macs(n, dim, mlp_hidden / dim)
        P = T if self.attention_type == "space_only" else 1
        n_p = n - P
        spatial_rows = n_p + T  # divided: the class token once per frame; space-only: one per frame
        macs = spatial_rows * 4 * dim * dim + 2 * dim * T * (n_p / T + 1) ** 2 + n * 2 * dim * mlp_hidden
        if self.attention_type == "divided_space_time":
            macs = macs + n_p * 5 * dim * dim + 2 * dim * S * (n_p / S) ** 2
        return macs


@dataclass(frozen=True)
class _Segments:
    """Rows sorted into attention segments: ``rows[order]`` attend within ``packed``'s images."""

    order: Tensor
    packed: Tokens


@dataclass(frozen=True)
class _SegmentPlan:
    """Where a divided / space-only block's attention segments lie in a layout (module docstring).

    It depends on the token positions alone, so one plan serves every block of a stage
    (:meth:`iared.tokens.Tokens.per_layout`): the sorts and segment counts (a host sync each) run
    once per stage instead of once per block. ``patch``: rows of the real patch tokens;
    ``prefix_rows``: the prefix row that each (clip, frame) spatial segment adds (divided: the class
    token, once per frame); ``start``: each clip's first row; ``temporal`` (divided only): the patch
    rows' (clip, position) segments; ``spatial``: the (clip, frame) segments of the patch rows
    followed by the prefix rows."""

    patch: Tensor
    prefix_rows: Tensor
    start: Tensor
    temporal: _Segments | None
    spatial: _Segments

    @staticmethod
    def of(tokens: Tokens, grid: tuple[int, int, int], attention_type: str) -> _SegmentPlan:
        T = grid[0]
        weights = None if tokens.weights is None else tokens.weights.reshape(-1)
        patch = tokens.patch_mask().reshape(-1).nonzero().squeeze(1)
        start = tokens.start_rows()  # prefix tokens lead every input
        device = start.device
        temporal = None
        if attention_type == "divided_space_time" and patch.numel():
            positions = tokens.grid_groups(grid, (1, 2)).reshape(-1)[patch]
            temporal = _Segments(*segments_as_packed(positions, tokens.attention,
                                                     None if weights is None else weights[patch]))
        frames = tokens.grid_groups(grid, (0,)).reshape(-1)[patch]
        frame_of_prefix = torch.arange(start.shape[0] * T, device=device)  # (clip, frame) of each prefix row
        if attention_type == "divided_space_time":
            prefix_rows = start.repeat_interleave(T)
        else:
            prefix_rows = (start[:, None] + torch.arange(T, device=device)).reshape(-1)
        ws = None if weights is None else torch.cat([weights[patch], weights[prefix_rows]])
        spatial = _Segments(*segments_as_packed(torch.cat([frames, frame_of_prefix]), tokens.attention, ws))
        return _SegmentPlan(patch, prefix_rows, start, temporal, spatial)


def _attend(attn: Attention, x: Tensor, segments: _Segments, qkv_out: list | None = None) -> Tensor:
    """``attn`` on rows ``x`` ``(R, C)`` within ``segments``; results in the rows' order."""
    order = segments.order
    out = attn(x[order], segments.packed, qkv_out)
    if qkv_out is not None:
        qkv_out[-1] = tuple(t.new_empty(t.shape).index_copy_(0, order, t) for t in qkv_out[-1])
    return out.new_empty(out.shape).index_copy_(0, order, out)


def _dense(x: Tensor) -> DenseTokens:
    """A ``(G, n, C)`` batch of equal segments, each attending within itself."""
    return DenseTokens.from_embeddings(x, 0, has_class_token=False)


class PatchEmbed(nn.Module):
    """Frame by frame non-overlapping patches (official key ``patch_embed.proj``), or with ``conv_stem``
    the stem's stages (``patch_embed.backbone``) and a 1x1 projection, as a hybrid ViT's."""

    def __init__(self, cfg: TimeSformerConfig):
        super().__init__()
        if cfg.conv_stem:
            self.backbone = nn.Sequential(*conv_stem_stages(cfg.in_chans, cfg.conv_stem))
            self.proj = nn.Conv2d(cfg.conv_stem[-1], cfg.embed_dim, 1)
        else:
            self.backbone = nn.Identity()
            self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, frames: Tensor) -> Tensor:
        """``(B * T, C_in, H, W)`` -> ``(B * T, H' W', C)``, row-major."""
        return self.proj(run_stem(self.backbone, frames)).flatten(2).transpose(1, 2)


class TimeSformer(nn.Module):
    """TimeSformer with the official state-dict layout, implementing
    :class:`iared.models.protocol.Backbone`.

    ``forward(clips) -> logits (B, num_classes)``; clips ``(B, T, C, H, W)``. The pieces, for models
    that prune between blocks: :meth:`embed` (pixels -> dense tokens ``(B, P + T*H*W, C)``), ``blocks``
    (Tokens -> Tokens, any layout), :meth:`forward_head` (final norm and classifier on the class token).
    """

    def __init__(self, cfg: TimeSformerConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or TimeSformerConfig(**overrides)
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.patches_per_frame, dim))
        if cfg.attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head = nn.Linear(dim, cfg.num_classes)
        self._init_weights()

    def _init_weights(self):
        # The official initialisation: trunc-normal(0.02) tokens, positions and linears, zero biases,
        # temporal_fc of every block but the first zero (a new temporal path starts as the identity).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        if self.cfg.attention_type == "divided_space_time":
            for block in list(self.blocks)[1:]:
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)

    # -- the data path ------------------------------------------------------------------------

    def check_input(self, clips: Tensor) -> None:
        c = self.cfg
        expected = (c.num_frames, c.in_chans, c.img_size, c.img_size)
        if clips.dim() != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(f"expected clips (B, T, C, H, W) = (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(clips.shape)}; sample {c.num_frames} frames at {c.img_size}x{c.img_size} "
                             "(iared.data.video.VideoFolder) or create the model with matching num_frames / img_size")

    def embed(self, clips: Tensor) -> DenseTokens:
        """``(B, T, C_in, H, W)`` -> dense tokens ``(B, P + T*H'*W', C)``: the class token (one per frame
        for ``space_only``), then the patches in ``(T, H', W')`` row-major order."""
        self.check_input(clips)
        c = self.cfg
        B, T = clips.shape[:2]
        x = self.patch_embed(clips.flatten(0, 1)) + self.pos_embed[:, 1:]  # (B*T, S, C)
        x = x.reshape(B, T, -1, c.embed_dim)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, self.num_prefix_tokens, -1)
        if c.attention_type != "space_only":
            x = x + self.time_embed[:, :, None]  # per frame; the class token gets no time embedding
        x = torch.cat([cls, x.flatten(1, 2)], dim=1)
        return DenseTokens.from_embeddings(x, self.num_prefix_tokens)

    def forward_head(self, tokens: Tokens) -> Tensor:
        """Final norm and classifier on the class token (``space_only``: on the mean of the frames'
        class tokens, averaged before the norm as the official code averages its frames)."""
        prefix = tokens.prefix()
        return self.head(self.norm(prefix.mean(1) if self.num_prefix_tokens > 1 else prefix[:, 0]))

    def forward_features(self, clips: Tensor) -> Tensor:
        """``(B, P + N, C)`` features of every token after the final norm."""
        tokens = self.embed(clips)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens.data)

    def forward(self, clips: Tensor, keep: Tensor | None = None) -> Tensor:
        """``(B, T, C, H, W)`` -> logits ``(B, num_classes)``. ``keep``: ``(B, T*H'*W')`` bool over the
        patch tokens: run the blocks on those only (packed layout)."""
        tokens = self.embed(clips)
        if keep is not None:
            prefix = torch.ones(keep.shape[0], self.num_prefix_tokens, dtype=torch.bool, device=keep.device)
            tokens = tokens.select(torch.cat([prefix, keep], dim=1))
        for block in self.blocks:
            tokens = block(tokens)
        return self.forward_head(tokens)

    # -- the Backbone protocol (iared.models.protocol) ------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_prefix_tokens + self.cfg.num_patches

    @property
    def token_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def token_grid(self) -> tuple[int, ...]:
        """``(T, H', W')``: frames, patch rows, patch columns, row-major after the prefix tokens."""
        return self.cfg.token_grid

    def block_input_shape(self, block: int) -> tuple[int, int]:
        return self.num_tokens, self.cfg.embed_dim

    def block_macs(self, n, block: int | None = None):
        """MACs of a block on ``n`` alive tokens (int or ``(B,)`` tensor), prefix included; the
        attention products assume alive tokens spread evenly (module docstring;
        :meth:`layout_block_macs` is exact)."""
        c = self.cfg
        return self.blocks[0 if block is None else block].macs(n, c.embed_dim, int(c.embed_dim * c.mlp_ratio))

    def layout_block_macs(self, tokens: Tokens, block: int = 0) -> Tensor:
        """``(B,)`` exact MACs of block ``block`` on this layout: :meth:`block_macs` with the attention
        products of the segments the alive tokens really form."""
        c = self.cfg
        d = c.embed_dim
        n = tokens.lengths().to(torch.float64)
        if c.attention_type == "joint_space_time":
            return self.block_macs(n, block)
        T, H, W = self.token_grid
        P = self.num_prefix_tokens
        even = self.block_macs(n, block)
        n_p = n - P
        frames = _segment_sizes(tokens, tokens.grid_groups(self.token_grid, (0,)), T)  # (B, T)
        exact = 2 * d * ((frames + 1) ** 2).sum(1) - 2 * d * T * (n_p / T + 1) ** 2
        if c.attention_type == "divided_space_time":
            positions = _segment_sizes(tokens, tokens.grid_groups(self.token_grid, (1, 2)), H * W)
            exact = exact + 2 * d * (positions**2).sum(1) - 2 * d * H * W * (n_p / (H * W)) ** 2
        return even + exact

    def fixed_macs(self) -> float:
        """Patch embedding (every frame's) and classifier."""
        c = self.cfg
        return float(flops.embed_macs(c) + c.embed_dim * c.num_classes)

    def patch_pixels(self, clips: Tensor, block: int = 0) -> Tensor:
        """``(B, T*H'*W', C_in * p * p)``: the pixels under every patch token, in token order."""
        p = self.cfg.patch_size
        B = clips.shape[0]
        cells = F.unfold(clips.flatten(0, 1), p, stride=p).transpose(1, 2)  # (B*T, S, C p p)
        return cells.reshape(B, -1, cells.shape[-1])

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"frames={c.num_frames}, img_size={c.img_size}, patch={c.patch_size}, dim={c.embed_dim}, "
                f"depth={c.depth}, heads={c.num_heads}, attention={c.attention_type}")


def _segment_sizes(tokens: Tokens, segments: Tensor, per_input: int) -> Tensor:
    """``(B, per_input)`` float64: alive patch tokens in each segment of each input."""
    ids = segments.reshape(-1)
    ids = ids[ids >= 0]
    counts = torch.zeros(tokens.batch_size * per_input, dtype=torch.float64, device=ids.device)
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
    return counts.reshape(tokens.batch_size, per_input)


# -- weights: the official .pyth files and Hugging Face transformers ---------------------------------

def official_state_dict(obj: Mapping, path: str | os.PathLike = "<memory>") -> dict[str, Tensor]:
    """Our keys from a checkpoint's contents: the official ``{"model_state": {"model.<key>": ...}}``
    (``model.`` and a DDP ``module.`` stripped), or a plain / iared state dict."""
    from iared.checkpoint import CheckpointError, extract_state_dict

    if isinstance(obj.get("model_state"), dict):
        sd = obj["model_state"]
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
        if not sd or bad:
            raise CheckpointError(f"bad checkpoint {path}: 'model_state' holds no state dict "
                                  f"(non-tensor entries: {bad[:5]})")
    else:
        sd = extract_state_dict(dict(obj), path)
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        out[key.removeprefix("model.")] = value
    return out


def attention_type_of(state_dict: Mapping[str, Tensor]) -> str | None:
    """Which TimeSformer a state dict holds, read off its keys (None: no TimeSformer blocks)."""
    if not any(k.startswith("blocks.") for k in state_dict) or "pos_embed" not in state_dict:
        return None
    if any(".temporal_attn." in k for k in state_dict):
        return "divided_space_time"
    return "joint_space_time" if "time_embed" in state_dict else "space_only"


def config_from_state_dict(state_dict: Mapping[str, Tensor], **overrides) -> TimeSformerConfig:
    """The geometry a state dict was made for: width, depth, patch and image size, frames, classes,
    attention type, MLP width, qkv bias. Heads are not in the weights: ``embed_dim / 64`` (every
    released TimeSformer) unless given."""
    kind = attention_type_of(state_dict)
    if kind is None:
        raise ValueError("not a TimeSformer state dict (no blocks.* / pos_embed)")
    proj = state_dict["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    stem = stem_widths(state_dict, "patch_embed.backbone.")
    if stem:  # a hybrid: the stem's stages make the patches, the projection is 1x1
        in_chans, patch = state_dict["patch_embed.backbone.0.0.weight"].shape[1], 2 ** len(stem)
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    values = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=max(dim // 64, 1), mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict, attention_type=kind,
        num_classes=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 400,
        num_frames=state_dict["time_embed"].shape[1] if "time_embed" in state_dict else 8, conv_stem=stem,
    )
    return TimeSformerConfig(**{**values, **overrides})


def load_timesformer_weights(model: TimeSformer, path: str | os.PathLike) -> None:
    """Load an official ``.pyth`` file (or a plain / safetensors / iared state dict) into ``model``.

    Always ``weights_only=True`` (:func:`iared.checkpoint.read_checkpoint`). Every problem is one line
    naming the file: unreadable, no state dict, another attention type than the model's (the wrong
    architecture), missing / unexpected keys, shapes of another geometry (frames, image size, classes).
    """
    from iared.checkpoint import CheckpointError, load_weights, read_checkpoint

    sd = official_state_dict(read_checkpoint(path), path)
    kind = attention_type_of(sd)
    if kind is None:
        raise CheckpointError(f"bad checkpoint {path}: not a TimeSformer (no blocks.* / pos_embed keys; "
                              f"found {', '.join(sorted(sd)[:4])}, ...)")
    if kind != model.cfg.attention_type:
        raise CheckpointError(f"bad checkpoint {path}: holds a {kind} TimeSformer, the model is "
                              f"{model.cfg.attention_type} (create it with attention_type={kind!r})")
    load_weights(model, sd, path)


def load_timesformer(path: str | os.PathLike, **overrides) -> TimeSformer:
    """A TimeSformer whose geometry is read off the file (:func:`config_from_state_dict`), with its weights."""
    from iared.checkpoint import CheckpointError, read_checkpoint

    sd = official_state_dict(read_checkpoint(path), path)
    try:
        cfg = config_from_state_dict(sd, **overrides)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"bad checkpoint {path}: {' '.join(str(e).split())}") from None
    model = TimeSformer(cfg)
    load_timesformer_weights(model, path)
    return model


def inflate_image_weights(model: TimeSformer, image_state_dict: Mapping[str, Tensor],
                          path: str | os.PathLike = "<memory>") -> list[str]:
    """Start ``model`` from an image ViT's weights (timm layout, a hybrid's conv stem included), as the
    TimeSformer paper starts from ImageNet ViTs.

    Copied: the patch embedding, class token, each block's spatial attention, MLP and norms, the final
    norm and (same classes) the head; the position table is resampled to the frame's patch grid. Each
    block's temporal attention and norm start as copies of its spatial ones (the official loader's rule),
    every ``temporal_fc`` and ``time_embed`` at zero: the temporal path starts as the identity, so the
    clip model starts as the image model run frame by frame, its class token shared by the frames.
    Returns the keys left at their initialisation (``head.*`` when the classes differ). One-line
    :class:`~iared.checkpoint.CheckpointError` naming ``path`` when the ViT does not fit (depth, width,
    patch embedding, attention type)."""
    from iared.checkpoint import CheckpointError
    from iared.models.vit import resample_pos_embed

    c = model.cfg
    if c.attention_type != "divided_space_time":
        raise CheckpointError(f"{path}: inflating an image ViT needs a divided_space_time TimeSformer, "
                              f"not {c.attention_type}")
    image = dict(image_state_dict)
    depth = len({k.split(".")[1] for k in image if k.startswith("blocks.")})
    if depth != c.depth or "pos_embed" not in image or "cls_token" not in image:
        raise CheckpointError(f"bad image checkpoint {path}: a ViT with {depth} blocks (cls_token and pos_embed "
                              f"{'present' if 'pos_embed' in image else 'missing'}); the TimeSformer has {c.depth}")
    pos = image["pos_embed"]
    old_side = math.isqrt(pos.shape[1] - 1)
    if old_side * old_side != pos.shape[1] - 1:
        raise CheckpointError(f"bad image checkpoint {path}: pos_embed of {pos.shape[1]} rows is not one class "
                              "token and a square grid")
    image["pos_embed"] = resample_pos_embed(pos, (c.grid_size, c.grid_size), 1, (old_side, old_side))
    for key in list(image):
        if key.startswith("blocks.") and (".attn." in key or ".norm1." in key):
            image[key.replace(".attn.", ".temporal_attn.").replace(".norm1.", ".temporal_norm1.")] = image[key]
    own = model.state_dict()
    fresh = [k for k in own if k.startswith("head.") and (k not in image or image[k].shape != own[k].shape)]
    missing = [k for k in own if k not in image and k != "time_embed" and ".temporal_fc." not in k and k not in fresh]
    wrong = [k for k in own if k in image and k not in fresh and image[k].shape != own[k].shape]
    if missing or wrong:
        what = f"missing {', '.join(missing[:4])}" if missing else \
            f"{wrong[0]} is {tuple(image[wrong[0]].shape)}, the TimeSformer's {tuple(own[wrong[0]].shape)}"
        raise CheckpointError(f"bad image checkpoint {path}: does not fit the TimeSformer ({what})")
    with torch.no_grad():
        for key, value in own.items():
            if key == "time_embed" or ".temporal_fc." in key:
                value.zero_()
            elif key not in fresh:
                value.copy_(image[key].to(value.dtype))
    return fresh


# transformers' TimesformerLayer names (left) -> the official Block's (right).
_HF_LAYER_KEYS = {
    "layernorm_before": "norm1",
    "attention.attention.qkv": "attn.qkv",
    "attention.output.dense": "attn.proj",
    "temporal_layernorm": "temporal_norm1",
    "temporal_attention.attention.qkv": "temporal_attn.qkv",
    "temporal_attention.output.dense": "temporal_attn.proj",
    "temporal_dense": "temporal_fc",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_KEYS = {
    "timesformer.embeddings.cls_token": "cls_token",
    "timesformer.embeddings.position_embeddings": "pos_embed",
    "timesformer.embeddings.time_embeddings": "time_embed",
    "timesformer.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "timesformer.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "timesformer.layernorm.weight": "norm.weight",
    "timesformer.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def hf_to_official_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``TimesformerForVideoClassification``'s state dict under the official names. A key that has no
    counterpart raises ``KeyError`` naming it (a newer transformers layout must not load silently)."""
    prefix = "timesformer.encoder.layer."
    out = {}
    for key, value in state_dict.items():
        if key in _HF_TOP_KEYS:
            out[_HF_TOP_KEYS[key]] = value
            continue
        if not key.startswith(prefix):
            raise KeyError(f"transformers key {key!r} has no TimeSformer counterpart")
        index, _, rest = key[len(prefix):].partition(".")
        name, _, param = rest.rpartition(".")
        if name not in _HF_LAYER_KEYS:
            raise KeyError(f"transformers key {key!r} has no TimeSformer counterpart")
        out[f"blocks.{index}.{_HF_LAYER_KEYS[name]}.{param}"] = value
    return out


def config_from_hf(hf_config) -> TimeSformerConfig:
    """Our config from a ``transformers.TimesformerConfig``; refuses what our blocks do not implement."""
    image, patch = hf_config.image_size, hf_config.patch_size
    if not isinstance(image, int) or not isinstance(patch, int):
        raise ValueError(f"non-square images or patches not supported ({image}, {patch})")
    if hf_config.hidden_act != "gelu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} not supported (TimeSformer uses exact GELU)")
    return TimeSformerConfig(
        img_size=image, patch_size=patch, in_chans=hf_config.num_channels, num_frames=hf_config.num_frames,
        num_classes=hf_config.num_labels, embed_dim=hf_config.hidden_size, depth=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, mlp_ratio=hf_config.intermediate_size / hf_config.hidden_size,
        qkv_bias=hf_config.qkv_bias, attention_type=hf_config.attention_type, norm_eps=hf_config.layer_norm_eps,
    )


def from_hf_timesformer(reference: nn.Module) -> TimeSformer:
    """Our model with the weights of a ``transformers.TimesformerForVideoClassification``.

    Same logits for ``divided_space_time`` and ``joint_space_time``. For ``space_only`` the weights
    map the same, but ``transformers`` classifies every frame separately (``(B * T, classes)``) while
    the official code, and this model, average the frames' class tokens before the final norm.
    """
    from iared.checkpoint import load_weights

    model = TimeSformer(config_from_hf(reference.config))
    load_weights(model, hf_to_official_keys(reference.state_dict()), f"transformers:{type(reference).__name__}")
    return model.train(reference.training)


# -- names --------------------------------------------------------------------------------------------

# The official model zoo (facebookresearch/TimeSformer README, configs/): TimeSformer 8 x 224,
# TimeSformer-HR 16 x 448, TimeSformer-L 96 x 224 (SSv2: 64 x 224), all ViT-B/16, divided attention.
_GEOMETRY = {
    "timesformer_base_patch16_224": dict(num_frames=8, img_size=224),
    "timesformer_hr_patch16_448": dict(num_frames=16, img_size=448),
    "timesformer_l_patch16_224": dict(num_frames=96, img_size=224),
}
TIMESFORMER_CONFIGS: dict[str, dict] = {}
for _name, _geometry in _GEOMETRY.items():
    TIMESFORMER_CONFIGS[_name] = dict(_geometry, num_classes=400)  # Kinetics-400
    TIMESFORMER_CONFIGS[f"{_name}_k600"] = dict(_geometry, num_classes=600)
    TIMESFORMER_CONFIGS[f"{_name}_ssv2"] = dict(_geometry, num_classes=174)
TIMESFORMER_CONFIGS["timesformer_l_patch16_224_ssv2"]["num_frames"] = 64
# moving-digits' backbone: digits_natural_vit's width, depth, heads and conv stem on 8 frames of 48x48
# (36 patches of 8 per frame, 288 space-time tokens), trained from that image model
# (:func:`inflate_image_weights`; the command is in iared.train.backbone's docstring).
TIMESFORMER_CONFIGS["moving_digits_tsf"] = dict(
    img_size=48, patch_size=8, in_chans=3, num_frames=8, num_classes=10, embed_dim=144, depth=6, num_heads=4,
    conv_stem=(16, 32, 64), mean=(0.0,) * 3, std=(1.0,) * 3)


def build_timesformer(name: str, config: dict, *, pretrained: bool = False, checkpoint=None,
                      **overrides) -> TimeSformer:
    """The TimeSformer ``name`` with ``config`` and ``overrides`` (``TimeSformerConfig`` fields); weights
    from a local ``checkpoint`` (official ``.pyth``, plain state dict, safetensors), or with ``pretrained``
    the shipped ones of an embedded task's backbone (``moving_digits_tsf``). Nothing is downloaded."""
    from iared.models import EMBEDDED_CHECKPOINTS, embedded_checkpoint_path

    if pretrained and checkpoint is None and name in EMBEDDED_CHECKPOINTS:  # trained by this project, shipped
        checkpoint = embedded_checkpoint_path(name)
    elif pretrained:
        raise ValueError(f"{name}: no download here; get the official .pyth file (facebookresearch/TimeSformer "
                         "model zoo) and pass checkpoint=PATH, or convert a transformers model with "
                         "iared.models.timesformer.from_hf_timesformer")
    model = TimeSformer(TimeSformerConfig(**{**config, **overrides}))
    if checkpoint is not None:
        load_timesformer_weights(model, checkpoint)
    return model
