"""Hugging Face ``transformers``' ViT and DeiT, loaded into our :class:`VisionTransformer` by their state dict.

Covered: ``ViTForImageClassification``, ``ViTModel`` (headless), ``DeiTForImageClassification`` (the
distillation token runs through the blocks, the class head alone reads the output),
``DeiTForImageClassificationWithTeacher`` (both heads averaged, DeiT's rule) and ``DeiTModel``; from a
live model, a ``save_pretrained`` directory (``config.json`` + ``model.safetensors``) or a weights file.
Headless models return the final-normed class token, ``last_hidden_state[:, 0]``; a ``ViTModel``'s
pooler (dense + tanh on that token) is not carried, which is said in one warning.

Two key layouts are read: the module names of ``transformers`` >= 5 (``layers.N.attention.q_proj``,
``mlp.fc1``) and the names its files carry, on the Hub and from ``save_pretrained``
(``encoder.layer.N.attention.attention.query``, ``intermediate.dense``). Query, key and value are
concatenated into timm's ``qkv``; every other tensor is renamed. Unknown keys raise, so a layout
change cannot load silently. What the config asks for and our forward does not implement (another
activation than exact GELU, a head size other than width / heads, non-square images) is refused in
one line naming it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from iared.models.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, ViTConfig

__all__ = ["HF_ARCHITECTURES", "config_from_hf", "from_huggingface", "hf_to_timm_keys", "hf_weights_path",
           "is_hf_vit_state_dict", "load_hf_dir", "read_hf_checkpoint"]

# architecture -> (weights prefix, head keys -> ours, whether the distillation head is read)
HF_ARCHITECTURES: dict[str, tuple[str, dict[str, str], bool]] = {
    "ViTForImageClassification": ("vit.", {"classifier": "head"}, False),
    "ViTModel": ("", {}, False),
    "DeiTForImageClassification": ("deit.", {"classifier": "head"}, False),
    "DeiTForImageClassificationWithTeacher": ("deit.", {"cls_classifier": "head",
                                                        "distillation_classifier": "head_dist"}, True),
    "DeiTModel": ("", {}, False),
}
# transformers' image processors' defaults, for models whose directory has no preprocessor_config.json
_DEFAULT_MEAN_STD = {"vit": ((0.5,) * 3, (0.5,) * 3), "deit": (IMAGENET_MEAN, IMAGENET_STD)}

_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_NAMES = {  # both layouts' module names inside a layer -> timm's Block
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
}
_QKV = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
        "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2}


def is_hf_vit_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a state dict has the keys of a transformers ViT / DeiT (any of the architectures)."""
    return any(f"{prefix}embeddings.patch_embeddings.projection.weight" in state_dict for prefix in ("", "vit.", "deit."))


def architecture_of_keys(state_dict: Mapping[str, Tensor]) -> str:
    """The architecture a transformers ViT / DeiT state dict comes from, by its prefix and head keys."""
    if "cls_classifier.weight" in state_dict:
        return "DeiTForImageClassificationWithTeacher"
    deit = any(k.endswith("embeddings.distillation_token") for k in state_dict)
    if any(k.startswith(("vit.", "deit.")) for k in state_dict):
        return "DeiTForImageClassification" if deit else "ViTForImageClassification"
    return "DeiTModel" if deit else "ViTModel"


def hf_to_timm_keys(state_dict: Mapping[str, Tensor], architecture: str | None = None,
                    source: str = "<memory>") -> dict[str, Tensor]:
    """A transformers ViT / DeiT state dict -> timm's layout (ours). ``pooler.*`` is left out (a
    warning says so); any other key without a counterpart raises ``ValueError`` naming it."""
    architecture = architecture or architecture_of_keys(state_dict)
    if architecture not in HF_ARCHITECTURES:
        raise ValueError(f"{source}: transformers architecture {architecture!r} not supported; "
                         f"supported: {', '.join(HF_ARCHITECTURES)}")
    prefix, heads, _ = HF_ARCHITECTURES[architecture]
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, Tensor]] = {}
    pooler = []
    for key, value in state_dict.items():
        if key.startswith("pooler."):
            pooler.append(key)
            continue
        head, _, kind = key.rpartition(".")
        if head in heads:
            out[f"{heads[head]}.{kind}"] = value
            continue
        rest = key.removeprefix(prefix)
        if rest in _EMBEDDINGS:
            out[_EMBEDDINGS[rest]] = value
            continue
        m = _LAYER.fullmatch(rest) if rest != key or not prefix else None
        if m is None or (m.group(2) not in _LAYER_NAMES and m.group(2) not in _QKV):
            raise ValueError(f"{source}: transformers key {key!r} has no counterpart in our ViT ({architecture})")
        block, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name in _QKV:
            qkv.setdefault((block, kind), {})[_QKV[name]] = value
        else:
            out[f"blocks.{block}.{_LAYER_NAMES[name]}.{kind}"] = value
    for (block, kind), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"{source}: block {block} has {kind}s for only {len(parts)} of query, key, value")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    if pooler:
        warnings.warn(f"{source}: the pooler ({', '.join(sorted(pooler))}) is not carried; the model returns "
                      "last_hidden_state[:, 0], not pooler_output", stacklevel=3)
    return out


