"""ViT / DeiT whose forward pass is ours and whose weights are timm's.

The state-dict keys and shapes are exactly those of ``timm.models.VisionTransformer`` (and of
``VisionTransformerDistilled`` when ``distilled=True``), which are also the official DeiT
checkpoints' keys. That layout is the contract: a checkpoint written by timm or by the DeiT
authors loads here unchanged, and tests compare logits against timm itself.

The variants of timm's ``vision_transformer.py`` that share its block are covered: DeiT-III's
position table without class-token entry (``no_embed_class``), register tokens (``reg_tokens``),
global average pooling with ``fc_norm`` (``global_pool="avg"``), no class token, CLIP-style
pre-norm (``pre_norm``), layer scale (``init_values``), no final norm (``final_norm=False``).
A checkpoint made at another image size loads with its position table resampled as timm
resamples it (:func:`adapt_state_dict`).

Augmented shortcuts (Tang et al., "Augmented Shortcuts for Vision Transformers", NeurIPS 2021;
``aug_shortcuts=N``) are ours: timm has no such layer. Their keys, beside timm's, are
``blocks.{i}.attn_shortcuts.{j}.weight`` / ``.bias`` and ``blocks.{i}.mlp_shortcuts.{j}.weight`` /
``.bias`` (see :class:`AugmentedShortcut`); a model without them has exactly timm's keys.

The forward pass differs from timm's in one way that matters: blocks receive a
:class:`iared.tokens.Tokens` batch rather than a ``(B, N, C)`` tensor, so tokens can leave the
computation between blocks (see :mod:`iared.pruning`), in whatever layout suits the device.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
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
    class_token: bool = True
    reg_tokens: int = 0  # register tokens (prefix tokens after the class token: always kept, never pooled)
    no_embed_class: bool = False  # DeiT-III: the position table covers the patches only
    global_pool: str = "token"  # "token": the class token; "avg": the mean of the alive patch tokens
    fc_norm: bool | None = None  # the final norm after pooling; None: with "avg" pooling (timm's rule)
    pre_norm: bool = False  # LayerNorm on the embeddings (CLIP); the patch projection then has no bias
    final_norm: bool = True
    aug_shortcuts: int = 0  # augmented shortcuts beside each attention and each MLP (Tang et al. 2021)
    aug_circulant_blocks: int = 4  # their projection: a grid of k x k circulant blocks of size embed_dim / k
    # A convolutional stem (timm's hybrid ViTs: ``patch_embed.backbone`` then a 1x1 ``patch_embed.proj``):
    # the widths of its stages, each 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool, so 2 ** len(conv_stem)
    # must be patch_size. Tokens are still one per patch (the stem costs the same whatever is dropped).
    conv_stem: tuple[int, ...] = ()
    # Every LayerNorm's eps: timm's ViT / DeiT 1e-6, its CLIP towers 1e-5, transformers' ViT 1e-12.
    norm_eps: float = 1e-6
    # Distilled models: average the class and distillation heads (DeiT's rule); False: the class head
    # alone (transformers' DeiTForImageClassification), the distillation token still in the blocks.
    dist_head: bool = True
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self):
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier, the pooled features), got {self.num_classes}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool {self.global_pool!r} not supported: 'token' (class token) or 'avg'")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs the class token: use global_pool='avg' with class_token=False")
        if self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.aug_shortcuts < 0:
            raise ValueError(f"aug_shortcuts must be >= 0, got {self.aug_shortcuts}")
        if self.aug_shortcuts and (self.aug_circulant_blocks < 1 or self.embed_dim % self.aug_circulant_blocks):
            raise ValueError(f"aug_circulant_blocks {self.aug_circulant_blocks} must divide embed_dim {self.embed_dim}")
        if self.distilled and (not self.class_token or self.reg_tokens or self.global_pool != "token"
                               or self.use_fc_norm):
            raise ValueError("distilled (DeiT) models read the class and distillation tokens: they need the "
                             "class token, token pooling, no fc_norm and no register tokens")
        self.conv_stem = tuple(int(w) for w in self.conv_stem)
        if self.conv_stem and (2 ** len(self.conv_stem) != self.patch_size or min(self.conv_stem) < 1):
            raise ValueError(f"conv_stem {self.conv_stem}: each stage halves the resolution, so it needs "
                             f"log2(patch_size) = {math.log2(self.patch_size):g} positive widths")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers (in that order)."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_classifier_heads(self) -> int:
        """Classifier heads: the distilled model averages two (unless ``dist_head=False``)."""
        return 2 if self.distilled and self.dist_head else 1

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

    @property
    def pos_embed_tokens(self) -> int:
        """Rows of the position table: the patches, plus the prefix tokens unless ``no_embed_class``."""
        return self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


class ConvPatches(nn.Module):
    """Square images of ``img_size`` -> ``(B, N, C)`` features of a convolution ``proj``, row-major.
    Key: ``patch_embed.proj``. The ViT and MViT embeddings differ only in the convolution."""

    def __init__(self, img_size: int, proj: nn.Conv2d, backbone: nn.Module | None = None):
        super().__init__()
        self.img_size = img_size
        self.backbone = backbone if backbone is not None else nn.Identity()  # hybrid models' conv stem
        self.proj = proj

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} images, got {tuple(images.shape[-2:])}; "
                "resize or create the model with a matching img_size"
            )
        return self.proj(run_stem(self.backbone, images)).flatten(2).transpose(1, 2)


def run_stem(stem: nn.Module, images: Tensor) -> Tensor:
    """A hybrid model's conv stem on ``images`` held channels-last: oneDNN's preferred layout, where on
    2 CPU cores the stem of ``digits_natural_vit`` takes 24 ms instead of 43 (batch 64), the same
    values up to float rounding. The output stays channels-last, so the 1x1 projection's
    ``flatten(2).transpose(1, 2)`` is already ``(B, N, C)``-contiguous.

    In inference (eval mode, no autograd) each conv -> BatchNorm -> ReLU (-> max-pool) stage of
    :func:`conv_stem_stages` runs as one convolution with the BatchNorm folded into its weights, then
    the pool, then the ReLU (the two commute; pooling first leaves a quarter of the ReLU's work): the
    BatchNorm pass over the full-resolution maps is a fixed cost that no token reduction can shrink.
    """
    if isinstance(stem, nn.Identity):
        return images
    x = images.contiguous(memory_format=torch.channels_last)
    tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
    training = any(m.training for m in stem.modules())  # a BatchNorm recalibrating needs its batch statistics
    if training or torch.is_grad_enabled() or tracing or not all(_is_conv_bn_stage(s) for s in stem):
        return stem(x)
    for stage in stem:
        weight, bias = _folded_conv_bn(stage[0], stage[1])
        x = F.conv2d(x, weight, bias, stage[0].stride, stage[0].padding, stage[0].dilation, stage[0].groups)
        if len(stage) == 4:
            x = _max_pool_2x2(x) if _is_plain_2x2_pool(stage[3], x) else stage[3](x)
        x = x.relu_()
    return x


def _is_plain_2x2_pool(pool: nn.MaxPool2d, x: Tensor) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (pair(pool.kernel_size) == (2, 2) and pair(pool.stride or pool.kernel_size) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1) and not pool.return_indices
            and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0)


def _max_pool_2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)`` of a channels-last ``(B, C, H, W)`` map as two element-wise maxima of
    strided views, the same values (NaN included). torch's CPU max-pool also computes the argmax
    indices: on 2 cores the three pools of ``digits_natural_vit``'s stem took 3.4 ms at batch 64
    that way, and 1.5 ms this way."""
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


def _is_conv_bn_stage(stage: nn.Module) -> bool:
    kinds = [type(m) for m in stage] if isinstance(stage, nn.Sequential) else []
    return kinds in ([nn.Conv2d, nn.BatchNorm2d, nn.ReLU], [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]) and (
        stage[0].padding_mode == "zeros" and stage[1].track_running_stats and stage[1].running_var is not None)


# Folded (weight, bias) per convolution, remade whenever any of the tensors it was made from changed:
# an in-place update moves a tensor's version counter (training steps, load_state_dict), a new
# storage has a new address (.to(), .half(), ``param.data = ...``). The entry holds the source
# tensors themselves, so their storage cannot be freed and its address handed to a new tensor.
# Inference tensors have no version counter: folded afresh on every call, never cached.
_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    present = [t for t in sources if t is not None]
    cacheable = not any(t.is_inference() for t in present)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                for t in sources) if cacheable else None
    cached = _FOLDED.get(conv)
    if cacheable and cached is not None and cached[0] == key:
        return cached[2]
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    folded = ((conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last), shift)
    if cacheable:
        _FOLDED[conv] = (key, [t.detach() for t in present], folded)
    return folded


