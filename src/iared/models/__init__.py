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
from iared.models.convnet import CONVNET_CONFIGS, ConvNet, ConvNetConfig, build_convnet
from iared.models.hf import from_huggingface, hf_weights_path, is_hf_vit_state_dict, read_hf_checkpoint
from iared.models.mvit import MVIT_CONFIGS, MultiScaleViT, MViTConfig, build_mvit
from iared.models.timesformer import (
    TIMESFORMER_CONFIGS,
    TimeSformer,
    TimeSformerConfig,
    build_timesformer,
    from_hf_timesformer,
    load_timesformer,
)
from iared.models.vit import IMAGENET_MEAN, IMAGENET_STD, Block, VisionTransformer, ViTConfig, adapt_state_dict

__all__ = [
    "EMBEDDED_CHECKPOINT",
    "EMBEDDED_CHECKPOINTS",
    "MODEL_BUILDERS",
    "MODEL_CONFIGS",
    "TASK_BACKBONES",
    "TASK_PRUNED",
    "Block",
    "ConvNet",
    "ConvNetConfig",
    "MViTConfig",
    "MultiScaleViT",
    "TimeSformer",
    "TimeSformerConfig",
    "ViTConfig",
    "VisionTransformer",
    "adapt_state_dict",
    "create_model",
    "from_hf_timesformer",
    "from_huggingface",
    "from_timm",
    "list_models",
    "split_model_name_tag",
    "load_model",
    "load_timesformer",
]

# The embedded task's backbone: 64x64 single-channel canvases, 8x8 patches (64 patch tokens).
# Width 144 keeps the shipped float16 weights near 3 MB; 6 blocks = 3 stages of 2.
DIGITS_VIT = dict(img_size=64, patch_size=8, in_chans=1, num_classes=10, embed_dim=144, depth=6,
                  num_heads=4, mean=(0.0,), std=(1.0,))

# DeiT-III (Touvron et al., "DeiT III: Revenge of the ViT", 2022), as timm's deit3_* models:
# position table for the patches only, layer scale initialised at 1e-6.
DEIT3 = dict(no_embed_class=True, init_values=1e-6)

MODEL_CONFIGS: dict[str, dict] = {
    "deit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "deit_tiny_distilled_patch16_224": dict(embed_dim=192, depth=12, num_heads=3, distilled=True),
    "deit_small_distilled_patch16_224": dict(embed_dim=384, depth=12, num_heads=6, distilled=True),
    "deit_base_distilled_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, distilled=True),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "deit3_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6, **DEIT3),
    "deit3_small_patch16_384": dict(img_size=384, embed_dim=384, depth=12, num_heads=6, **DEIT3),
    "deit3_medium_patch16_224": dict(embed_dim=512, depth=12, num_heads=8, **DEIT3),
    "deit3_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, **DEIT3),
    "deit3_base_patch16_384": dict(img_size=384, embed_dim=768, depth=12, num_heads=12, **DEIT3),
    "deit3_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, **DEIT3),
    "deit3_large_patch16_384": dict(img_size=384, embed_dim=1024, depth=24, num_heads=16, **DEIT3),
    "deit3_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **DEIT3),
    "digits_vit": DIGITS_VIT,
    # digits-natural (iared.data.natural): digits_vit's geometry on 64x64 RGB in [0, 1] (float16 ~3 MB), with a
    # hybrid conv stem (16, 32, 64: 11 M MACs, the first stages of its teacher digits_natural_cnn;
    # iared.train.distill says why) in place of the linear patch embedding.
    "digits_natural_vit": {**DIGITS_VIT, "in_chans": 3, "mean": (0.0,) * 3, "std": (1.0,) * 3,
                           "conv_stem": (16, 32, 64)},
}

# The other families' names: name -> (builder, config). ``create_model`` builds MODEL_CONFIGS' names
# as VisionTransformers (their users read them as ViTConfig fields) and these with their builder.
MODEL_BUILDERS: dict[str, tuple] = {name: (build_mvit, cfg) for name, cfg in MVIT_CONFIGS.items()}
# TimeSformer (official model zoo: K400 / K600 / SSv2, 8 x 224, HR 16 x 448, L 96 x 224 or 64 x 224 on SSv2);
# architecture only, weights from a local .pyth file (checkpoint=...).
MODEL_BUILDERS.update({name: (build_timesformer, cfg) for name, cfg in TIMESFORMER_CONFIGS.items()})
# Plain CNN teachers for distilling ViTs (iared.train.distill); not token models.
MODEL_BUILDERS.update({name: (build_convnet, cfg) for name, cfg in CONVNET_CONFIGS.items()})

