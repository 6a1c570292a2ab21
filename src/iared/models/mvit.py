"""MViTv2 (Li et al., CVPR 2022; MViT, Fan et al., ICCV 2021) whose forward pass is ours and whose
weights are timm's.

The state-dict keys and shapes are those of ``timm.models.mvitv2.MultiScaleVit`` for the
ImageNet-1k models ``mvitv2_tiny`` / ``small`` / ``base`` (no class token, average pooling,
``expand_attn``, convolutional pooling, spatial relative positions, residual pooling): a checkpoint
written by timm loads unchanged, and tests compare logits against timm itself.

The architecture, as the forward pass here runs it: a 7x7 stride-4 convolution embeds the image
into a ``56 x 56`` grid (at 224 px) of width 96; four resolution stages follow. Every block pools
its queries, keys and values with strided depthwise 3x3 convolutions (one shared over the heads,
then a LayerNorm per head): keys and values by 4, 2, 1, 1 per stage (the attention cost stays
small), queries by 2 in the first block of stages 2-4, which halves the grid and doubles the
width (the shortcut is then max-pooled and projected). Attention adds decomposed relative
positions (a row table and a column table, read by the query) and the pooled query itself
(residual pooling). The head averages the final grid.

IA-RED² on a grid (how dropped tokens interact with pooling)
-------------------------------------------------------------
A ViT token can simply leave: nobody reads it again. An MViT token cannot: the 3x3 pooling
convolutions of every later block read its neighbourhood, and a stride-2 block builds each
coarser token from a window of finer ones. The rule here:

* **A dropped token is frozen, not erased.** Its last features stay in a grid cache
  (:attr:`iared.tokens.Tokens.grid`, written when it is dropped). Dropping a token means its
  residual branches are zero from then on: it is no longer a query, nor a row of the output
  projection and MLP, exactly as a dropped ViT token skips its blocks.
* **Pooled queries, keys and values see the whole grid.** Each block reads the grid (alive rows
  current, dropped rows cached), normalises it and projects q, k, v there, and pools them with its
  convolutions, so an alive token's pooled query and every pooled key are what they would be if
  the dropped neighbours had stopped changing. Only the alive tokens' queries attend. Zeroing or
  masking dropped tokens instead would change every alive neighbour's pooled query and key (a
  pretrained MViT never saw holes in its windows), while the projection on the grid costs 3 of
  the block's 12 ``n d^2`` linear MACs.
* **A resolution change restores the grid.** A stride-2 block computes every coarse token from the
  cached fine grid (its queries, shortcut and MLP run on the whole coarse grid): its fine-grid work
  (normalisation, q/k/v projection, shortcut projection) needs every fine token anyway, and a
  coarse token whose window mixes alive and dropped tokens has no single fate. The next reducer
  decides afresh at the new resolution. So reducers belong before the first stride-1 block of a
  resolution stage (:meth:`MultiScaleViT.default_stage_starts`); a reducer placed right before a
  stride-2 block saves nothing (its decision is undone).

Token positions (``Tokens.index``) are positions on the current grid, so keep masks and scores of
a stage are reported on that stage's grid (:meth:`MultiScaleViT.block_input_shape`). There is no
class token: the IA-RED² interpreter's query is the mean of the alive tokens
(:meth:`iared.tokens.Tokens.summary`), the average the head reads. The head averages the whole final
grid, dropped tokens at their last features.

Peers on the grid: EViT and ATS rank tokens by the previous block's attention from a summary
query. Here keys and values are pooled, so no query sees a single token's key; a block's record
(``record=``) credits each token it returns with the attention that the mean of the alive queries
pays to the pooled key cell covering it (tokens of one cell share its logit), and with that cell's
value norm. Where keys are not pooled (stride 1: the last two stages of MViTv2) this is exactly
EViT's class attention. Token merging (ToMe) would need merged sizes to weight keys that are
pooled over the grid, which has no meaning: it is refused (``supports_key_weights``).

MACs (:meth:`MultiScaleBlock.macs`) follow the widths and resolutions block by block: grid work
(projections, pooling, relative-position tables) at the full grid, query work (attention, output
projection, MLP) at the alive count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared.models.vit import IMAGENET_MEAN, IMAGENET_STD, ConvPatches, Mlp
from iared.tokens import DenseTokens, Tokens

Pair = tuple[int, int]


@dataclass
class MViTConfig:
    """Geometry of an MViTv2 (field names follow ``timm.models.mvitv2.MultiScaleVitCfg``).

    ``embed_dim`` / ``num_heads``: one value (doubled at every stage, timm's rule) or one per stage.
    ``stride_kv``: per stage, or None to derive it from ``stride_kv_adaptive`` as timm does (the
    key/value stride of stage 1, divided by each query stride on the way).
    """

    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple[int, ...] = (1, 2, 5, 2)
    embed_dim: int | tuple[int, ...] = 96
    num_heads: int | tuple[int, ...] = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_qkv: Pair = (3, 3)
    stride_q: tuple[Pair, ...] = ((1, 1), (2, 2), (2, 2), (2, 2))
    stride_kv: tuple[Pair, ...] | None = None
    stride_kv_adaptive: Pair = (4, 4)
    patch_kernel: Pair = (7, 7)
    patch_stride: Pair = (4, 4)
    patch_padding: Pair = (3, 3)
    residual_pooling: bool = True
    norm_eps: float = 1e-6
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self):
        stages = len(self.depths)
        self.depths = tuple(int(d) for d in self.depths)
        self.embed_dim = _per_stage(self.embed_dim, stages, "embed_dim")
        self.num_heads = _per_stage(self.num_heads, stages, "num_heads")
        self.kernel_qkv, self.patch_kernel = _pair(self.kernel_qkv), _pair(self.patch_kernel)
        self.patch_stride, self.patch_padding = _pair(self.patch_stride), _pair(self.patch_padding)
        self.stride_kv_adaptive = _pair(self.stride_kv_adaptive)
        self.stride_q = tuple(_pair(s) for s in self.stride_q)
        if len(self.stride_q) != stages:
            raise ValueError(f"stride_q needs {stages} entries (one per stage), got {len(self.stride_q)}")
        if self.stride_kv is None:
            kv, strides = self.stride_kv_adaptive, []
            for sq in self.stride_q:
                if min(sq) > 1:
                    kv = tuple(max(k // s, 1) for k, s in zip(kv, sq))
                strides.append(kv)
            self.stride_kv = tuple(strides)
        self.stride_kv = tuple(_pair(s) for s in self.stride_kv)
        for dim, heads in zip(self.embed_dim, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        if self.img_size % self.patch_stride[0] or self.patch_stride[0] != self.patch_stride[1]:
            raise ValueError(f"img_size {self.img_size} must be a multiple of a square patch_stride {self.patch_stride}")
        size = self.img_size // self.patch_stride[0]
        for sq in self.stride_q:  # timm computes grid sizes as size // stride: refuse grids where that is wrong
            if size % sq[0] or sq[0] != sq[1]:
                raise ValueError(f"img_size {self.img_size}: grid {size} does not divide by query stride {sq}")
            size //= sq[0]
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def grid_size(self) -> int:
        """Side of the token grid after the patch embedding (56 at 224 px)."""
        return self.img_size // self.patch_stride[0]

    def to_dict(self) -> dict:
        return asdict(self)


def _per_stage(value, stages: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != stages:
            raise ValueError(f"{name} needs {stages} entries (one per stage), got {len(value)}")
        return tuple(int(v) for v in value)
    return tuple(int(value) * 2**i for i in range(stages))


def _pair(value) -> Pair:
    a, b = (value, value) if isinstance(value, int) else value
    return int(a), int(b)


class MultiScaleAttention(nn.Module):
    """Pooling attention (timm keys: ``qkv``, ``proj``, ``pool_{q,k,v}``, ``norm_{q,k,v}``,
    ``rel_pos_{h,w}``)."""

    def __init__(self, dim_in: int, dim_out: int, heads: int, size: int, kernel: Pair, stride_q: Pair,
                 stride_kv: Pair, qkv_bias: bool, residual_pooling: bool, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim_out // heads
        self.qkv = nn.Linear(dim_in, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        pool_q = math.prod(kernel) > 1 or math.prod(stride_q) > 1
        pool_kv = math.prod(kernel) > 1 or math.prod(stride_kv) > 1
        self.pool_q = self.norm_q = self.pool_k = self.norm_k = self.pool_v = self.norm_v = None
        for name, stride, wanted in (("q", stride_q, pool_q), ("k", stride_kv, pool_kv), ("v", stride_kv, pool_kv)):
            if wanted:  # depthwise over one head's channels, shared by the heads; then LayerNorm per head
                setattr(self, f"pool_{name}", nn.Conv2d(self.head_dim, self.head_dim, kernel, stride,
                                                        (kernel[0] // 2, kernel[1] // 2), groups=self.head_dim,
                                                        bias=False))
                setattr(self, f"norm_{name}", nn.LayerNorm(self.head_dim, eps=eps))
        # Table sizes as timm sizes them (size // stride), so its checkpoints fit.
        span = 2 * max(size // stride_q[1], size // stride_kv[1]) - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(span, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(span, self.head_dim))
        self.residual_pooling = residual_pooling

    def _pool(self, x: Tensor, size: Pair, which: str) -> tuple[Tensor, Pair]:
        conv = getattr(self, f"pool_{which}")
        if conv is None:
            return x, size
        B, N, H, D = x.shape
        pooled = conv(x.permute(0, 2, 3, 1).reshape(B * H, D, *size))
        out_size = tuple(pooled.shape[-2:])
        return getattr(self, f"norm_{which}")(pooled.reshape(B, H, D, -1).permute(0, 3, 1, 2)), out_size

    def pooled(self, xn: Tensor, size: Pair) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Pair]:
        """Pooled q, k, v of the whole normalised grid ``xn`` ``(B, N, C_in)``.

        Returns ``q`` ``(B, N_q, H, D)`` on the query grid, ``k, v`` ``(B, N_k, H, D)``, the relative
        position terms ``rel_h`` ``(B, N_q, H, k_h)`` and ``rel_w`` ``(B, N_q, H, k_w)`` of every query,
        and the query grid's size.
        """
        q, k, v = self.qkv(xn).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        q, q_size = self._pool(q, size, "q")
        k, k_size = self._pool(k, size, "k")
        v, _ = self._pool(v, size, "v")
        rel_h, rel_w = self._relative_terms(q, q_size, k_size)
        return q, k, v, rel_h, rel_w, q_size

    def _relative_terms(self, q: Tensor, q_size: Pair, k_size: Pair) -> tuple[Tensor, Tensor]:
        """MViTv2's decomposed relative positions: query (y, x) reads ``rel_pos_h[d(y, y')]`` for every
        key row y' and ``rel_pos_w[d(x, x')]`` for every key column x'; the distance d is measured on
        the finer of the two grids (coarse coordinates are scaled up), offset to be >= 0."""
        B, _, H, D = q.shape
        grid_q = q.reshape(B, q_size[0], q_size[1], H, D)
        table_h = self.rel_pos_h[_distance_index(q_size[0], k_size[0], q.device)]  # (q_h, k_h, D)
        table_w = self.rel_pos_w[_distance_index(q_size[1], k_size[1], q.device)]  # (q_w, k_w, D)
        rel_h = torch.einsum("byxhd,ykd->byxhk", grid_q, table_h).reshape(B, -1, H, k_size[0])
        rel_w = torch.einsum("byxhd,xkd->byxhk", grid_q, table_w).reshape(B, -1, H, k_size[1])
        return rel_h, rel_w

    def attend(self, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor) -> Tensor:
        """Attention of token-aligned queries ``q`` ``(..., H, D)`` (relative terms alike) to the
        image's pooled keys; returns the projected ``(..., C_out)``."""
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # (..., H, k_h * k_w)
        out = tokens.attend_keys(q, k, v, bias)
        if self.residual_pooling:
            out = out + q
        return self.proj(out.flatten(-2))


