"""Backbone families: which model class and config class a checkpoint's ``architecture`` names.

A checkpoint that carries its model records the family in ``config["architecture"]`` (pruned
checkpoints since MViT; files without it hold a ViT, or, when their model config has TimeSformer's
``num_frames`` / ``attention_type``, a TimeSformer). :func:`family_of_config` reads a file's config,
:func:`family_of` names a live backbone, :func:`build_backbone` rebuilds one from its config dict.
"""

from __future__ import annotations

import os

__all__ = ["backbone_families", "build_backbone", "family_of", "family_of_config", "input_shape", "is_video_config"]


def backbone_families() -> dict[str, tuple[type, type]]:
    """The name a checkpoint records -> (model class, config class)."""
    from iared.models.convnet import ConvNet, ConvNetConfig
    from iared.models.mvit import MultiScaleViT, MViTConfig
    from iared.models.timesformer import TimeSformer, TimeSformerConfig
    from iared.models.vit import VisionTransformer, ViTConfig

    return {"vit": (VisionTransformer, ViTConfig), "mvit": (MultiScaleViT, MViTConfig),
            "timesformer": (TimeSformer, TimeSformerConfig), "convnet": (ConvNet, ConvNetConfig)}


def family_of(backbone) -> str | None:
    """The family name of a backbone instance (None: no checkpoint format for it)."""
    return next((name for name, (cls, _) in backbone_families().items() if isinstance(backbone, cls)), None)


def family_of_config(config: dict | None, path: str | os.PathLike = "<memory>") -> str:
    """The family a checkpoint's ``config`` entry describes: its ``architecture``, else ``timesformer``
    for a model config with TimeSformer-only fields, else ``vit``. Unknown names: one line naming the file."""
    from iared.checkpoint import CheckpointError

    config = config if isinstance(config, dict) else {}
    families = backbone_families()
    family = config.get("architecture")
    if family is None:
        fields = set(config["model"]) if isinstance(config.get("model"), dict) else set()
        family = "timesformer" if {"num_frames", "attention_type"} & fields else \
            "convnet" if {"widths", "pools"} <= fields else "vit"
    if family not in families:
        raise CheckpointError(f"bad checkpoint {path}: unknown backbone architecture {family!r}; "
                              f"this version reads {', '.join(families)}")
    return family


def build_backbone(family: str, model_config: dict, path: str | os.PathLike = "<memory>"):
    """A fresh backbone of ``family`` from a saved model config (one-line errors naming the file)."""
    from iared.checkpoint import config_from_dict

    model_cls, config_cls = backbone_families()[family]
    return model_cls(config_from_dict(config_cls, model_config, path, "model"))


def is_video_config(cfg) -> bool:
    """Whether a model config takes clips ``(B, T, C, H, W)`` (it has ``num_frames``)."""
    return hasattr(cfg, "num_frames")


def input_shape(cfg) -> tuple[int, ...]:
    """One input of a model with config ``cfg``: ``(C, H, W)``, or ``(T, C, H, W)`` for a video model."""
    image = (cfg.in_chans, cfg.img_size, cfg.img_size)
    return (cfg.num_frames, *image) if is_video_config(cfg) else image