# Backbones for the embedded tasks that this project trained itself, shipped in iared/assets (the commands
# that reproduce them: src/iared/train/backbone.py's docstring).
EMBEDDED_CHECKPOINTS = {"digits_vit": "digits_vit.safetensors", "digits_natural_vit": "digits_natural_vit.safetensors",
                        "moving_digits_tsf": "moving_digits_tsf.safetensors"}
EMBEDDED_CHECKPOINT = EMBEDDED_CHECKPOINTS["digits_vit"]
# The shipped backbone of each embedded task: what demo, compare and train-interpreters use when given none.
TASK_BACKBONES = {"digits-natural": "digits_natural_vit", "digits-clutter": "digits_vit",
                  "moving-digits": "moving_digits_tsf"}
# The pruned model (backbone + trained interpreters) shipped for each embedded task, file names in iared/assets.
TASK_PRUNED = {"digits-natural": "digits_natural_pruned.pt", "digits-clutter": "digits_pruned.pt",
               "moving-digits": "moving_digits_pruned.pt"}


def list_models() -> list[str]:
    return sorted([*MODEL_CONFIGS, *MODEL_BUILDERS])


def split_model_name_tag(name: str) -> tuple[str, str]:
    """``"deit_small_patch16_224.fb_in1k"`` -> ``("deit_small_patch16_224", "fb_in1k")``; no tag: ``""``.
    timm's rule (``timm.models.split_model_name_tag``), without importing timm: the architecture
    is what registries are keyed by, the tag names one of its pretrained weight sets."""
    base, _, tag = name.partition(".")
    return base, tag


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                 **overrides) -> VisionTransformer:
    """Build a backbone by name; ``overrides`` change any :class:`ViTConfig` field.

    ``pretrained=True``: timm's weights through timm's download (network needed), or for
    ``digits_vit`` the checkpoint shipped with the package. ``checkpoint``: a local file (timm,
    official DeiT / DeiT-III, safetensors or iared layout). Weights made at another image size
    (``img_size=...`` override) get their position table resampled as timm does.
    """
    # a timm tag (".fb_in1k") picks pretrained weights; the architecture is the name without it
    base, _ = split_model_name_tag(name)
    if base in MODEL_BUILDERS:  # another family (MViTv2, TimeSformer): overrides are its config's fields
        builder, config = MODEL_BUILDERS[base]
        return builder(name if pretrained else base, config, pretrained=pretrained, checkpoint=checkpoint, **overrides)
    if base not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    model = VisionTransformer(ViTConfig(**{**MODEL_CONFIGS[base], **overrides}))
    if checkpoint is not None:
        state_dict = extract_state_dict(read_checkpoint(hf_weights_path(checkpoint)), checkpoint)
        if is_hf_vit_state_dict(state_dict):  # transformers' ViT / DeiT: its keys mapped onto ours
            state_dict = read_hf_checkpoint(checkpoint, state_dict)[1]
        load_weights(model, adapt_state_dict(state_dict, model.cfg), checkpoint)
    elif pretrained and base in EMBEDDED_CHECKPOINTS:
        path = embedded_checkpoint_path(base)
        load_weights(model, adapt_state_dict(extract_state_dict(read_checkpoint(path), path), model.cfg), path)
    elif pretrained:
        import timm

        reference = timm.create_model(name, pretrained=True, num_classes=model.cfg.num_classes)
        load_weights(model, adapt_state_dict(reference.state_dict(), model.cfg), f"timm:{name}")
    return model


def embedded_checkpoint_path(name: str = "digits_vit") -> Path:
    """The shipped weights of an embedded task's backbone (``EMBEDDED_CHECKPOINTS``)."""
    path = Path(str(resources.files("iared") / "assets" / EMBEDDED_CHECKPOINTS[name]))
    if not path.is_file():
        raise FileNotFoundError(f"embedded backbone checkpoint missing at {path}; the commands that train it are in "
                                "iared.train.backbone's docstring")
    return path


def from_timm(model_or_name: nn.Module | str, pretrained: bool = False) -> VisionTransformer | MultiScaleViT:
    """Our model with the same weights as a timm ViT / DeiT / DeiT-III / CLIP tower, or an MViTv2 (an
    instance, or a name for timm), headless ones (``num_classes=0``) included: the geometry is read off
    the instance, the weights load through timm's state-dict layout, which is ours."""
    import timm
    from timm.models.mvitv2 import MultiScaleVit as TimmMViT

    reference = timm.create_model(model_or_name, pretrained=pretrained) if isinstance(model_or_name, str) \
        else model_or_name
    model = MultiScaleViT(_mvit_config_from_timm(reference)) if isinstance(reference, TimmMViT) \
        else VisionTransformer(_config_from_timm(reference))
    load_weights(model, reference.state_dict(), f"timm:{type(reference).__name__}")
    return model.train(reference.training)


