"""DPT (Ranftl et al., "Vision Transformers for Dense Prediction", ICCV 2021) for token-pruned ViTs.

DPT reads the tokens of four blocks, turns each set into an image-like feature map and fuses the
maps coarse to fine into one dense prediction::

    features[i]  (B, P + N, C)       after block depths[i]; with pruning: every token restored
      reassemble: read out the class token ("project": concat it to every patch, Linear + GELU),
                  the patches to a (C, h, w) map, 1x1 conv to neck_hidden_sizes[i], resample by
                  reassemble_factors[i] (transposed conv up, strided 3x3 conv down)
      convs:      3x3 conv to fusion_hidden_size
    fusion: coarsest map first; each step adds the next finer map through a pre-activation
            residual unit, refines (a second unit), upsamples x2 (bilinear) and projects (1x1)
    head:   3x3 conv + BatchNorm + ReLU + dropout + 1x1 conv to classes, bilinear x ``upsample``
    (optional, not DPT: ``pixel_refinement``, two 3x3 convs on [logits, input pixels] at the input size)

A token dropped by a reducer has no features after it left, but every pixel needs an answer. The
stage loop restores it (``ReducedModel.forward(features_at=...)``, :meth:`iared.tokens.Tokens.keeping_grid`):
at every depth the head reads, alive tokens bring their current features and a dropped token the
features it had in the last block it was alive in. The head always runs on the full grid, so its
cost does not change with pruning.

Parameter layout: the neck and head are named as Hugging Face ``transformers``'
``DPTForSemanticSegmentation`` names them (``neck.reassemble_stage.*``, ``neck.convs.*``,
``neck.fusion_stage.*``, ``head.head.*``); :func:`from_hf_dpt` maps that model's state dict onto
a timm-layout ViT and this head (tests compare the logits of both models). The auxiliary head,
which only adds a training loss, is not part of this head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DPTConfig", "DPTHead", "PixelRefinement", "default_depths", "from_hf_dpt", "head_macs"]

READOUTS = ("project", "add", "ignore")


def default_depths(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced blocks ending with the last (DPT's ViT-B/16 choice for 12: 2, 5, 8, 11)."""
    if depth < count:
        raise ValueError(f"a DPT head reads {count} blocks but the backbone has {depth}")
    return tuple((i + 1) * depth // count - 1 for i in range(count))


@dataclass
class DPTConfig:
    """Geometry of a DPT head; saved with every dense checkpoint. Defaults are DPT's (and
    ``transformers``' ``DPTConfig``), except ``depths``: None reads :func:`default_depths`."""

    num_classes: int = 150
    depths: tuple[int, ...] | None = None  # backbone blocks read, one per reassemble scale
    neck_hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    fusion_hidden_size: int = 256
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    readout: str = "project"  # how the class token reaches the patches: project | add | ignore
    batch_norm_in_fusion: bool = False  # transformers' use_batch_norm_in_fusion_residual
    upsample: int = 2  # final bilinear upsampling of the logits
    dropout: float = 0.1
    # Not part of DPT (0: off, transformers' layout): channels of a two-conv residual refinement of
    # the logits at the input resolution that also sees the input pixels (see PixelRefinement).
    pixel_refinement: int = 0
    in_chans: int = 3  # input channels the refinement reads

    def __post_init__(self):
        self.neck_hidden_sizes = tuple(int(c) for c in self.neck_hidden_sizes)
        self.reassemble_factors = tuple(float(f) for f in self.reassemble_factors)
        if self.depths is not None:
            self.depths = tuple(int(d) for d in self.depths)
            if len(self.depths) != len(self.neck_hidden_sizes) or list(self.depths) != sorted(set(self.depths)):
                raise ValueError(f"depths must be {len(self.neck_hidden_sizes)} increasing block indices, "
                                 f"got {self.depths}")
        if len(self.reassemble_factors) != len(self.neck_hidden_sizes):
            raise ValueError("one reassemble factor per neck hidden size")
        for f in self.reassemble_factors:
            if not (f >= 1 and f == int(f)) and not (f < 1 and (1 / f) == int(1 / f)):
                raise ValueError(f"reassemble factors are integers >= 1 or 1 / integer, got {f}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")

    def resolved_depths(self, backbone_depth: int) -> tuple[int, ...]:
        depths = self.depths or default_depths(backbone_depth, len(self.neck_hidden_sizes))
        if depths[-1] >= backbone_depth:
            raise ValueError(f"DPT reads block {depths[-1]} but the backbone has {backbone_depth} blocks")
        return depths

    def to_dict(self) -> dict:
        return asdict(self)


class ReassembleLayer(nn.Module):
    """``(B, C, h, w)`` -> ``(B, channels, h * factor, w * factor)``."""

    def __init__(self, dim: int, channels: int, factor: float):
        super().__init__()
        self.projection = nn.Conv2d(dim, channels, kernel_size=1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
        elif factor == 1:
            self.resize = nn.Identity()
        else:
            self.resize = nn.Conv2d(channels, channels, kernel_size=3, stride=round(1 / factor), padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.resize(self.projection(x))


class Reassemble(nn.Module):
    """Token sets of the read blocks -> one feature map per scale (transformers: ``reassemble_stage``)."""

    def __init__(self, dim: int, cfg: DPTConfig):
        super().__init__()
        self.readout = cfg.readout
        self.layers = nn.ModuleList(ReassembleLayer(dim, c, f) for c, f in
                                    zip(cfg.neck_hidden_sizes, cfg.reassemble_factors))
        if cfg.readout == "project":
            self.readout_projects = nn.ModuleList(nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())
                                                  for _ in cfg.neck_hidden_sizes)

    def forward(self, features: Sequence[Tensor], grid: tuple[int, int], num_prefix: int) -> list[Tensor]:
        """features: ``(B, P + h*w, C)`` each, prefix first (the first is the class token that reads out)."""
        h, w = grid
        maps = []
        for i, x in enumerate(features):
            readout, patches = x[:, 0:1], x[:, num_prefix:]
            if self.readout == "project":
                patches = self.readout_projects[i](torch.cat([patches, readout.expand_as(patches)], dim=-1))
            elif self.readout == "add":
                patches = patches + readout
            maps.append(self.layers[i](patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)))
        return maps


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x)))) (transformers' ``DPTPreActResidualLayer``)."""

    def __init__(self, channels: int, batch_norm: bool):
        super().__init__()
        self.convolution1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.convolution2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.batch_norm1 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.batch_norm2 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.batch_norm1(self.convolution1(F.relu(x)))
        y = self.batch_norm2(self.convolution2(F.relu(y)))
        return x + y


class FusionBlock(nn.Module):
    """RefineNet-style fusion: add the finer map through a residual unit, refine, upsample x2, project."""

    def __init__(self, channels: int, batch_norm: bool):
        super().__init__()
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)
        self.residual_layer1 = ResidualUnit(channels, batch_norm)  # unused by the first (coarsest) block
        self.residual_layer2 = ResidualUnit(channels, batch_norm)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            if skip.shape[-2:] != x.shape[-2:]:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.residual_layer1(skip)
        x = self.residual_layer2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.projection(x)


