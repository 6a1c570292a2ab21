"""ViT / DeiT whose forward pass is ours and whose weights are timm's.

The state-dict keys and shapes are exactly those of ``timm.models.VisionTransformer`` (and of
``VisionTransformerDistilled`` when ``distilled=True``), which are also the official DeiT
checkpoints' keys. That layout is the contract: a checkpoint written by timm or by the DeiT
authors loads here unchanged, and tests compare logits against timm itself.

The forward pass differs from timm's in one way that matters: blocks receive a
:class:`iared.tokens.Tokens` batch rather than a ``(B, N, C)`` tensor, so tokens can leave the
computation between blocks (see :mod:`iared.pruning`), in whatever layout suits the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from iared.tokens import DenseTokens, Tokens

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN; repeated so models import without timm
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViTConfig:
    """Geometry of a ViT. ``mean`` / ``std`` describe the input the weights expect (like timm's
    ``pretrained_cfg``); the model itself does not normalise."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False
    init_values: float | None = None  # layer scale; None = no layer scale (timm's default)
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    """Image ``(B, C_in, H, W)`` -> patch features ``(B, N, C)``, row-major. Key: ``patch_embed.proj``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} images, got {tuple(images.shape[-2:])}; "
                "resize or create the model with a matching img_size"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the layout decides how attention stays within each image."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, tokens: Tokens, weights_out: list | None = None,
                record: BlockRecord | None = None) -> Tensor:
        """x: token-aligned ``(..., C)``. ``weights_out``: see :meth:`Tokens.attend`.
        ``record``: filled with what token reducers read from this block (class attention, keys)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        if record is not None:
            record.fill(tokens, q, k, v)
        out = tokens.attend(q, k, v, weights_out)
        return self.proj(out.flatten(-2))


class BlockRecord:
    """What a block exposes to the token reducer of the next stage (filled only when asked).

    ``cls_attention``: token-aligned, the class token's attention to every token, mean over heads
    (what EViT and ATS rank by). ``keys``: token-aligned ``(..., C)`` keys, heads concatenated
    (ToMe's similarity metric). ``values_norm``: token-aligned ``||v_j||`` mean over heads (ATS).
    """

    def __init__(self):
        self.cls_attention: Tensor | None = None
        self.keys: Tensor | None = None
        self.values_norm: Tensor | None = None

    def fill(self, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
        q_cls = tokens.per_token(_prefix_query(tokens, q))
        logits = (q_cls * k).sum(-1) * k.shape[-1] ** -0.5  # (..., H)
        if tokens.weights is not None:  # proportional attention: what the block really computes
            logits = logits + tokens.weights.clamp_min(1e-30).log()[..., None]
        self.cls_attention = tokens.softmax_per_image(logits).mean(-1).detach()
        self.keys = k.flatten(-2).detach()
        if v is not None:
            self.values_norm = v.norm(dim=-1).mean(-1).detach()


def _prefix_query(tokens: Tokens, q: Tensor) -> Tensor:
    """``(B, H, D)``: the class token's query of every image (q is token-aligned ``(..., H, D)``)."""
    B = tokens.batch_size
    flat = q.reshape(-1, *q.shape[-2:])
    return flat[tokens.start_rows()] if B else flat[:0]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))  # timm key: ls1.gamma / ls2.gamma

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block on any token layout."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, tokens: Tokens, weights_out: list | None = None, record: BlockRecord | None = None) -> Tokens:
        x = tokens.data
        x = x + self.ls1(self.attn(self.norm1(x), tokens, weights_out, record))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return tokens.with_data(x)


