"""Dense prediction on an IA-RED²-pruned ViT: the stage loop + a DPT head, its task, metrics and evaluation.

:class:`DenseModel` runs :class:`iared.stages.ReducedModel` (an :class:`iared.pruning.IARed`: the
pruned model in ``threshold`` mode, the unpruned one in mode ``all``) and asks it for the token
features of the blocks its :class:`iared.heads.dpt.DPTHead` reads, dropped tokens restored from
their last features (see :mod:`iared.heads.dpt`). Its output has the stage loop's fields
(``macs`` now including the head), so the interpreter trainer runs on it unchanged.

The dense task of the embedded data: every pixel of a ``digits-clutter`` canvas is background (0)
or the digit's class (``1 + label``) where the digit's ink is (the dataset's mask); clutter is
background. 11 classes.

Metrics: mean IoU over the classes that occur (in the ground truth or the prediction) and pixel
accuracy, from one confusion matrix over all evaluated pixels; :func:`image_miou` is the
per-image mIoU that rewards the interpreters of a dense model (:func:`iared.rl.segmentation_reward`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iared.heads.dpt import DPTConfig, DPTHead, head_macs
from iared.stages import ReducedModel, ReducedOutput

__all__ = ["DENSE_FORMAT", "DenseModel", "DenseOutput", "SegmentationTask", "confusion_matrix", "image_miou",
           "load_dense", "save_dense", "scores_from_confusion", "segmentation_target"]

DENSE_FORMAT = "iared-dense/1"


def segmentation_target(label: int, mask: Tensor) -> Tensor:
    """``(H, W)`` long: 0 where ``mask`` is False (background, clutter), ``1 + label`` on the digit."""
    return mask.long() * (1 + int(label))


class SegmentationTask(torch.utils.data.Dataset):
    """A task with items ``(image, label, mask)`` as ``(image, target)`` (:func:`segmentation_target`)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.num_classes = 1 + dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, label, mask = self.dataset[i][:3]
        return image, segmentation_target(label, mask)


@dataclass
class DenseOutput:
    """``logits``: ``(B, classes, H, W)`` at the input size; ``reduced``: the stage loop's output
    (scores, keep masks, log-probabilities); ``macs``: ``(B,)`` backbone + reducers + head."""

    logits: Tensor
    reduced: ReducedOutput
    macs: Tensor

    @property
    def log_prob(self) -> Tensor | None:
        return self.reduced.log_prob

    @property
    def gflops(self) -> Tensor:
        return self.macs / 1e9

    def kept_fraction(self) -> Tensor:
        return self.reduced.kept_fraction()


class DenseModel(nn.Module):
    """A reduced model (backbone + reducers) and a DPT head on the blocks ``dpt_cfg.depths``."""

    def __init__(self, reduced: ReducedModel, dpt_cfg: DPTConfig):
        super().__init__()
        backbone = reduced.backbone
        self.reduced = reduced
        self.dpt_cfg = dpt_cfg
        self.depths = dpt_cfg.resolved_depths(len(backbone.blocks))
        self.dpt = DPTHead(backbone.token_dim, dpt_cfg)
        self.image_size = backbone.cfg.img_size
        self.head_macs = head_macs(self.dpt, backbone.token_dim, backbone.token_grid, backbone.num_prefix_tokens,
                                   self.image_size)

    # what the interpreter trainer reads off an IARed
    @property
    def backbone(self):
        return self.reduced.backbone

    @property
    def interpreters(self) -> nn.ModuleList:
        return self.reduced.reducers

    @property
    def num_stages(self) -> int:
        return self.reduced.num_stages

    def config_dict(self) -> dict:
        return self.reduced.config_dict()

    def full_macs(self) -> float:
        """MACs per image of the unpruned model: backbone and head."""
        return self.reduced.full_macs() + self.head_macs

    def forward(self, images: Tensor, mode="threshold", **kw) -> DenseOutput:
        """``images`` ``(B, C, H, W)``; ``mode`` and ``kw`` as :meth:`ReducedModel.forward` (mode
        ``all``: the unpruned model)."""
        out = self.reduced(images, mode, features_at=self.depths, **kw)
        backbone = self.reduced.backbone
        logits = self.dpt(out.features, backbone.token_grid, backbone.num_prefix_tokens, images)
        return DenseOutput(logits, out, out.macs + self.head_macs)