class Fusion(nn.Module):
    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(FusionBlock(cfg.fusion_hidden_size, cfg.batch_norm_in_fusion)
                                    for _ in cfg.neck_hidden_sizes)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Fine-to-coarse ``maps`` -> the finest fused map."""
        fused = None
        for layer, x in zip(self.layers, reversed(maps)):
            fused = layer(x) if fused is None else layer(fused, x)
        return fused


class Neck(nn.Module):
    def __init__(self, dim: int, cfg: DPTConfig):
        super().__init__()
        self.reassemble_stage = Reassemble(dim, cfg)
        self.convs = nn.ModuleList(nn.Conv2d(c, cfg.fusion_hidden_size, 3, padding=1, bias=False)
                                   for c in cfg.neck_hidden_sizes)
        self.fusion_stage = Fusion(cfg)

    def forward(self, features: Sequence[Tensor], grid: tuple[int, int], num_prefix: int) -> Tensor:
        maps = self.reassemble_stage(features, grid, num_prefix)
        return self.fusion_stage([conv(m) for conv, m in zip(self.convs, maps)])


class SegmentationHead(nn.Module):
    def __init__(self, cfg: DPTConfig):
        super().__init__()
        c = cfg.fusion_hidden_size
        self.head = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Conv2d(c, cfg.num_classes, kernel_size=1),
            nn.Upsample(scale_factor=cfg.upsample, mode="bilinear", align_corners=True) if cfg.upsample != 1
            else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class PixelRefinement(nn.Module):
    """``logits + conv(relu(conv([logits, pixels])))`` at the input resolution (our addition to DPT).

    Tokens describe 8x8 or 16x16 patches; DPT decodes pixel detail from their features alone. Where
    the target follows the image's own edges (a digit's ink), two small 3x3 convolutions that see
    the pixels next to the upsampled logits place the boundary at pixel precision for a few
    MACs per pixel, far less than running the fusion at full resolution.
    """

    def __init__(self, num_classes: int, in_chans: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes + in_chans, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, num_classes, 3, padding=1)

    def forward(self, logits: Tensor, images: Tensor) -> Tensor:
        return logits + self.conv2(F.relu(self.conv1(torch.cat([logits, images.to(logits.dtype)], dim=1))))


class DPTHead(nn.Module):
    """Neck + segmentation head on the token features of ``cfg.depths`` blocks of a ViT of width ``dim``.

    ``forward(features, grid, num_prefix)``: ``features`` ``(B, P + h*w, C)`` per read block (every
    token, prefix first); returns logits ``(B, classes, H', W')``, ``H' = h * f_0 * 2**4 / 2 * upsample``
    with ``f_0`` the first reassemble factor (DPT's defaults at patch 16: the input size).
    """

    def __init__(self, dim: int, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        self.neck = Neck(dim, cfg)
        self.head = SegmentationHead(cfg)
        self.refine = PixelRefinement(cfg.num_classes, cfg.in_chans, cfg.pixel_refinement) \
            if cfg.pixel_refinement else None

    def forward(self, features: Sequence[Tensor], grid: tuple[int, int], num_prefix: int,
                images: Tensor | None = None) -> Tensor:
        """``images`` ``(B, C_in, H, W)``: with them the logits come at their size (bilinear), refined by
        :class:`PixelRefinement` when the config has one."""
        logits = self.head(self.neck(features, grid, num_prefix))
        if images is None:
            return logits
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits if self.refine is None else self.refine(logits, images)


def head_macs(head: DPTHead, dim: int, grid: tuple[int, int], num_prefix: int = 1,
              image_size: int | None = None) -> int:
    """Multiply-accumulates of one image through ``head`` (convolutions, transposed convolutions and
    linear layers, the convention of :mod:`iared.flops`), counted on a probe input's real shapes
    (``image_size``: with the pixel refinement at that input size)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.ConvTranspose2d):  # every input pixel meets every weight once
            total += inputs[0].numel() * module.weight[0].numel()
        elif isinstance(module, nn.Conv2d):
            total += output.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in head.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    was_training = head.training
    try:
        head.eval()
        p = next(head.parameters())
        probe = torch.zeros(1, num_prefix + grid[0] * grid[1], dim, dtype=p.dtype, device=p.device)
        images = None
        if image_size is not None:
            images = torch.zeros(1, head.cfg.in_chans, image_size, image_size, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            head([probe] * len(head.cfg.neck_hidden_sizes), grid, num_prefix, images)
    finally:
        for h in hooks:
            h.remove()
        head.train(was_training)
    return int(total)


# -- Hugging Face transformers' DPTForSemanticSegmentation ------------------------------------------

_HF_LAYER = {  # transformers' ViT layer -> timm's block (q, k, v are concatenated into qkv)
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


def from_hf_dpt(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``transformers``' ``DPTForSemanticSegmentation`` (ViT backbone, not hybrid) state dict ->
    ``(vit, head)``: timm-layout ViT weights (no classifier: DPT has none; ``norm`` is DPT's final
    layernorm, which segmentation does not read) and :class:`DPTHead` weights. The auxiliary head
    is left out. Unknown keys raise, so a layout change in ``transformers`` cannot pass silently."""
    vit: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    embeddings = {"dpt.embeddings.cls_token": "cls_token", "dpt.embeddings.position_embeddings": "pos_embed",
                  "dpt.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                  "dpt.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                  "dpt.layernorm.weight": "norm.weight", "dpt.layernorm.bias": "norm.bias"}
    for key, value in state_dict.items():
        if key in embeddings:
            vit[embeddings[key]] = value
        elif key.startswith("dpt.encoder.layer."):
            block, rest = key.removeprefix("dpt.encoder.layer.").split(".", 1)
            name, _, kind = rest.rpartition(".")
            if name.startswith("attention.attention."):
                qkv.setdefault((int(block), kind), {})[name.rsplit(".", 1)[-1]] = value
            elif name in _HF_LAYER:
                vit[f"blocks.{block}.{_HF_LAYER[name]}.{kind}"] = value
            else:
                raise ValueError(f"from_hf_dpt: unknown transformers key {key}")
        elif key.startswith(("neck.", "head.")):
            head[key] = value
        elif key.startswith("auxiliary_head."):
            continue
        else:
            raise ValueError(f"from_hf_dpt: unknown transformers key {key}")
    for (block, kind), parts in qkv.items():
        vit[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return vit, head