def _get(config, name: str, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def config_from_hf(hf_config, architecture: str, mean_std: tuple | None = None) -> ViTConfig:
    """Our config from a ``transformers`` ``ViTConfig`` / ``DeiTConfig`` (the object or its ``config.json``
    dict) for ``architecture``; refuses what our forward does not implement, naming it."""
    model_type = _get(hf_config, "model_type")
    if model_type not in _DEFAULT_MEAN_STD:
        raise ValueError(f"transformers model_type {model_type!r} not supported (vit, deit)")
    if architecture not in HF_ARCHITECTURES:
        raise ValueError(f"transformers architecture {architecture!r} not supported; "
                         f"supported: {', '.join(HF_ARCHITECTURES)}")
    width, heads = int(_get(hf_config, "hidden_size")), int(_get(hf_config, "num_attention_heads"))
    found = []
    act = _get(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        found.append(f"hidden_act={act!r} (exact GELU only)")
    head_dim = _get(hf_config, "head_dim")
    if head_dim is not None and int(head_dim) * heads != width:
        found.append(f"head_dim={head_dim} with {heads} heads of a {width}-wide model")
    image, patch = _get(hf_config, "image_size", 224), _get(hf_config, "patch_size", 16)
    image, patch = (image, image) if isinstance(image, int) else tuple(image), \
        (patch, patch) if isinstance(patch, int) else tuple(patch)
    if image[0] != image[1] or patch[0] != patch[1]:
        found.append(f"non-square images or patches ({image}, {patch})")
    if found:
        raise ValueError(f"transformers {architecture} not supported: {', '.join(found)}")
    in_chans = int(_get(hf_config, "num_channels", 3))
    mean, std = mean_std or _DEFAULT_MEAN_STD[model_type]
    if in_chans != len(mean):
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    headless = architecture.endswith("Model")
    labels = _get(hf_config, "num_labels")
    if labels is None:
        labels = len(_get(hf_config, "id2label", None) or {}) or 2  # transformers' default: 2 labels
    return ViTConfig(
        img_size=image[0], patch_size=patch[0], in_chans=in_chans, num_classes=0 if headless else int(labels),
        embed_dim=width, depth=int(_get(hf_config, "num_hidden_layers")), num_heads=heads,
        mlp_ratio=int(_get(hf_config, "intermediate_size")) / width, qkv_bias=bool(_get(hf_config, "qkv_bias", True)),
        distilled=model_type == "deit", dist_head=HF_ARCHITECTURES[architecture][2],
        norm_eps=float(_get(hf_config, "layer_norm_eps", 1e-12)), mean=tuple(mean), std=tuple(std),
    )


def from_huggingface(model_or_dir: nn.Module | str | os.PathLike) -> VisionTransformer:
    """Our model with the weights of a transformers ViT / DeiT: a live model, or the directory its
    ``save_pretrained`` wrote (``config.json`` and ``model.safetensors``)."""
    if isinstance(model_or_dir, nn.Module):
        architecture = type(model_or_dir).__name__
        cfg = config_from_hf(model_or_dir.config, architecture)
        model = VisionTransformer(cfg)
        source = f"transformers:{architecture}"
        _load(model, hf_to_timm_keys(model_or_dir.state_dict(), architecture, source), source)
        return model.train(model_or_dir.training)
    return load_hf_dir(model_or_dir)


def hf_weights_path(path: str | os.PathLike) -> Path:
    """The weights file a checkpoint path means: a ``save_pretrained`` directory's ``model.safetensors``
    (or ``pytorch_model.bin``); any other path as given."""
    from iared.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "config.json").is_file():
        raise CheckpointError(f"bad checkpoint {path}: a directory without config.json (not a transformers "
                              "save_pretrained directory)")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"bad checkpoint {path}: no model.safetensors or pytorch_model.bin (sharded weights "
                          "are not read)")


def read_hf_checkpoint(path: str | os.PathLike, weights: Mapping[str, Tensor]) -> tuple[ViTConfig | None, dict]:
    """A transformers ViT / DeiT checkpoint at ``path`` (its weights ``weights``, read already) -> (our config
    from the ``config.json`` beside it, None without one; the weights in our layout). One-line errors."""
    from iared.checkpoint import CheckpointError

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    architecture = ((config or {}).get("architectures") or [architecture_of_keys(weights)])[0]
    mean_std = None
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        p = json.loads(processor.read_text())
        if "image_mean" in p and "image_std" in p:
            mean_std = (tuple(p["image_mean"]), tuple(p["image_std"]))
    try:
        cfg = config_from_hf(config, architecture, mean_std) if config is not None else None
        return cfg, hf_to_timm_keys(weights, architecture, str(path))
    except ValueError as e:
        raise CheckpointError(f"bad checkpoint {path}: {e}") from None


def load_hf_dir(path: str | os.PathLike) -> VisionTransformer:
    """A ``save_pretrained`` directory (or a weights file beside its ``config.json``) -> our model, in eval mode."""
    from iared.checkpoint import CheckpointError, read_checkpoint

    cfg, sd = read_hf_checkpoint(path, read_checkpoint(hf_weights_path(path)))
    if cfg is None:
        raise CheckpointError(f"bad checkpoint {path}: a transformers model without its config.json beside it")
    model = VisionTransformer(cfg)
    _load(model, sd, path)
    return model.eval()


def _load(model: VisionTransformer, sd: dict[str, Tensor], source) -> None:
    from iared.checkpoint import load_weights
    from iared.models.vit import adapt_state_dict

    load_weights(model, adapt_state_dict(sd, model.cfg), source)
