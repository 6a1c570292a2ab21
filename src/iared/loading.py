"""Which model (and data) a user means: a name, a weights file, or both, for every command that takes one.

One rule for all commands (``train``, ``train-interpreters``, ``eval``, ``bench``, ``explain``,
``explain-eval``, ``export``):

- ``--checkpoint FILE`` alone: the file says what it is. iared files carry their model config
  (training checkpoints, exported weights, pruned models). Files without one (the official DeiT
  ``{"model": state_dict}`` layout, plain state dicts, safetensors) have their geometry read off
  the weights (:func:`infer_vit_config`): width, depth, patch and image size, channels, classes
  (0 without ``head.*``: headless), distillation / class / register tokens, DeiT-III's position table, average pooling (fc_norm),
  pre-norm, layer scale, augmented shortcuts; the head count, which weights do not show, comes from the registered
  model of that width (DeiT-Ti 3, -S 6, -B 12), else width / 64.
- ``--model NAME --checkpoint FILE``: built as ``NAME`` (plus overrides), then the file's weights,
  strictly (every missing, unexpected or mis-shaped key listed, naming the file).
- ``--model NAME --pretrained``: timm's download (network needed), or for ``digits_vit`` the
  backbone shipped with the package.
- nothing: the command's default, if it has one (the shipped digits backbone / pruned model).

TimeSformer (video) the same way: ``--model timesformer_base_patch16_224 --checkpoint FILE`` (the
official ``.pyth``, a plain or iared state dict; ``--model-override num_frames=4`` etc.), or the file
alone: an iared file says ``architecture: timesformer`` (or has a TimeSformer model config), an
official ``.pyth`` / plain state dict is recognised by its ``model_state`` / ``time_embed`` /
``temporal_attn`` keys and its geometry read off the weights
(:func:`iared.models.timesformer.config_from_state_dict`). TimeSformer has no download
(``--pretrained`` is refused, naming the model).

Where a command needs an IA-RED² model (:func:`load_iared`), a pruned checkpoint is used whole;
a backbone (any of the above) gets fresh interpreters, which is what ``train-interpreters``
starts from and what ``bench`` times; ``explain`` and ``export``, whose output would be those
untrained interpreters' random decisions, refuse it unless ``--allow-untrained`` (attention maps).

Every problem is one line naming the file (:class:`iared.checkpoint.CheckpointError`) or the name.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from iared.checkpoint import (
    CheckpointError,
    config_from_dict,
    extract_state_dict,
    load_weights,
    read_checkpoint,
)

__all__ = ["UntrainedError", "check_labels_fit", "checkpoint_task", "infer_vit_config", "is_pruned", "load_backbone",
           "load_iared", "load_pruned_checked", "task_dataset"]

def infer_vit_config(state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "<memory>"):
    """A :class:`ViTConfig` that fits a timm-layout ViT / DeiT state dict (see the module docstring).

    Average pooling is recognised by its ``fc_norm``; timm's rarer average pooling without
    ``fc_norm`` looks like token pooling in the keys unless there is no class token."""
    from iared.models import MODEL_CONFIGS, ViTConfig
    from iared.models.vit import rename_official_keys, stem_widths

    state_dict = rename_official_keys(state_dict)

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"bad checkpoint {path}: not a ViT / DeiT state dict (no {key}); "
                                  "give --model NAME to say what it is")
        return state_dict[key]

    proj = need("patch_embed.proj.weight")
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"bad checkpoint {path}: patch_embed.proj.weight has shape {tuple(proj.shape)}, "
                              "not (C, C_in, P, P)")
    embed_dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    stem = stem_widths(state_dict)
    if stem:  # a hybrid (timm's HybridEmbed layout): the stem makes the patches, the projection is 1x1
        in_chans, patch = int(state_dict["patch_embed.backbone.0.0.weight"].shape[1]), 2 ** len(stem)
    distilled = "dist_token" in state_dict
    class_token = "cls_token" in state_dict
    reg_tokens = int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0
    prefix = int(class_token) + int(distilled) + reg_tokens
    positions = int(need("pos_embed").shape[1])
    # The table covers prefix + patches, or (DeiT-III's no_embed_class) the patches only.
    no_embed_class = not _is_square(positions - prefix) and _is_square(positions)
    tokens = positions if no_embed_class else positions - prefix
    grid = round(max(tokens, 0) ** 0.5)
    if not _is_square(tokens):
        raise CheckpointError(f"bad checkpoint {path}: pos_embed holds {positions} positions for {prefix} prefix "
                              "tokens: not a square grid of patches")
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError(f"bad checkpoint {path}: no transformer blocks (blocks.0.*) found")
    head = state_dict.get("head.weight")  # none: a headless model (timm's num_classes=0)
    same_width = [c["num_heads"] for c in MODEL_CONFIGS.values() if c.get("embed_dim") == embed_dim and "num_heads" in c]
    num_heads = same_width[0] if same_width else max(1, embed_dim // 64)
    pool = "avg" if "fc_norm.weight" in state_dict or not class_token else "token"
    values: dict[str, Any] = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=int(head.shape[0]) if head is not None else 0,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=int(need("blocks.0.mlp.fc1.weight").shape[0]) / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict, distilled=distilled,
        # a distilled classifier without head_dist (transformers' DeiTForImageClassification) reads the class
        # token alone; a headless one averages both tokens, as timm's does
        dist_head="head_dist.weight" in state_dict or head is None,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,  # any value: the weights overwrite it
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
        global_pool=pool,
        fc_norm=True if "fc_norm.weight" in state_dict else False if pool == "avg" and "norm.weight" in state_dict
        else None,
        pre_norm="norm_pre.weight" in state_dict,
        final_norm="norm.weight" in state_dict or "fc_norm.weight" in state_dict, conv_stem=stem,
    )
    shortcut_key = re.compile(r"blocks\.0\.attn_shortcuts\.(\d+)\.weight$")
    shortcuts = {int(m.group(1)) for k in state_dict if (m := shortcut_key.match(k))}
    if shortcuts:  # augmented shortcuts (iared's own keys): how many, and the circulant grid of their weights
        values.update(aug_shortcuts=len(shortcuts),
                      aug_circulant_blocks=int(state_dict["blocks.0.attn_shortcuts.0.weight"].shape[0]))
    if in_chans != 3:  # ImageNet statistics mean nothing for other channel counts
        values.update(mean=(0.0,) * in_chans, std=(1.0,) * in_chans)
    return config_from_dict(ViTConfig, values, path, "inferred model")


def _is_square(n: int) -> bool:
    return n > 0 and round(n ** 0.5) ** 2 == n


def _file_model_config(obj: dict) -> dict | None:
    config = obj.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return model if model is not None else None


def is_pruned(obj: dict) -> bool:
    """Whether a checkpoint's contents come from :func:`iared.pruning.save_pruned` (any version)."""
    return str(obj.get("format", "")).startswith("iared-pruned/")