def _mvit_config_from_timm(ref: nn.Module) -> MViTConfig:
    """Read the geometry off a timm ``MultiScaleVit`` (it keeps no config); refuse what ours does not implement."""
    from timm.models.mvitv2 import MultiScaleAttention as TimmAttention

    blocks = [b for s in ref.stages for b in s.blocks]
    found = []
    if ref.cls_token is not None:
        found.append("class token (use_cls_token)")
    if ref.pos_embed is not None:
        found.append("absolute position embedding (use_abs_pos)")
    if ref.global_pool != "avg":
        found.append(f"global_pool={ref.global_pool!r}")
    if any(type(b.attn) is not TimmAttention for b in blocks):
        found.append("pool_first attention")
    attn = [b.attn for b in blocks if type(b.attn) is TimmAttention]
    if any(a.mode != "conv" for a in attn):
        found.append(f"pooling mode {sorted({a.mode for a in attn})}")
    if any(a.rel_pos_type != "spatial" for a in attn):
        found.append(f"rel_pos_type {sorted({a.rel_pos_type for a in attn})}")
    if any(a.pool_q is None or a.pool_k is None for a in attn):
        found.append("blocks without query or key pooling (1x1 kernels)")
    if not getattr(ref, "expand_attn", True):
        found.append("expand_attn=False")
    norms = [m for m in ref.modules() if isinstance(m, nn.LayerNorm)]
    if len({n.eps for n in norms}) > 1:
        found.append(f"LayerNorms with different eps {sorted({n.eps for n in norms})}")
    if found:
        raise ValueError(f"timm MViTv2 variant not supported: {', '.join(found)}")
    first = [s.blocks[0] for s in ref.stages]
    stride_q = tuple(tuple(b.attn.pool_q.stride) for b in first)
    proj = ref.patch_embed.proj
    return MViTConfig(
        img_size=ref.stages[0].feat_size[0] * stride_q[0][0] * proj.stride[0], in_chans=proj.in_channels,
        num_classes=ref.num_classes, depths=tuple(len(s.blocks) for s in ref.stages),
        embed_dim=tuple(b.dim_out for b in first), num_heads=tuple(b.attn.num_heads for b in first),
        mlp_ratio=first[0].mlp.fc1.out_features / first[0].dim_out, qkv_bias=first[0].attn.qkv.bias is not None,
        kernel_qkv=tuple(first[0].attn.pool_q.kernel_size), stride_q=stride_q,
        stride_kv=tuple(tuple(b.attn.pool_k.stride) for b in first), patch_kernel=tuple(proj.kernel_size),
        patch_stride=tuple(proj.stride), patch_padding=tuple(proj.padding),
        residual_pooling=bool(first[0].attn.residual_pooling), norm_eps=float(ref.norm.eps),
        **_timm_mean_std(ref),
    )


def _timm_mean_std(ref: nn.Module) -> dict:
    pcfg = getattr(ref, "pretrained_cfg", {}) or {}
    return dict(mean=tuple(pcfg.get("mean", IMAGENET_MEAN)), std=tuple(pcfg.get("std", IMAGENET_STD)))