# -- checkpoints ------------------------------------------------------------------------------------

def save_dense(model: DenseModel, path, extra: dict | None = None, threshold: float | list[float] | None = None) -> Path:
    """Backbone, interpreters, head and every config in one file, written atomically."""
    from iared.checkpoint import save_atomic

    reduced = model.reduced
    inference = asdict(reduced.inference) if hasattr(reduced, "inference") else {}
    if threshold is not None:
        inference["threshold"] = threshold
    config = {"model": reduced.backbone.cfg.to_dict(), "iared": reduced.config_dict(), "dpt": model.dpt_cfg.to_dict(),
              "inference": inference, **(extra or {})}
    return save_atomic({"format": DENSE_FORMAT, "model": model.state_dict(), "config": config}, path)


def load_dense(path: str | os.PathLike) -> DenseModel:
    """A :class:`DenseModel` from :func:`save_dense`'s file, or the final state of ``iared train-dense``
    (its ``checkpoint.pt``); every problem is one :class:`iared.checkpoint.CheckpointError` line."""
    from iared.checkpoint import (
        CheckpointError,
        config_from_dict,
        extract_state_dict,
        load_weights,
        read_checkpoint,
    )
    from iared.models.vit import VisionTransformer, ViTConfig
    from iared.pruning import IARed, IARedConfig, InferenceSettings

    obj = read_checkpoint(path)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if obj.get("format") == "iared-train/1" and isinstance(config.get("model"), dict):
        config = {**config["model"], "inference": config.get("inference", {})}  # train-dense's training state
    elif obj.get("format") != DENSE_FORMAT:
        raise CheckpointError(f"bad checkpoint {path}: not a dense (DPT) checkpoint (format "
                              f"{obj.get('format')!r}); train one with `iared train-dense`")
    missing = [k for k in ("model", "iared", "dpt") if not isinstance(config.get(k), dict)]
    if missing:
        raise CheckpointError(f"bad checkpoint {path}: config lacks {missing}")
    vit_cfg = config_from_dict(ViTConfig, config["model"], path, "model")
    iared_cfg = config_from_dict(IARedConfig, config["iared"], path, "iared")
    dpt_cfg = config_from_dict(DPTConfig, config["dpt"], path, "dpt")
    try:
        reduced = IARed(VisionTransformer(vit_cfg), iared_cfg)
        reduced.inference = InferenceSettings(**(config.get("inference") or {}))
        model = DenseModel(reduced, dpt_cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad checkpoint {path}: invalid config: {' '.join(str(e).split())}") from None
    load_weights(model, extract_state_dict(obj, path), path)
    return model.eval()


# -- metrics ----------------------------------------------------------------------------------------

def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` int64 counts, rows = ground truth, columns = prediction, over all pixels given."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def scores_from_confusion(confusion: Tensor) -> dict[str, Any]:
    """mIoU over the classes that occur (ground truth or prediction), pixel accuracy, per-class IoU."""
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return {"miou": float(iou[present].mean()), "pixel_accuracy": float(tp.sum() / c.sum().clamp_min(1)),
            "iou_per_class": [None if torch.isnan(v) else round(float(v), 4) for v in iou]}


def image_miou(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(B,)`` each image's mIoU over the classes in its ground truth or its prediction."""
    B = pred.shape[0]
    onehot_p = F.one_hot(pred.reshape(B, -1), num_classes).bool()
    onehot_t = F.one_hot(target.reshape(B, -1).long(), num_classes).bool()
    inter = (onehot_p & onehot_t).sum(1).double()
    union = (onehot_p | onehot_t).sum(1).double()
    present = union > 0
    iou = torch.where(present, inter / union.clamp_min(1), torch.zeros_like(inter))
    return iou.sum(1) / present.sum(1).clamp_min(1)