def checkpoint_task(checkpoint: str | os.PathLike | None = None, model: str | None = None,
                    overrides: dict | None = None) -> str | None:
    """The task a model was made for, for commands given no ``--task``: what the checkpoint's training
    config records (pruned checkpoints, training checkpoints, exported weights, dense models), else the
    embedded task whose inputs fit the model's (the file's model config, ``model``'s registered one, or
    the geometry read off plain weights, as :func:`load_backbone` would build it); None when none fits
    (and for an unknown ``model`` name, which the loader then names)."""
    from iared.data import TASKS
    from iared.models import MODEL_CONFIGS, ViTConfig, split_model_name_tag
    from iared.models.families import backbone_families, family_of_config, input_shape
    from iared.models.timesformer import TIMESFORMER_CONFIGS, TimeSformerConfig

    cfg = None
    name = split_model_name_tag(model)[0] if model is not None else None
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        train = config.get("train")
        if isinstance(train, dict) and isinstance(train.get("task"), str):
            return train["task"]
        saved = _file_model_config(obj)
        if name is None and isinstance(saved, dict):
            cfg = config_from_dict(backbone_families()[family_of_config(config, checkpoint)][1], saved, checkpoint,
                                   "model")
    if cfg is None and name in MODEL_CONFIGS:
        cfg = ViTConfig(**{**MODEL_CONFIGS[name], **(overrides or {})})
    elif cfg is None and name in TIMESFORMER_CONFIGS:
        cfg = TimeSformerConfig(**{**TIMESFORMER_CONFIGS[name], **(overrides or {})})
    elif cfg is None and checkpoint is not None and name is None:
        cfg = load_backbone(checkpoint, overrides=overrides).cfg
    if cfg is None:
        return None
    shape = input_shape(cfg)
    for task, cls in TASKS.items():
        image = (cls.in_chans, cls.image_size, cls.image_size)
        if shape == ((cls.num_frames, *image) if hasattr(cls, "num_frames") else image):
            return task
    return None