def conv_stem_stages(in_chans: int, widths: tuple[int, ...], pools: int | None = None) -> list[nn.Sequential]:
    """3x3 conv -> BatchNorm -> ReLU (-> 2x2 max-pool for the first ``pools`` stages, default all): the
    stages of a ViT's ``conv_stem`` and of :class:`iared.models.convnet.ConvNet`, with the same keys
    (``{i}.0`` conv, ``{i}.1`` BatchNorm), so a teacher's first stages load into a student's stem."""
    pools = len(widths) if pools is None else pools
    stages, prev = [], in_chans
    for i, width in enumerate(widths):
        layers = [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if i < pools:
            layers.append(nn.MaxPool2d(2))
        stages.append(nn.Sequential(*layers))
        prev = width
    return stages


def stem_widths(state_dict: Mapping[str, Tensor], prefix: str = "patch_embed.backbone.") -> tuple[int, ...]:
    """The stage widths of the conv stem whose weights sit under ``prefix`` (``{i}.0.weight`` is stage
    i's 3x3 convolution; see :func:`conv_stem_stages`); ``()`` for a model without one."""
    widths = {}
    for key, value in state_dict.items():
        rest = key[len(prefix):] if key.startswith(prefix) else ""
        parts = rest.split(".")
        if len(parts) == 3 and parts[0].isdigit() and parts[1:] == ["0", "weight"] and value.dim() == 4:
            widths[int(parts[0])] = int(value.shape[0])
    return tuple(widths[i] for i in range(len(widths))) if sorted(widths) == list(range(len(widths))) else ()


class PatchEmbed(ConvPatches):
    """Non-overlapping ``patch_size`` patches: one ``patch_size`` convolution, or with ``conv_stem`` the
    stem's stages (``patch_embed.backbone``) and a 1x1 projection, as timm's ``HybridEmbed``."""

    def __init__(self, cfg: ViTConfig):
        # timm drops the projection's bias under pre-norm (the LayerNorm that follows has one).
        if cfg.conv_stem:
            super().__init__(cfg.img_size, nn.Conv2d(cfg.conv_stem[-1], cfg.embed_dim, 1, bias=not cfg.pre_norm),
                             nn.Sequential(*conv_stem_stages(cfg.in_chans, cfg.conv_stem)))
            return
        super().__init__(cfg.img_size, nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size,
                                                 stride=cfg.patch_size, bias=not cfg.pre_norm))


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
    (what EViT and ATS rank by); in a model without class token, the attention of the mean of the
    alive patch tokens' queries (:meth:`iared.tokens.Tokens.summary`). ``keys``: token-aligned
    ``(..., C)`` keys, heads concatenated (ToMe's similarity metric). ``values_norm``: token-aligned ``||v_j||`` mean over heads (ATS).
    """

    def __init__(self):
        self.cls_attention: Tensor | None = None
        self.keys: Tensor | None = None
        self.values_norm: Tensor | None = None

    def fill(self, tokens: Tokens, q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
        # Without a class token, the query of the average patch token (Tokens.summary) asks instead.
        q_cls = tokens.per_token(tokens.summary(q))
        logits = (q_cls * k).sum(-1) * k.shape[-1] ** -0.5  # (..., H)
        if tokens.weights is not None:  # proportional attention: what the block really computes
            logits = logits + tokens.weights.clamp_min(1e-30).log()[..., None]
        self.cls_attention = tokens.softmax_per_image(logits).mean(-1).detach()
        self.keys = k.flatten(-2).detach()
        if v is not None:
            self.values_norm = v.norm(dim=-1).mean(-1).detach()


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's keys); ``dim_out`` defaults to ``dim`` (MViT widens at stage starts)."""

    def __init__(self, dim: int, hidden: int, dim_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim if dim_out is None else dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))  # timm key: ls1.gamma / ls2.gamma

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def block_circulant_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ W.T`` for the block-circulant ``W`` that ``weight`` describes, through the FFT.

    ``x``: ``(..., k * b)``; ``weight``: ``(k_out, k_in, b)``, the first column of every ``b x b``
    circulant block: ``W[I*b + r, J*b + c] = weight[I, J, (r - c) mod b]``. Block (I, J) times a
    piece of ``x`` is a circular convolution, a product of spectra: ``y_I = irfft(sum_J rfft(w_IJ)
    rfft(x_J))``, O(k^2 b + k b log b) per token instead of the dense O(k^2 b^2).
    Half precision inputs are computed in float32 (FFTs in half precision need power-of-two lengths).
    """
    _, k_in, b = weight.shape
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    spectrum_x = torch.fft.rfft(x.to(dtype).unflatten(-1, (k_in, b)), dim=-1)  # (..., k_in, b // 2 + 1)
    spectrum_w = torch.fft.rfft(weight.to(dtype), dim=-1)  # (k_out, k_in, b // 2 + 1)
    spectrum_y = torch.einsum("...jf,ijf->...if", spectrum_x, spectrum_w)
    return torch.fft.irfft(spectrum_y, n=b, dim=-1).flatten(-2).to(x.dtype)


def block_circulant_dense(weight: Tensor) -> Tensor:
    """The ``(k_out * b, k_in * b)`` matrix that ``weight`` ``(k_out, k_in, b)`` describes (see
    :func:`block_circulant_matmul`): for checks, for readers, and for graph export (ONNX has no
    real-FFT pair that the exporter maps), never for the eager forward pass."""
    k_out, k_in, b = weight.shape
    r = torch.arange(b, device=weight.device)
    offsets = (r[:, None] - r[None, :]) % b  # (b, b): which entry of the first column sits at (r, c)
    blocks = weight[:, :, offsets]  # (k_out, k_in, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(k_out * b, k_in * b)


class AugmentedShortcut(nn.Module):
    """One augmented shortcut ``T(x) = GELU(x W^T + bias)`` with a block-circulant ``W``.

    Tang et al. (NeurIPS 2021, Eq. 6 and Sec. 3.3): ``T(Z) = sigma(Z Theta)`` with sigma a
    non-linearity (GELU), ``Theta`` block-circulant so that it costs O(d log b) per token through the
    FFT. Keys: ``weight`` ``(k, k, d / k)`` (the first column of each circulant block, see
    :func:`block_circulant_matmul`), ``bias`` ``(d,)``. It reads one token at a time, so it runs on
    any token layout.
    """

    def __init__(self, dim: int, blocks: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(blocks, blocks, dim // blocks))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            # The exporters cannot lower rfft / irfft to ONNX: the same product as one dense matmul.
            y = x @ block_circulant_dense(self.weight).to(x.dtype).T
        else:
            y = block_circulant_matmul(x, self.weight)
        return nn.functional.gelu(y + self.bias.to(x.dtype))


class Block(nn.Module):
    """Pre-norm transformer block on any token layout.

    With augmented shortcuts (``cfg.aug_shortcuts = N``) each module gets N parallel paths beside
    the identity: ``x + ls(attn(LN1 x)) + sum_i T_i(LN1 x)``, the same for the MLP. The shortcuts
    read the module's LayerNorm output, as the authors' code does (the paper's equations leave
    LayerNorm out), and sit outside layer scale.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        # Empty lists without shortcuts: no keys, timm's state dict exactly.
        self.attn_shortcuts = nn.ModuleList(AugmentedShortcut(dim, cfg.aug_circulant_blocks)
                                            for _ in range(cfg.aug_shortcuts))
        self.mlp_shortcuts = nn.ModuleList(AugmentedShortcut(dim, cfg.aug_circulant_blocks)
                                           for _ in range(cfg.aug_shortcuts))

    def forward(self, tokens: Tokens, weights_out: list | None = None, record: BlockRecord | None = None) -> Tokens:
        x = tokens.data
        h = self.norm1(x)
        x = x + self.ls1(self.attn(h, tokens, weights_out, record))
        for shortcut in self.attn_shortcuts:
            x = x + shortcut(h)
        h = self.norm2(x)
        x = x + self.ls2(self.mlp(h))
        for shortcut in self.mlp_shortcuts:
            x = x + shortcut(h)
        return tokens.with_data(x)


