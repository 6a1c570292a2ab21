"""Backbone families: which model class and config class a checkpoint's ``architecture`` names, and
what a foreign model or checkpoint is.

A checkpoint that carries its model records the family in ``config["architecture"]`` (pruned
checkpoints since MViT; files without it hold a ViT, or, when their model config has TimeSformer's
``num_frames`` / ``attention_type``, a TimeSformer). :func:`family_of_config` reads a file's config,
:func:`family_of` names a live backbone, :func:`build_backbone` rebuilds one from its config dict.

Foreign models come in through their state-dict layout, never by patching their classes:
:func:`foreign_sources` is the one table of the libraries we read (timm, Hugging Face ``transformers``),
each row how to recognise an instance and how to convert it; :func:`as_backbone` turns any of them
(or one of ours, unchanged) into our backbone. :func:`checkpoint_kind` is the same for the contents
of a weights file: ours (with its config), transformers', the official TimeSformer's, or timm's layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CHECKPOINT_KINDS", "as_backbone", "backbone_families", "build_backbone", "checkpoint_kind", "family_of", "family_of_config",
           "foreign_sources", "input_shape", "is_video_config", "source_of"]


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


# -- foreign models and files ----------------------------------------------------------------------

def _defined_in(obj, package: str) -> bool:
    return any(c.__module__.split(".")[0] == package for c in type(obj).__mro__)


def _is_hf_vit(obj) -> bool:
    from iared.models.hf import HF_ARCHITECTURES

    return _defined_in(obj, "transformers") and type(obj).__name__ in HF_ARCHITECTURES


def _is_hf_timesformer(obj) -> bool:
    return _defined_in(obj, "transformers") and type(obj).__name__ == "TimesformerForVideoClassification"


def foreign_sources() -> dict[str, tuple[Callable[[Any], bool], Callable]]:
    """Libraries whose models we load: name -> (recognise an instance, convert it to our backbone).
    Recognition never imports the library; the converter refuses what it does not implement, naming it."""
    from iared.models import from_timm
    from iared.models.hf import from_huggingface
    from iared.models.timesformer import from_hf_timesformer

    return {
        "timm": (lambda m: _defined_in(m, "timm"), from_timm),  # ViT / DeiT / DeiT-III / CLIP towers, MViTv2
        "transformers": (_is_hf_vit, from_huggingface),  # ViT / DeiT classifiers and headless models
        "transformers-timesformer": (_is_hf_timesformer, from_hf_timesformer),
    }


def source_of(model) -> str | None:
    """Where a model comes from: ``iared:<family>`` for ours, a :func:`foreign_sources` name, else None."""
    family = family_of(model)
    if family is not None:
        return f"iared:{family}"
    return next((name for name, (matches, _) in foreign_sources().items() if matches(model)), None)


def as_backbone(model):
    """Our backbone for ``model``: ours as it is, a foreign one converted (same weights, same train/eval
    mode); anything else a ``TypeError`` naming what is read."""
    if family_of(model) is not None:
        return model
    for matches, convert in foreign_sources().values():
        if matches(model):
            return convert(model)
    raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not a backbone this version reads: "
                    f"ours ({', '.join(backbone_families())}) or {', '.join(foreign_sources())} models")


def _is_official_timesformer(obj: Mapping) -> bool:
    if isinstance(obj.get("model_state"), dict):
        return True
    keys = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    return any(isinstance(k, str) and (".temporal_attn." in k or k.endswith("time_embed")) for k in keys)


def _is_hf_weights(obj: Mapping) -> bool:
    from iared.models.hf import is_hf_vit_state_dict

    return is_hf_vit_state_dict(obj)


# What a weights file holds, by its contents; the first match wins.
CHECKPOINT_KINDS: dict[str, Callable[[Mapping], bool]] = {
    "iared": lambda obj: isinstance(obj.get("config"), dict),  # carries its config (family_of_config reads it)
    "transformers": _is_hf_weights,  # transformers' ViT / DeiT names (iared.models.hf maps them)
    "timesformer": _is_official_timesformer,  # the official .pyth layout, or TimeSformer's keys
    "timm": lambda obj: True,  # timm's layout, ours: the geometry is read off the weights
}


def checkpoint_kind(obj: Mapping) -> str:
    """The :data:`CHECKPOINT_KINDS` name of a checkpoint's contents (``read_checkpoint``'s dict)."""
    return next(name for name, matches in CHECKPOINT_KINDS.items() if matches(obj))