def _backbone_weights(obj: dict, path, note: bool = True) -> dict[str, torch.Tensor]:
    sd = extract_state_dict(obj, path)
    if is_pruned(obj):  # a pruned checkpoint used as a backbone: its fine-tuned backbone
        rest = {k.split(".")[1] for k in sd if k.startswith("reducers.") and k.count(".") > 1}
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
        if note:  # said, because the file has more than is used: a user may think its interpreters carry on
            print(f"iared: {path} is a pruned checkpoint: taking its backbone ({len(sd)} tensors), ignoring its "
                  f"{len(rest)} interpreter(s)", file=sys.stderr)
    return sd


def load_backbone(checkpoint: str | os.PathLike | None = None, model: str | None = None, pretrained: bool = False,
                  overrides: dict | None = None, default: str | None = None, pruned_note: bool = True):
    """A backbone (:class:`VisionTransformer`, or a :class:`~iared.models.timesformer.TimeSformer`)
    from the command-line choices (module docstring).

    ``pruned_note``: say in one line that a pruned checkpoint's interpreters are ignored (False for
    callers that load those interpreters themselves, as ``compare`` does).

    ``default``: a registered name whose ``pretrained`` weights are used when nothing is given
    (``digits_vit``: the shipped backbone); None makes "nothing given" an error.
    """
    from iared.models import (
        MODEL_CONFIGS,
        VisionTransformer,
        ViTConfig,
        adapt_state_dict,
        create_model,
        split_model_name_tag,
    )
    from iared.models.families import checkpoint_kind
    from iared.models.hf import hf_weights_path
    from iared.models.timesformer import TIMESFORMER_CONFIGS

    overrides = dict(overrides or {})
    # timm's tagged names (deit_small_patch16_224.fb_in1k): the tag only picks a pretrained download
    name = split_model_name_tag(model)[0] if model is not None else None
    if model is not None and name not in MODEL_CONFIGS and name not in TIMESFORMER_CONFIGS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted([*MODEL_CONFIGS, *TIMESFORMER_CONFIGS]))}")
    if checkpoint is None:
        if model is None:
            if default is None:
                raise ValueError("no model given: pass --checkpoint FILE, or --model NAME --pretrained")
            return create_model(default, pretrained=True, **overrides)
        if not pretrained:
            raise ValueError(f"--model {model} without --checkpoint would be random weights; "
                             "add --pretrained (timm's download, or the shipped digits_vit) or --checkpoint FILE")
        return create_model(model, pretrained=True, **overrides)
    if pretrained:
        raise ValueError("--pretrained and --checkpoint exclude each other: which weights should be used?")
    obj = read_checkpoint(hf_weights_path(checkpoint))  # a transformers directory: its weights file
    kind = checkpoint_kind(obj)
    if kind == "transformers":
        return _load_hf(obj, checkpoint, name, overrides)
    if (name in TIMESFORMER_CONFIGS) or (model is None and _holds_timesformer(obj)):
        return _load_timesformer(obj, checkpoint, name, overrides, pruned_note)
    sd = _backbone_weights(obj, checkpoint, pruned_note)
    if model is not None:
        cfg = config_from_dict(ViTConfig, {**MODEL_CONFIGS[name], **overrides}, checkpoint, f"--model {model}")
    else:
        from iared.models.families import family_of_config

        saved = _file_model_config(obj)
        family = family_of_config(obj.get("config"), checkpoint)
        if family != "vit":
            raise CheckpointError(f"bad checkpoint {checkpoint}: holds a {family} backbone, which the commands "
                                  "do not load (ViT and TimeSformer only)")
        cfg = infer_vit_config(sd, checkpoint) if saved is None else config_from_dict(ViTConfig, saved, checkpoint,
                                                                                      "model")
        if overrides:
            cfg = config_from_dict(ViTConfig, {**cfg.to_dict(), **overrides}, checkpoint, "model + overrides")
    net = VisionTransformer(cfg)
    load_weights(net, adapt_state_dict(sd, cfg), checkpoint)
    return net