def _distance_index(q_len: int, k_len: int, device) -> Tensor:
    """``(q_len, k_len)`` long: index into a relative-position table for every (query, key) pair."""
    q_scale, k_scale = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    qi = torch.arange(q_len, device=device)[:, None] * q_scale
    ki = torch.arange(k_len, device=device)[None, :] * k_scale
    return (qi - ki + (k_len - 1) * k_scale).long()


class MultiScaleBlock(nn.Module):
    """One MViTv2 block on a grid of ``size x size`` tokens (see the module docstring for pruning).

    ``forward(tokens) -> tokens``: a stride-1 block returns the alive tokens updated (same layout);
    a stride-2 block returns the whole coarse grid, dense.
    """

    def __init__(self, dim_in: int, dim_out: int, heads: int, size: int, stride_q: Pair, stride_kv: Pair,
                 cfg: MViTConfig):
        super().__init__()
        self.dim_in, self.dim_out, self.size = dim_in, dim_out, size
        self.stride = stride_q
        self.out_size = size // stride_q[0]
        self.kv_size = (size + stride_kv[0] - 1) // stride_kv[0]  # a padded k//2 conv gives ceil(size / stride)
        self.kernel = cfg.kernel_qkv
        self.mlp_hidden = int(dim_out * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim_in, eps=cfg.norm_eps)
        self.shortcut_proj_attn = nn.Linear(dim_in, dim_out) if dim_in != dim_out else None
        self.attn = MultiScaleAttention(dim_in, dim_out, heads, size, cfg.kernel_qkv, stride_q, stride_kv,
                                        cfg.qkv_bias, cfg.residual_pooling, cfg.norm_eps)
        self.norm2 = nn.LayerNorm(dim_out, eps=cfg.norm_eps)
        self.mlp = Mlp(dim_out, self.mlp_hidden, dim_out)

    @property
    def changes_grid(self) -> bool:
        return math.prod(self.stride) > 1

    def _pooled_shortcut(self, x: Tensor) -> Tensor:
        """The shortcut of a stride-2 block: max over each query's window (kernel stride + 1, as MViT)."""
        s = self.stride
        B, N, C = x.shape
        grid = x.transpose(1, 2).reshape(B, C, self.size, self.size)
        kernel = tuple(k + 1 for k in s)
        pooled = F.max_pool2d(grid, kernel, s, tuple(k // 2 for k in kernel))
        return pooled.flatten(2).transpose(1, 2)

    def _key_cells(self, device) -> Tensor:
        """``(out_size**2,)`` long: the pooled key / value cell that covers each output grid position
        (nearest: coordinates scaled by ``kv_size / out_size``)."""
        y = torch.arange(self.out_size, device=device) * self.kv_size // self.out_size
        return (y[:, None] * self.kv_size + y[None, :]).reshape(-1)

    def _fill_record(self, record, out: Tokens, q: Tensor, k: Tensor, v: Tensor) -> None:
        """What EViT and ATS read, for the tokens this block returns (``q`` aligned with them).

        Keys and values are pooled here (a query never sees one token's own key), so a token is
        credited with the attention the summary query pays to the pooled cell that covers it, and
        with that cell's value norm; tokens sharing a cell share its logit. Where keys are not
        pooled (stride 1, the last stages of MViTv2) this is exactly EViT's class attention.
        """
        cells = self._key_cells(q.device)
        k_tok, v_tok = k[:, cells], v[:, cells]  # (B, out_size**2, H, D) on the output grid
        if out.uniform_length() != self.out_size**2:
            k_tok, v_tok = out.from_grid(k_tok), out.from_grid(v_tok)
        record.fill(out, q, k_tok, v_tok)

    def forward(self, tokens: Tokens, weights_out: list | None = None, record=None) -> Tokens:
        if weights_out is not None:
            raise NotImplementedError("MViTv2 blocks pool keys over the grid: there is no token-to-token "
                                      "attention map for attention explainers")
        if tokens.weights is not None:
            raise NotImplementedError("MViTv2 blocks pool keys over the grid: key weights (merging, gates) "
                                      "have no meaning there")
        whole = tokens.grid is None or tokens.uniform_length() == self.size**2
        x = tokens.data if whole else tokens.on_grid()  # (B, N, C_in): the grid, dropped rows at last features
        xn = self.norm1(x)
        q, k, v, rel_h, rel_w, _ = self.attn.pooled(xn, (self.size, self.size))
        if whole or self.changes_grid:  # every query position: no gathers
            shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(xn)
            if self.changes_grid:
                shortcut = self._pooled_shortcut(shortcut)
            index = torch.arange(q.shape[1], device=q.device).expand(q.shape[:2])
            grid_tokens = DenseTokens(q, index, 0, tokens.attention, has_class_token=False)
            y = shortcut + self.attn.attend(grid_tokens, q, k, v, rel_h, rel_w)
            y = y + self.mlp(self.norm2(y))
            out = (DenseTokens(y, grid_tokens.index, 0, tokens.attention, has_class_token=False, grid=y)
                   if self.changes_grid else tokens.with_data(y))  # the coarse grid starts whole (module docstring)
            if record is not None:
                self._fill_record(record, out, q, k, v)
            return out
        # Alive tokens only: their rows of the pooled queries and relative terms.
        pick = tokens.from_grid
        shortcut = tokens.data if self.shortcut_proj_attn is None else self.shortcut_proj_attn(pick(xn))
        q = pick(q)
        y = shortcut + self.attn.attend(tokens, q, k, v, pick(rel_h), pick(rel_w))
        y = y + self.mlp(self.norm2(y))
        out = tokens.with_data(y)
        if record is not None:
            self._fill_record(record, out, q, k, v)
        return out

    def macs(self, n):
        """MACs on ``n`` alive input tokens (int or ``(B,)`` tensor): grid work at the full grid, query
        work at ``n`` (a stride-2 block computes every coarse token: query work at the coarse grid)."""
        n_in, n_q, n_k = self.size**2, self.out_size**2, self.kv_size**2
        d_in, d, k2 = self.dim_in, self.dim_out, math.prod(self.kernel)
        grid = n_in * d_in * 3 * d  # q, k, v projections
        grid += (n_q if self.attn.pool_q is not None else 0) * d * k2 + 2 * n_k * d * k2 * (self.attn.pool_k is not None)
        grid += n_q * d * (self.kv_size * 2)  # relative-position terms of every query
        if self.changes_grid:
            grid += n_in * d_in * d * (self.shortcut_proj_attn is not None)
            n = n_q
        queries = n * (2 * n_k * d + d * d + 2 * d * self.mlp_hidden)  # QK^T + AV, proj, MLP
        if not self.changes_grid and self.shortcut_proj_attn is not None:
            queries = queries + n * d_in * d
        return grid + queries


class MultiScaleStage(nn.Module):
    """A resolution stage: timm's key prefix ``stages.{i}.blocks.{j}``."""

    def __init__(self, blocks: list[MultiScaleBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class PatchEmbed(ConvPatches):
    """Overlapping ``patch_kernel`` convolution at ``patch_stride`` (timm's MViTv2 stem)."""

    def __init__(self, cfg: MViTConfig):
        super().__init__(cfg.img_size, nn.Conv2d(cfg.in_chans, cfg.embed_dim[0], cfg.patch_kernel, cfg.patch_stride,
                                                 cfg.patch_padding))


class MultiScaleViT(nn.Module):
    """MViTv2 with timm's state-dict layout, implementing :class:`iared.models.protocol.Backbone`.

    ``forward(images) -> logits (B, num_classes)``. ``blocks``: every block of every stage, in order
    (the stage loop groups them its own way; the modules live under ``stages``).
    """

    num_prefix_tokens = 0
    supports_key_weights = False  # keys are pooled over the grid: merged sizes cannot weight them (no ToMe)

    def __init__(self, cfg: MViTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or MViTConfig(**overrides)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        stages, dim_in, size = [], cfg.embed_dim[0], cfg.grid_size
        for i, depth in enumerate(cfg.depths):
            blocks = []
            for j in range(depth):
                stride_q = cfg.stride_q[i] if j == 0 else (1, 1)
                blocks.append(MultiScaleBlock(dim_in, cfg.embed_dim[i], cfg.num_heads[i], size, stride_q,
                                              cfg.stride_kv[i], cfg))
                dim_in, size = cfg.embed_dim[i], blocks[-1].out_size
            stages.append(MultiScaleStage(blocks))
        self.stages = nn.ModuleList(stages)
        self._blocks = tuple(b for s in self.stages for b in s.blocks)  # a view, not registered twice
        self.norm = nn.LayerNorm(dim_in, eps=cfg.norm_eps)
        self.head = nn.Sequential()
        # timm key: head.fc; num_classes=0: none (timm's headless model), forward returns the pooled features
        self.head.add_module("fc", nn.Linear(dim_in, cfg.num_classes) if cfg.num_classes else nn.Identity())
        self._init_weights()

    def _init_weights(self):
        # timm's defaults: trunc-normal(0.02) for linears and relative-position tables, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MultiScaleAttention):
                nn.init.trunc_normal_(m.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(m.rel_pos_w, std=0.02)

    @property
    def blocks(self) -> tuple[MultiScaleBlock, ...]:
        return self._blocks

    # -- the data path ------------------------------------------------------------------------

    def embed(self, images: Tensor) -> DenseTokens:
        """``(B, C_in, H, W)`` -> the whole first grid, dense ``(B, N, C)`` with its grid cache."""
        x = self.patch_embed(images)
        tokens = DenseTokens.from_embeddings(x, 0, has_class_token=False)
        return DenseTokens(x, tokens.index, 0, has_class_token=False, grid=x)

    def forward_head(self, tokens: Tokens) -> Tensor:
        """Norm, mean over the final grid (dropped tokens at their last features), classifier."""
        grid = tokens.data if tokens.grid is None else tokens.on_grid()
        return self.head.fc(self.norm(grid).mean(1))

    def forward_features(self, images: Tensor) -> Tensor:
        """``(B, N_final, C)``: the normalised final grid (timm's ``forward_features``)."""
        tokens = self.embed(images)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens.data)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.embed(images)
        for block in self.blocks:
            tokens = block(tokens)
        return self.forward_head(tokens)

    # -- the Backbone protocol (iared.models.protocol) ------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.cfg.grid_size**2

    @property
    def token_dim(self) -> int:
        return self.cfg.embed_dim[0]

    @property
    def token_grid(self) -> tuple[int, ...]:
        return (self.cfg.grid_size, self.cfg.grid_size)

    def block_input_shape(self, block: int) -> tuple[int, int]:
        """``(tokens, channels)`` entering block ``block`` when nothing was dropped."""
        b = self.blocks[block]
        return b.size**2, b.dim_in

    def block_macs(self, n, block: int):
        return self.blocks[block].macs(n)

    def fixed_macs(self) -> float:
        """Patch embedding and classifier."""
        c = self.cfg
        embed = self.num_tokens * c.embed_dim[0] * c.in_chans * math.prod(c.patch_kernel)
        return float(embed + c.embed_dim[-1] * c.num_classes)

    def default_stage_starts(self, num_stages: int) -> tuple[int, ...]:
        """Where reducers help: before the first stride-1 block of each of the first ``num_stages``
        resolution stages (block 0 for the first stage). A stride-2 block restores the whole grid,
        so a reducer right before one would save nothing."""
        starts, first = [], 0
        for stage in self.stages:
            blocks = list(stage.blocks)
            offset = next((i for i, b in enumerate(blocks) if not b.changes_grid), None)
            if offset is not None:
                starts.append(first + offset)
            first += len(blocks)
        return tuple(starts[:num_stages])

    def patch_pixels(self, images: Tensor, block: int = 0) -> Tensor:
        """``(B, N, C_in * s * s)``: the pixels of each token's cell on the grid entering ``block``
        (the embedding's kernel overlaps its neighbours; the cell is the part that is its own; a
        pooled grid's cell covers the cells it pooled)."""
        s = self.cfg.patch_stride[0] * (self.cfg.grid_size // self.blocks[block].size)
        return F.unfold(images, s, stride=s).transpose(1, 2)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"img_size={c.img_size}, depths={c.depths}, dims={c.embed_dim}, heads={c.num_heads}"


# timm's ImageNet-1k MViTv2 models (``timm.models.mvitv2.model_cfgs``): every other field at its default.
MVIT_CONFIGS: dict[str, dict] = {
    "mvitv2_tiny": dict(depths=(1, 2, 5, 2)),
    "mvitv2_small": dict(depths=(1, 2, 11, 2)),
    "mvitv2_base": dict(depths=(2, 3, 16, 3)),
}


def build_mvit(name: str, config: dict, *, pretrained: bool = False, checkpoint=None, **overrides) -> MultiScaleViT:
    """The MViTv2 ``name`` with ``config`` (``MViTConfig`` fields) and ``overrides``; weights from a local
    ``checkpoint`` file (timm's state dict, safetensors or an iared checkpoint) or timm's download."""
    from iared.checkpoint import extract_state_dict, load_weights, read_checkpoint

    model = MultiScaleViT(MViTConfig(**{**config, **overrides}))
    if checkpoint is not None:
        load_weights(model, extract_state_dict(read_checkpoint(checkpoint), checkpoint), checkpoint)
    elif pretrained:
        import timm

        reference = timm.create_model(name, pretrained=True, num_classes=model.cfg.num_classes)
        load_weights(model, reference.state_dict(), f"timm:{name}")
    return model