class VisionTransformer(nn.Module):
    """ViT / DeiT / DeiT-III, timm's state-dict layout.

    ``forward(images) -> logits (B, num_classes)``; with ``num_classes=0`` (no classifier, as timm's
    headless models) the pooled features ``(B, embed_dim)``. The pieces, for models that prune between
    blocks: :meth:`embed` (pixels -> dense tokens), ``blocks`` (each maps Tokens -> Tokens),
    :meth:`forward_head` (pooling, final norm -> logits). It implements the
    :class:`iared.models.protocol.Backbone` protocol that the stage loop runs on.

    Prefix tokens (class, distillation, registers) are never removed by any reducer. With
    ``global_pool="avg"`` the head reads the mean of the patch tokens still alive.
    """

    def __init__(self, cfg: ViTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ViTConfig(**overrides)
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_tokens, dim))
        eps = cfg.norm_eps
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # timm's rule: one final LayerNorm, per token before pooling (norm) or on the pooled vector (fc_norm).
        self.norm = nn.LayerNorm(dim, eps=eps) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        # num_classes=0: no classifier (timm's headless models, nn.Identity): forward returns the pooled features.
        def classifier():
            return nn.Linear(dim, cfg.num_classes) if cfg.num_classes else nn.Identity()

        self.head = classifier()
        self.head_dist = classifier() if cfg.distilled and cfg.dist_head else None
        self._init_weights()

    def _init_weights(self):
        # timm's defaults: trunc-normal(0.02) for tokens and linears, zeros for biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, AugmentedShortcut)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        w = self.patch_embed.proj.weight
        nn.init.uniform_(w, -1 / math.sqrt(w[0].numel()), 1 / math.sqrt(w[0].numel()))

    # -- the data path ------------------------------------------------------------------------

    def embed(self, images: Tensor) -> DenseTokens:
        """``(B, C_in, H, W)`` -> dense tokens ``(B, P + N, C)``: prefix tokens (class, distillation,
        registers, those present), then the patches row-major."""
        x = self.patch_embed(images)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.cfg.no_embed_class:
            # DeiT-III: positions for the patches only, added before the prefix tokens join.
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        return DenseTokens.from_embeddings(x, self.num_prefix_tokens, has_class_token=self.cfg.class_token)

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

    def block_macs(self, n, block: int | None = None):
        """MACs of a block on ``n`` tokens (int or ``(B,)`` tensor); every block costs the same."""
        from iared import flops

        return flops.vit_block_macs(n, self.cfg)

    def block_input_shape(self, block: int) -> tuple[int, int]:
        """``(tokens, channels)`` entering any block when nothing was dropped (prefix included)."""
        return self.num_tokens, self.cfg.embed_dim

    def fixed_macs(self) -> float:
        """MACs that do not depend on the token count: patch embedding and head."""
        from iared import flops

        return float(flops.embed_macs(self.cfg) + flops.head_macs(self.cfg))

    def patch_pixels(self, images: Tensor, block: int = 0) -> Tensor:
        """``(B, N, C_in * p * p)``: the pixels under every patch token, in token order (one grid for
        every block)."""
        p = self.cfg.patch_size
        return torch.nn.functional.unfold(images, p, stride=p).transpose(1, 2)

    def forward_head(self, tokens: Tokens) -> Tensor:
        """Pooling, final norm and the classifier(s).

        ``token`` pooling reads the class token (and the distillation token); ``avg`` the mean of
        each image's alive patch tokens (:meth:`iared.tokens.Tokens.patch_mean`; merged tokens
        weigh their sizes), in whatever layout the tokens arrive. ``norm`` is per token, so it
        runs on the rows that are read (or on every row before averaging).
        """
        if self.cfg.global_pool == "avg":
            return self.head(self.fc_norm(tokens.patch_mean(self.norm(tokens.data))))
        prefix = self.norm(tokens.prefix())
        logits = self.head(self.fc_norm(prefix[:, 0]))
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
        """``(B, P + N, C)`` features of every token after the final per-token norm (timm's
        ``forward_features``; with ``fc_norm`` that norm comes after pooling, so none here)."""
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
                f"heads={c.num_heads}, distilled={c.distilled}, class_token={c.class_token}, "
                f"reg_tokens={c.reg_tokens}, global_pool={c.global_pool}")