def _load_hf(obj: dict, path, model: str | None, overrides: dict):
    """A transformers ViT / DeiT: built as ``model`` (plus overrides), else as the ``config.json`` beside the
    weights, else with the geometry read off the mapped weights."""
    from iared.models import MODEL_CONFIGS, VisionTransformer, ViTConfig, adapt_state_dict
    from iared.models.hf import HF_ARCHITECTURES, architecture_of_keys, read_hf_checkpoint

    cfg, sd = read_hf_checkpoint(path, obj)
    if model is not None:
        cfg = config_from_dict(ViTConfig, {**MODEL_CONFIGS[model], **overrides}, path, f"--model {model}")
    else:
        if cfg is None:  # no config.json: the geometry off the weights, transformers' LayerNorm eps and heads
            inferred = infer_vit_config(sd, path).to_dict()
            inferred.update(norm_eps=1e-12, dist_head=HF_ARCHITECTURES[architecture_of_keys(obj)][2])
            cfg = config_from_dict(ViTConfig, inferred, path, "inferred model")
        if overrides:
            cfg = config_from_dict(ViTConfig, {**cfg.to_dict(), **overrides}, path, "model + overrides")
    net = VisionTransformer(cfg)
    load_weights(net, adapt_state_dict(sd, cfg), path)
    return net


def inflate_from_image(model, image: str | os.PathLike) -> list[str]:
    """Start the TimeSformer ``model`` from an image ViT (:func:`iared.models.timesformer.inflate_image_weights`):
    ``image`` is a weights file (safetensors, timm / iared state dict, a pruned checkpoint's backbone) or the
    name of a shipped backbone (``digits_natural_vit``). Returns the keys left at initialisation."""
    from iared.models import EMBEDDED_CHECKPOINTS, embedded_checkpoint_path
    from iared.models.timesformer import TimeSformer, inflate_image_weights

    if not isinstance(model, TimeSformer):
        raise ValueError(f"--init-image inflates an image ViT into a TimeSformer; {type(model).__name__} is not one")
    path = embedded_checkpoint_path(str(image)) if str(image) in EMBEDDED_CHECKPOINTS else Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"--init-image {image}: no such file (nor a shipped backbone: "
                                f"{', '.join(EMBEDDED_CHECKPOINTS)})")
    return inflate_image_weights(model, _backbone_weights(read_checkpoint(path), path), path)


def _holds_timesformer(obj: dict) -> bool:
    """A TimeSformer file: its config says so, or (no config) its weights have TimeSformer's keys
    (the official ``.pyth`` ``model_state``, ``time_embed``, ``temporal_attn``)."""
    from iared.models.families import family_of_config

    from iared.models.families import checkpoint_kind

    if isinstance(obj.get("config"), dict):
        try:
            return family_of_config(obj["config"]) == "timesformer"
        except CheckpointError:
            return False
    return checkpoint_kind(obj) == "timesformer"