def _config_from_timm(ref: nn.Module) -> ViTConfig:
    """Read the geometry off a timm VisionTransformer; refuse variants our forward does not implement."""
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(ref, TimmViT):
        raise TypeError(f"from_timm expects a timm VisionTransformer or MultiScaleVit (MViTv2), got {type(ref).__name__}")
    unsupported = _unsupported_timm_features(ref, TimmBlock)
    if unsupported:
        raise ValueError(f"timm model variant not supported: {', '.join(unsupported)}")
    blk = ref.blocks[0]
    ls = blk.ls1
    init_values = None
    if hasattr(ls, "gamma"):  # any value: the weights overwrite it (timm keeps the one it started from)
        init_values = float(getattr(ls, "init_values", None) or ls.gamma.detach().flatten()[0])
    distilled = getattr(ref, "dist_token", None) is not None
    eps = next((n.eps for n in _timm_norms(ref) if not isinstance(n, nn.Identity)), 1e-6)
    has_norm, has_fc_norm = not isinstance(ref.norm, nn.Identity), not isinstance(ref.fc_norm, nn.Identity)
    # fc_norm stays None (timm's default: with average pooling) unless the model departs from that rule.
    fc_norm = None if not (has_norm or has_fc_norm) or has_fc_norm == (ref.global_pool == "avg") else has_fc_norm
    return ViTConfig(
        img_size=ref.patch_embed.img_size[0], patch_size=ref.patch_embed.patch_size[0],
        in_chans=ref.patch_embed.proj.in_channels, num_classes=ref.num_classes, embed_dim=ref.embed_dim,
        depth=len(ref.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / ref.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        distilled=distilled, init_values=init_values,
        class_token=ref.cls_token is not None,
        reg_tokens=0 if distilled else int(getattr(ref, "num_reg_tokens", 0)),
        no_embed_class=bool(getattr(ref, "no_embed_class", False)),
        global_pool=ref.global_pool, fc_norm=fc_norm, pre_norm=not isinstance(ref.norm_pre, nn.Identity),
        final_norm=has_norm or has_fc_norm, norm_eps=float(eps),
        **_timm_mean_std(ref),
    )


def _unsupported_timm_features(ref: nn.Module, timm_block: type) -> list[str]:
    """What a timm ``VisionTransformer`` uses that our forward does not implement (empty: convertible)."""
    found = []
    if getattr(ref, "dynamic_img_size", False):
        found.append("dynamic_img_size (one image size per model here; load at another size instead)")
    if getattr(ref.patch_embed, "dynamic_img_pad", False):
        found.append("dynamic_img_pad")
    if getattr(ref, "attn_pool", None) is not None:
        found.append(f"attention pooling global_pool={ref.global_pool!r}")
    elif ref.global_pool not in ("token", "avg"):
        found.append(f"global_pool={ref.global_pool!r}")
    if getattr(ref, "pool_include_prefix", False):
        found.append("pool_include_prefix")
    if ref.pos_embed is None:
        found.append("no position embedding")
    if not isinstance(getattr(ref.patch_embed, "norm", nn.Identity()), nn.Identity):
        found.append("normalised patch embedding")
    img, patch = ref.patch_embed.img_size, ref.patch_embed.patch_size
    if img[0] != img[1] or patch[0] != patch[1]:
        found.append(f"non-square images or patches ({tuple(img)}, {tuple(patch)})")
    blk = ref.blocks[0]
    if type(blk) is not timm_block:
        found.append(f"block type {type(blk).__name__}")
        return found
    attn, mlp = blk.attn, blk.mlp
    if not all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm")):
        found.append("qk_norm")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or \
            not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        found.append("scale norms inside attention / MLP")
    if getattr(attn, "proj", None) is None or attn.proj.bias is None:
        found.append("attention projection without bias")
    if not (hasattr(mlp, "fc1") and isinstance(getattr(mlp, "act", None), nn.GELU)
            and mlp.act.approximate == "none"):
        found.append(f"MLP {type(mlp).__name__} with {type(getattr(mlp, 'act', None)).__name__}")
    norms = [n for n in _timm_norms(ref) if not isinstance(n, nn.Identity)]
    if not all(type(n) in (nn.LayerNorm, _timm_layer_norm()) and n.elementwise_affine for n in norms):
        found.append(f"norm layers other than LayerNorm ({', '.join(sorted({type(n).__name__ for n in norms}))})")
    elif len({n.eps for n in norms}) > 1:
        found.append(f"LayerNorms with different eps {sorted({n.eps for n in norms})}")
    return found


def _timm_norms(ref: nn.Module) -> list[nn.Module]:
    """Every norm of a timm ViT that our config's one ``norm_eps`` stands for."""
    return [m for blk in ref.blocks for m in (blk.norm1, blk.norm2)] + [ref.norm, ref.fc_norm, ref.norm_pre]


def _timm_layer_norm() -> type:
    from timm.layers import LayerNorm

    return LayerNorm


def load_model(path: str | os.PathLike) -> VisionTransformer:
    """A backbone from an iared checkpoint (carries its config; a TimeSformer's too, by its
    ``architecture`` or its config's fields), or, failing that, a DeiT name guess."""
    from iared.models.families import build_backbone, family_of_config

    obj = read_checkpoint(path)
    cfg = obj.get("config", {}).get("model") if isinstance(obj.get("config"), dict) else None
    if cfg is None:
        raise CheckpointError(
            f"bad checkpoint {path}: no model config inside; use create_model(name, checkpoint=...) for "
            "official DeiT or plain state-dict files"
        )
    family = family_of_config(obj["config"], path)
    if family != "vit":
        sd = extract_state_dict(obj, path)
        if str(obj.get("format", "")).startswith("iared-pruned/"):  # its fine-tuned backbone
            sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
        model = build_backbone(family, cfg, path)
        load_weights(model, sd, path)
        return model
    model = VisionTransformer(ViTConfig(**cfg))
    load_weights(model, adapt_state_dict(extract_state_dict(obj, path), model.cfg), path)
    return model