# -- weights from files made for another layout version or image size --------------------------------

def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int,
                       old_grid: tuple[int, int] | None = None) -> Tensor:
    """``(1, P + h*w, C)`` -> ``(1, P + H*W, C)`` for a new patch grid ``(H, W)``.

    The ``num_prefix`` leading rows (prefix tokens' positions) stay as they are; the patch rows
    are treated as an ``h x w`` image with C channels and resized bicubically with antialiasing,
    in float32 -- the rule timm applies when a checkpoint is loaded at another image size, so both
    libraries build the same model from the same file. ``old_grid`` defaults to a square.
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if old_grid is None:
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(f"pos_embed holds {patches.shape[1]} patch positions, not a square grid; give old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(grid):
        return pos_embed
    dim = patches.shape[-1]
    image = patches.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    image = torch.nn.functional.interpolate(image, size=tuple(grid), mode="bicubic", antialias=True,
                                            align_corners=False)
    patches = image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def rename_official_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official DeiT-III release names layer scale ``blocks.N.gamma_1`` / ``gamma_2``; timm
    (and we) ``blocks.N.ls1.gamma`` / ``ls2.gamma``. Other keys pass through."""
    out = {}
    for key, value in state_dict.items():
        head, _, last = key.rpartition(".")
        if key.startswith("blocks.") and last in ("gamma_1", "gamma_2"):
            key = f"{head}.ls{last[-1]}.gamma"
        out[key] = value
    return out


def adapt_state_dict(state_dict: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """A timm-layout state dict made fit for a model of ``cfg``: official DeiT-III key names
    (:func:`rename_official_keys`), and a position table made for another square patch grid
    resampled to ``cfg``'s (:func:`resample_pos_embed`). Anything else that does not fit is left for
    :func:`iared.checkpoint.load_weights` to report."""
    state_dict = rename_official_keys(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape[1] != cfg.pos_embed_tokens:
        embedded_prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        old = pos.shape[1] - embedded_prefix
        side = math.isqrt(max(old, 0))
        if old > 0 and side * side == old:
            state_dict = {**state_dict, "pos_embed": resample_pos_embed(pos, (cfg.grid_size, cfg.grid_size),
                                                                        embedded_prefix, (side, side))}
    return state_dict