class VisionTransformer(nn.Module):
    """ViT / DeiT with class token (and optional distillation token), timm's state-dict layout.

    ``forward(images) -> logits (B, num_classes)``. The pieces, for models that prune between
    blocks: :meth:`embed` (pixels -> dense tokens), ``blocks`` (each maps Tokens -> Tokens),
    :meth:`forward_head` (final norm on the prefix tokens -> logits). It implements the
    :class:`iared.models.protocol.Backbone` protocol that the stage loop runs on.
    """

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ViTConfig(**overrides)
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + cfg.num_prefix_tokens, dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.head_dist = nn.Linear(dim, cfg.num_classes) if cfg.distilled else None
        self._init_weights()

    def _init_weights(self):
        # timm's defaults: trunc-normal(0.02) for tokens and linears, zeros for biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        w = self.patch_embed.proj.weight
        nn.init.uniform_(w, -1 / math.sqrt(w[0].numel()), 1 / math.sqrt(w[0].numel()))

    # -- the data path ------------------------------------------------------------------------

    def embed(self, images: Tensor) -> DenseTokens:
        """``(B, C_in, H, W)`` -> dense tokens ``(B, P + N, C)``: prefix tokens, then patches."""
        x = self.patch_embed(images)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return DenseTokens.from_embeddings(x, self.num_prefix_tokens)

    # -- the Backbone protocol (iared.models.protocol) ------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens per image after :meth:`embed`, prefix included."""
        return self.cfg.num_patches + self.cfg.num_prefix_tokens

    @property
    def token_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def token_grid(self) -> tuple[int, ...]:
        """Layout of the patch tokens: ``(rows, cols)``, row-major after the prefix tokens."""
        return (self.cfg.grid_size, self.cfg.grid_size)

    def block_macs(self, n):
        """MACs of one block on ``n`` tokens (int or ``(B,)`` tensor)."""
        from iared import flops

        return flops.block_macs(n, self.cfg.embed_dim, self.cfg.mlp_ratio)

    def fixed_macs(self) -> float:
        """MACs that do not depend on the token count: patch embedding and head."""
        from iared import flops

        return float(flops.embed_macs(self.cfg) + flops.head_macs(self.cfg))

    def patch_pixels(self, images: Tensor) -> Tensor:
        """``(B, N, C_in * p * p)``: the pixels under every patch token, in token order."""
        p = self.cfg.patch_size
        return torch.nn.functional.unfold(images, p, stride=p).transpose(1, 2)

    def forward_head(self, tokens: Tokens) -> Tensor:
        """Final norm on the prefix tokens (LayerNorm is per token) and the classifier(s)."""
        prefix = self.norm(tokens.prefix())
        logits = self.head(prefix[:, 0])
        if self.head_dist is not None:
            # DeiT's inference rule: average the class and distillation heads.
            logits = (logits + self.head_dist(prefix[:, 1])) / 2
        return logits

    def forward(self, images: Tensor, attention_out: list | None = None, keep: Tensor | None = None) -> Tensor:
        """``(B, C_in, H, W)`` -> logits ``(B, num_classes)``.

        ``attention_out``: pass a list to run the explicit-attention path and receive one
        ``(B, heads, N, N)`` probability tensor per block (for explainers; the default path
        uses fused SDPA and materialises nothing).
        ``keep``: ``(B, N)`` bool over the patch tokens (prefix excluded): run the blocks on
        those patches only (images may keep different counts: the batch is padded + masked).
        Training with random ``keep`` makes a backbone that tolerates dropped tokens.
        """
        tokens = self.embed(images)
        if keep is not None:
            prefix = torch.ones(keep.shape[0], self.num_prefix_tokens, dtype=torch.bool, device=keep.device)
            tokens = tokens.select(torch.cat([prefix, keep], dim=1), ragged="padded")
        for block in self.blocks:
            tokens = block(tokens, attention_out)
        return self.forward_head(tokens)

    def forward_features(self, images: Tensor) -> Tensor:
        """``(B, P + N, C)`` normalised features of every token (timm's ``forward_features``)."""
        tokens = self.embed(images)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens.data)

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"img_size={c.img_size}, patch={c.patch_size}, dim={c.embed_dim}, depth={c.depth}, "
                f"heads={c.num_heads}, distilled={c.distilled}")
