"""Backbones and how to build them: by name, from timm, from local checkpoints.

Names follow timm (``deit_small_patch16_224`` ...). Weights come from timm's own download
(``pretrained=True``, where a network allows it), from a local file in the official DeiT
layout, a plain state dict, safetensors, or an iared training checkpoint.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from torch import nn

from iared.checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint
from iared.models.vit import Block, VisionTransformer, ViTConfig

__all__ = [
    "EMBEDDED_CHECKPOINT",
    "MODEL_CONFIGS",
    "Block",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "from_timm",
    "list_models",
    "load_model",
]

# The embedded task's backbone: 64x64 single-channel canvases, 8x8 patches (64 patch tokens).
# Width 144 keeps the shipped float16 weights near 3 MB; 6 blocks = 3 stages of 2.
DIGITS_VIT = dict(img_size=64, patch_size=8, in_chans=1, num_classes=10, embed_dim=144, depth=6,
                  num_heads=4, mean=(0.0,), std=(1.0,))

MODEL_CONFIGS: dict[str, dict] = {
    "deit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "deit_tiny_distilled_patch16_224": dict(embed_dim=192, depth=12, num_heads=3, distilled=True),
    "deit_small_distilled_patch16_224": dict(embed_dim=384, depth=12, num_heads=6, distilled=True),
    "deit_base_distilled_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, distilled=True),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "digits_vit": DIGITS_VIT,
    # digits-natural (iared.data.natural): digits_vit's geometry on 64x64 RGB in [0, 1] (float16 ~3 MB).
    "digits_natural_vit": {**DIGITS_VIT, "in_chans": 3, "mean": (0.0,) * 3, "std": (1.0,) * 3},
}

# A backbone for the embedded task that this project trained itself (the commands that reproduce it: src/iared/train/backbone.py's docstring).
EMBEDDED_CHECKPOINT = "digits_vit.safetensors"


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                 **overrides) -> VisionTransformer:
    """Build a backbone by name; ``overrides`` change any :class:`ViTConfig` field.

    ``pretrained=True``: timm's weights through timm's download (network needed), or for
    ``digits_vit`` the checkpoint shipped with the package. ``checkpoint``: a local file.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    model = VisionTransformer(ViTConfig(**{**MODEL_CONFIGS[name], **overrides}))
    if checkpoint is not None:
        load_weights(model, extract_state_dict(read_checkpoint(checkpoint), checkpoint), checkpoint)
    elif pretrained and name == "digits_vit":
        path = embedded_checkpoint_path()
        load_weights(model, extract_state_dict(read_checkpoint(path), path), path)
    elif pretrained:
        import timm

        reference = timm.create_model(name, pretrained=True, num_classes=model.cfg.num_classes)
        load_weights(model, reference.state_dict(), f"timm:{name}")
    return model


def embedded_checkpoint_path() -> Path:
    path = Path(str(resources.files("iared") / "assets" / EMBEDDED_CHECKPOINT))
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded backbone checkpoint missing at {path}; train one with `iared train --task digits-clutter`"
        )
    return path


def from_timm(model_or_name: nn.Module | str, pretrained: bool = False) -> VisionTransformer:
    """Our model with the same weights as a timm ViT / DeiT (an instance, or a name for timm)."""
    import timm

    reference = timm.create_model(model_or_name, pretrained=pretrained) if isinstance(model_or_name, str) \
        else model_or_name
    cfg = _config_from_timm(reference)
    model = VisionTransformer(cfg)
    load_weights(model, reference.state_dict(), f"timm:{type(reference).__name__}")
    return model.train(reference.training)


def _config_from_timm(ref: nn.Module) -> ViTConfig:
    """Read the geometry off a timm VisionTransformer; refuse variants our forward does not implement."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(ref, TimmViT):
        raise TypeError(f"from_timm expects a timm VisionTransformer, got {type(ref).__name__}")
    unsupported = []
    if ref.cls_token is None:
        unsupported.append("no class token")
    if getattr(ref, "reg_token", None) is not None:
        unsupported.append("register tokens")
    if getattr(ref, "global_pool", "token") != "token":
        unsupported.append(f"global_pool={ref.global_pool!r}")
    if getattr(ref, "no_embed_class", False):
        unsupported.append("no_embed_class")
    if not isinstance(getattr(ref, "norm_pre", nn.Identity()), nn.Identity):
        unsupported.append("pre-norm")
    if unsupported:
        raise ValueError(f"timm model variant not supported: {', '.join(unsupported)}")
    blk = ref.blocks[0]
    pcfg = getattr(ref, "pretrained_cfg", {}) or {}
    ls = getattr(blk, "ls1", nn.Identity())
    return ViTConfig(
        img_size=ref.patch_embed.img_size[0], patch_size=ref.patch_embed.patch_size[0],
        in_chans=ref.patch_embed.proj.in_channels, num_classes=ref.num_classes, embed_dim=ref.embed_dim,
        depth=len(ref.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / ref.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        distilled=getattr(ref, "dist_token", None) is not None,
        init_values=float(ls.gamma.detach().flatten()[0]) if hasattr(ls, "gamma") else None,
        mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
    )


def load_model(path: str | os.PathLike) -> VisionTransformer:
    """A backbone from an iared checkpoint (carries its config) or, failing that, a DeiT name guess."""
    obj = read_checkpoint(path)
    cfg = obj.get("config", {}).get("model") if isinstance(obj.get("config"), dict) else None
    if cfg is None:
        raise CheckpointError(
            f"bad checkpoint {path}: no model config inside; use create_model(name, checkpoint=...) for "
            "official DeiT or plain state-dict files"
        )
    model = VisionTransformer(ViTConfig(**cfg))
    load_weights(model, extract_state_dict(obj, path), path)
    return model