def _load_timesformer(obj: dict, path, model: str | None, overrides: dict, pruned_note: bool = True):
    """A TimeSformer from a file: built as ``model`` (plus overrides), else as the file's saved config,
    else with the geometry read off the weights (:func:`iared.models.timesformer.config_from_state_dict`)."""
    from iared.models.timesformer import (
        TIMESFORMER_CONFIGS,
        TimeSformer,
        TimeSformerConfig,
        attention_type_of,
        config_from_state_dict,
        official_state_dict,
    )

    sd = official_state_dict({"model": _backbone_weights(obj, path, pruned_note)} if "model_state" not in obj else obj,
                             path)
    saved = _file_model_config(obj)
    if model is not None:
        cfg = config_from_dict(TimeSformerConfig, {**TIMESFORMER_CONFIGS[model], **overrides}, path, f"--model {model}")
    elif saved is not None:
        cfg = config_from_dict(TimeSformerConfig, {**saved, **overrides}, path, "model")
    else:
        try:
            cfg = config_from_state_dict(sd, **overrides)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise CheckpointError(f"bad checkpoint {path}: {' '.join(str(e).split())}") from None
    kind = attention_type_of(sd)
    if kind is not None and kind != cfg.attention_type:
        raise CheckpointError(f"bad checkpoint {path}: holds a {kind} TimeSformer, the model is "
                              f"{cfg.attention_type} (--model-override attention_type={kind})")
    net = TimeSformer(cfg)
    load_weights(net, sd, path)
    return net


def load_pruned_checked(path: str | os.PathLike, obj: dict | None = None):
    """:func:`iared.pruning.load_pruned` with every problem one line naming the file: the file is
    read and checked (non-finite tensors, unknown or invalid config keys) before a model is built."""
    from iared.models.families import backbone_families, family_of_config
    from iared.pruning import IARedConfig, load_pruned

    obj = read_checkpoint(path) if obj is None else obj
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if not is_pruned(obj) or "iared" not in config:
        raise CheckpointError(f"bad checkpoint {path}: not an IA-RED² checkpoint (no interpreters inside); "
                              "train one with `iared train-interpreters`, or give a backbone with --model")
    config_from_dict(backbone_families()[family_of_config(config, path)][1], config.get("model"), path, "model")
    config_from_dict(IARedConfig, config["iared"], path, "iared")
    try:
        return load_pruned(path)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"bad checkpoint {path}: invalid config: {' '.join(str(e).split())}") from None


class UntrainedError(ValueError):
    """A backbone given where trained interpreters are needed; the message is one line naming it."""


def load_iared(checkpoint: str | os.PathLike | None = None, model: str | None = None, pretrained: bool = False,
               overrides: dict | None = None, default: str | os.PathLike | None = None, iared_config=None,
               allow_untrained: bool = True):
    """An :class:`IARed`: a pruned checkpoint whole, or a backbone (:func:`load_backbone`'s rules)
    with fresh interpreters (``iared_config``, default :class:`IARedConfig()`).

    ``default``: a pruned checkpoint file used when nothing is given (the shipped one).
    ``allow_untrained=False``: a backbone is refused in one line (:class:`UntrainedError`) before it
    loads, for callers whose output would present fresh interpreters' random scores as the model's
    (``explain``'s heatmaps, ``export``'s keep decisions); timing and training start from them.
    """
    from iared.pruning import IARed, IARedConfig

    if checkpoint is None and model is None:
        if default is None:
            raise ValueError("no model given: pass --checkpoint FILE, or --model NAME --pretrained")
        if not Path(default).is_file():
            raise FileNotFoundError(f"no --checkpoint given and no shipped pruned model at {default}; pass "
                                    "--checkpoint PRUNED.pt (from `iared train-interpreters`) or --model NAME")
        checkpoint = default
    if checkpoint is not None and model is None:
        obj = read_checkpoint(checkpoint)
        if is_pruned(obj):
            if overrides or pretrained:
                raise ValueError(f"{checkpoint} is a pruned checkpoint: it carries its backbone, so --model-override "
                                 "and --pretrained do not apply")
            return load_pruned_checked(checkpoint, obj)
    if not allow_untrained:
        source = checkpoint if checkpoint is not None else f"--model {model}"
        raise UntrainedError(f"{source} is a backbone without interpreters: they would be freshly initialised "
                             "(untrained), their keep decisions random; give a pruned checkpoint (iared "
                             "train-interpreters) or pass --allow-untrained")
    backbone = load_backbone(checkpoint, model, pretrained, overrides)
    return IARed(backbone, iared_config or IARedConfig()).eval()


def check_labels_fit(dataset, num_classes: int, task: str, source: str = "the model") -> None:
    """One line, before any work, where ``dataset``'s labels do not fit a ``num_classes`` head: more
    labels than classes is an error (cross-entropy would end in an ``IndexError`` traceback, accuracy
    count nonsense); a folder with fewer classes than a non-ImageNet-folder head is a warning, its
    sorted folder names 0..n-1 are unlikely to be the head's first n classes."""
    from iared.data import TASKS

    base = getattr(dataset, "dataset", dataset)  # a Subset: the folder it cuts
    need = getattr(base, "num_classes", None)
    if need is None:
        return
    imagenet = getattr(base, "imagenet", False)
    what = "ImageNet class folders (standard 1000-class labels)" if imagenet else f"{need} classes"
    if need > num_classes:
        raise ValueError(f"--task {task}: {what}, but {source} has a {num_classes}-class head; give a checkpoint "
                         "trained on these classes")
    if need < num_classes and not imagenet and task not in TASKS:
        print(f"iared: --task {task}: {need} class folders read as labels 0..{need - 1} (sorted names) for "
              f"{source}'s {num_classes}-class head", file=sys.stderr)


def task_dataset(task: str, split: str, model_cfg=None, augment: bool = False, **task_kw):
    """The dataset a command means by ``--task``, matched to the model that will read it.

    A registered task (``digits-clutter``, ``moving-digits``; ``task_kw`` such as ``length`` / ``seed``
    go to it) is checked against the model's input shape here (``(C, H, W)`` images, or ``(T, C, H, W)``
    clips for a video model), so a mismatch is one line before any work. An image folder gets the
    model's image size, mean / std and input channels (timm's training transform with ``augment``, else
    the evaluation one); a video folder (:class:`iared.data.VideoFolder`) the model's ``num_frames``,
    ``img_size``, mean / std (random offsets, crops and flips with ``augment``). ``model_cfg`` None:
    the folder defaults.
    """
    from iared.data import TASKS, build_dataset, eval_transform, folder_media, split_folder, train_transform
    from iared.models.families import input_shape, is_video_config

    if task in TASKS:
        dataset = build_dataset(task, split, **task_kw)
        if model_cfg is not None and len(dataset):
            shape, want = tuple(dataset[0][0].shape), input_shape(model_cfg)
            if shape != want:
                layout = "TxCxHxW" if len(shape) == 4 else "CxHxW"
                raise ValueError(f"--task {task}: its inputs are {'x'.join(map(str, shape))} ({layout}) but the model "
                                 f"takes {'x'.join(map(str, want))}")
        return dataset
    if model_cfg is None:
        return build_dataset(task, split)
    root = Path(task).expanduser()
    folder = split_folder(root, split) if root.is_dir() else root
    video_model = is_video_config(model_cfg)
    if folder.is_dir() and (folder_media(folder) == "videos") != video_model:
        raise ValueError(f"--task {task}: a folder of {'videos' if not video_model else 'images'}, but the model "
                         f"takes {'clips' if video_model else 'images'}")
    if video_model:
        return build_dataset(task, split, num_frames=model_cfg.num_frames, img_size=model_cfg.img_size,
                             mean=model_cfg.mean, std=model_cfg.std, train=augment)
    make = train_transform if augment else eval_transform
    transform = make(model_cfg.img_size, mean=model_cfg.mean, std=model_cfg.std)
    return build_dataset(task, split, transform=transform, in_chans=model_cfg.in_chans)
