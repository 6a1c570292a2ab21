"""How good is a heatmap: agreement with a ground-truth mask, and causal effect on the model.

Heatmaps are ``(B, H, W)`` in [0, 1] at image resolution (what :mod:`iared.explain.methods`
returns); masks are ``(B, H, W)`` bool, True on the object.

Segmentation, the ImageNet-Segmentation protocol of Chefer et al. (``imagenet_seg_eval.py`` of
"Transformer Interpretability Beyond Attention Visualization", CVPR 2021):

- the heatmap is binarised at its own mean (``map > mean(map)``);
- pixel accuracy = correct pixels / all pixels, summed over the whole set;
- mIoU = mean over the two classes {background, foreground} of intersection / union, each
  summed over the whole set before dividing;
- mAP = mean over images of the average precision of the soft map, computed as their
  ``get_ap_scores`` does: one AP over the 2 x H x W (score, label) pairs formed by the
  foreground channel (score = map, label = mask) and the background channel (score = 1 - map,
  label = not mask). ``ap_foreground`` (mean over images of the AP of the map against the mask
  alone, images without foreground skipped) is reported beside it.

Degenerate masks: an image whose mask is all background or all object has no boundary for a map
to find. Its AP would score only one channel (an all-zero mask gives any map an mAP near 1), so
such images are left out of ``map`` / ``ap_foreground`` (and of the pointing game, which needs
an object); when every mask of the set is all-zero (or all-one), ``miou``, the per-class IoUs,
``map``, ``ap_foreground`` and ``pointing`` are undefined: NaN here, ``null`` in JSON, with an
:class:`UndefinedMetricWarning` saying why.

Pointing game (Zhang et al., 2016): a hit when the heatmap's maximum (first in raster order on
ties) lies within ``tolerance`` pixels (Euclidean) of a mask pixel; images without any mask
pixel are left out of the hit rate.

Deletion / insertion (RISE, Petsiuk et al., BMVC 2018): pixels are ranked by the heatmap (ties
in raster order); in ``steps`` equal steps the top-ranked pixels are replaced by a baseline
(deletion, starting from the image) or restored onto the baseline (insertion, starting from the
baseline); the target-class softmax probability after each step, ``steps + 1`` points on [0, 1],
is integrated with the trapezoidal rule. Lower deletion and higher insertion AUC are better.
Baselines as in RISE by default (``baseline="rise"``): zeros for deletion, a Gaussian blur of
the image for insertion; ``"zero"`` / ``"blur"`` / a tensor use one baseline for both. Zeros
are taken in the classifier's input space (for a normalised input: the dataset mean colour).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BASELINES",
    "SegmentationMeter",
    "UndefinedMetricWarning",
    "auc",
    "average_precision",
    "binarize",
    "blur",
    "causal_curves",
    "deletion_insertion",
    "pointing_game",
    "pooled_miou",
    "protocol_ap",
    "segmentation_stats",
]


# -- segmentation -----------------------------------------------------------------------------


class UndefinedMetricWarning(UserWarning):
    """A metric that the masks cannot define (all background / all object); reported as NaN."""



def binarize(heatmaps: Tensor) -> Tensor:
    """``(B, H, W)`` -> bool, True where the map exceeds its own per-image mean."""
    return heatmaps > heatmaps.mean(dim=(-2, -1), keepdim=True)


def average_precision(scores, labels) -> float:
    """Average precision of ``scores`` ranking the True entries of ``labels`` (any shape):
    ``sklearn.metrics.average_precision_score`` (tied scores form one threshold). NaN when
    ``labels`` holds no positive (sklearn would warn and return a meaningless value)."""
    from sklearn.metrics import average_precision_score

    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"average_precision: {s.shape[0]} scores but {y.shape[0]} labels")
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, s))


def protocol_ap(heatmap, mask) -> float:
    """AP of one soft map as in Chefer et al.'s evaluation: foreground scored by the map and
    background by ``1 - map`` (map in [0, 1]), pooled into one ranking. Never NaN for a
    non-empty image: background pixels are positives of the second channel."""
    h = np.asarray(heatmap, dtype=np.float64).ravel()
    m = np.asarray(mask, dtype=bool).ravel()
    return average_precision(np.concatenate([1.0 - h, h]), np.concatenate([~m, m]))


def segmentation_stats(heatmaps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Per-image counts for the segmentation protocol.

    Returns ``correct`` ``(B,)`` (pixels where binarised map == mask), ``pixels`` ``(B,)``,
    ``intersection`` / ``union`` ``(B, 2)`` for [background, foreground], ``ap`` ``(B,)``
    (:func:`protocol_ap`) and ``ap_foreground`` ``(B,)`` (NaN without foreground).
    """
    if heatmaps.shape != masks.shape:
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} and masks {tuple(masks.shape)} differ in shape")
    pred = binarize(heatmaps).flatten(1)
    gt = masks.bool().flatten(1)
    correct = (pred == gt).sum(1)
    inter = torch.stack([(~pred & ~gt).sum(1), (pred & gt).sum(1)], dim=1)
    union = torch.stack([(~pred | ~gt).sum(1), (pred | gt).sum(1)], dim=1)
    h, g = heatmaps.detach().float().flatten(1).cpu().numpy(), gt.cpu().numpy()
    ap = torch.tensor([protocol_ap(h[i], g[i]) for i in range(len(h))], dtype=torch.float64)
    ap_fg = torch.tensor([average_precision(h[i], g[i]) for i in range(len(h))], dtype=torch.float64)
    pixels = torch.full_like(correct, gt.shape[1])
    return {"correct": correct.cpu(), "pixels": pixels.cpu(), "intersection": inter.cpu(),
            "union": union.cpu(), "ap": ap, "ap_foreground": ap_fg}


class SegmentationMeter:
    """Accumulates :func:`segmentation_stats` (and pointing-game hits) over batches.

    ``compute()`` -> ``pixel_accuracy``, ``miou``, ``iou_background``, ``iou_foreground`` (set
    totals, as Chefer et al.), ``map`` (mean of per-image :func:`protocol_ap`),
    ``ap_foreground`` (mean of per-image foreground AP, images without foreground skipped),
    ``pointing`` (hit rate over images with foreground) and ``n``.
    """

    def __init__(self, tolerance: float = 0.0):
        self.tolerance = tolerance
        self.correct = self.pixels = 0
        self.intersection = torch.zeros(2, dtype=torch.float64)
        self.union = torch.zeros(2, dtype=torch.float64)
        self.ap: list[Tensor] = []
        self.ap_fg: list[Tensor] = []
        self.hits: list[Tensor] = []
        self.image_intersection: list[Tensor] = []  # (B, 2) per batch: what a bootstrap over images resamples
        self.image_union: list[Tensor] = []
        self.foreground = 0  # object pixels over the set
        self.degenerate = 0  # images whose mask is all background or all object

    def update(self, heatmaps: Tensor, masks: Tensor) -> dict[str, Tensor]:
        stats = segmentation_stats(heatmaps, masks)
        fg = masks.flatten(1).sum(1).cpu()
        degenerate = (fg == 0) | (fg == masks[0].numel())
        stats["ap"] = stats["ap"].masked_fill(degenerate, float("nan"))  # scores one channel only
        self.foreground += int(fg.sum())
        self.degenerate += int(degenerate.sum())
        self.correct += int(stats["correct"].sum())
        self.pixels += int(stats["pixels"].sum())
        self.intersection += stats["intersection"].sum(0).double()
        self.union += stats["union"].sum(0).double()
        self.image_intersection.append(stats["intersection"].double())
        self.image_union.append(stats["union"].double())
        self.ap.append(stats["ap"])
        self.ap_fg.append(stats["ap_foreground"])
        stats["pointing"] = pointing_game(heatmaps, masks, self.tolerance).cpu()
        has_object = masks.flatten(1).any(1).cpu()
        self.hits.append(stats["pointing"][has_object])
        return stats

    def per_image(self) -> dict[str, Tensor]:
        """Every image's share of the set metrics, for intervals over images: ``intersection`` /
        ``union`` ``(n, 2)`` (mIoU is the ratio of their sums, :func:`pooled_miou`), ``ap`` and
        ``ap_foreground`` ``(n,)`` (NaN where the image is left out of the mean)."""
        def cat(parts, *shape):
            return torch.cat(parts) if parts else torch.zeros(0, *shape, dtype=torch.float64)

        return {"intersection": cat(self.image_intersection, 2), "union": cat(self.image_union, 2),
                "ap": cat(self.ap).double(), "ap_foreground": cat(self.ap_fg).double()}

    def compute(self) -> dict[str, float]:
        iou = self.intersection / self.union.clamp_min(1)

        def mean(parts: list[Tensor]) -> float:
            values = torch.cat(parts) if parts else torch.zeros(0)
            values = values[~values.double().isnan()].double()
            return float(values.mean()) if len(values) else float("nan")

        result = {
            "pixel_accuracy": self.correct / max(self.pixels, 1),
            "miou": float(iou.mean()),
            "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]),
            "map": mean(self.ap),
            "ap_foreground": mean(self.ap_fg),
            "pointing": mean([h.double() for h in self.hits]),
            "n": int(sum(len(a) for a in self.ap)),
        }
        if self.pixels and self.foreground in (0, self.pixels):
            what = "background" if self.foreground == 0 else "object"
            warnings.warn(f"every mask is all {what}: mIoU, IoU, mAP and pointing are undefined (reported as NaN)",
                          UndefinedMetricWarning, stacklevel=2)
            for key in ("miou", "iou_background", "iou_foreground", "map", "ap_foreground", "pointing"):
                result[key] = float("nan")
        elif self.degenerate:
            warnings.warn(f"{self.degenerate} of {result['n']} masks are all background or all object: left out of "
                          "mAP and the pointing game", UndefinedMetricWarning, stacklevel=2)
        return result


def pooled_miou(intersection: Tensor, union: Tensor) -> Tensor:
    """mIoU as :class:`SegmentationMeter` computes it, from per-image counts ``(..., n, 2)`` (resamples
    of the set in the leading dimensions): per class, summed intersection / summed union; mean of the
    two classes. Returns ``(...)``."""
    return (intersection.sum(-2) / union.sum(-2).clamp_min(1)).mean(-1)


def pointing_game(heatmaps: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    """``(B,)`` bool: the heatmap's argmax pixel lies within ``tolerance`` px of the mask."""
    if heatmaps.shape != masks.shape:
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} and masks {tuple(masks.shape)} differ in shape")
    B, H, W = heatmaps.shape
    peak = heatmaps.flatten(1).argmax(1)
    py, px = (peak // W).view(B, 1, 1).float(), (peak % W).view(B, 1, 1).float()
    ys = torch.arange(H, device=heatmaps.device).view(1, H, 1).float()
    xs = torch.arange(W, device=heatmaps.device).view(1, 1, W).float()
    dist2 = (ys - py) ** 2 + (xs - px) ** 2
    near = dist2 <= float(tolerance) ** 2
    return (near & masks.bool().to(heatmaps.device)).flatten(1).any(1)


# -- deletion / insertion ---------------------------------------------------------------------


def blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Gaussian blur (torchvision's, reflect padding) of ``(B, C, H, W)``: RISE's insertion baseline.
    On images smaller than the kernel, the kernel shrinks to what reflect padding allows."""
    from torchvision.transforms.functional import gaussian_blur

    radius = min(kernel_size // 2, images.shape[-1] - 1, images.shape[-2] - 1)
    if radius < 1:
        return images
    return gaussian_blur(images, [2 * radius + 1] * 2, [sigma, sigma])


BASELINES = ("rise", "zero", "blur")


def _baseline_images(images: Tensor, baseline, kind: str) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline.to(images).expand_as(images)
    if baseline == "rise":
        baseline = "zero" if kind == "deletion" else "blur"
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "blur":
        return blur(images)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)} or a tensor, got {baseline!r}")


@torch.no_grad()
def causal_curves(classifier: Callable[[Tensor], Tensor], images: Tensor, heatmaps: Tensor, target,
                  *, steps: int = 16, baseline="rise", kinds=("deletion", "insertion")) -> dict[str, Tensor]:
    """Target-class probability curves ``(B, steps + 1)`` for each of ``kinds``.

    classifier: ``images -> logits``; images ``(B, C, H, W)`` as the classifier takes them;
    heatmaps ``(B, H, W)``; target ``(B,)`` class indices; baseline ``"rise"`` (zero for
    deletion, blur for insertion), ``"zero"``, ``"blur"`` or a tensor broadcastable to
    ``images`` (in the classifier's input space). Point k has ``round(k * H * W / steps)``
    pixels deleted / inserted; one batched forward per point.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    B, _, H, W = images.shape
    if heatmaps.shape != (B, H, W):
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} do not match images {tuple(images.shape)}")
    for kind in kinds:
        if kind not in ("deletion", "insertion"):
            raise ValueError(f"unknown causal metric {kind!r}: expected 'deletion' or 'insertion'")
    target = torch.as_tensor(target, device=images.device).long().reshape(-1)
    if target.numel() == 1:
        target = target.expand(B)
    target = target.reshape(B, 1)
    order = heatmaps.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(H * W, device=order.device).expand(B, -1))
    rank = rank.view(B, 1, H, W)

    def prob(x: Tensor) -> Tensor:
        return classifier(x).float().softmax(-1).gather(1, target)[:, 0]

    p_image = prob(images)
    curves = {}
    for kind in kinds:
        base = _baseline_images(images, baseline, kind)
        p_base = prob(base)
        probs = [p_image if kind == "deletion" else p_base]
        for k in range(1, steps):
            top = rank < round(k * H * W / steps)  # the first k/steps of the pixels in heatmap order
            x = torch.where(top, base, images) if kind == "deletion" else torch.where(top, images, base)
            probs.append(prob(x))
        probs.append(p_base if kind == "deletion" else p_image)
        curves[kind] = torch.stack(probs, 1)
    return curves


def auc(curves: Tensor) -> Tensor:
    """Trapezoidal area under ``(B, K + 1)`` curves sampled evenly on [0, 1] -> ``(B,)``."""
    K = curves.shape[1] - 1
    if K < 1:
        raise ValueError("auc needs at least two points per curve")
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * K)


def deletion_insertion(classifier, images, heatmaps, target, *, steps: int = 16, baseline="rise") -> dict[str, Tensor]:
    """``{"deletion": (B,), "insertion": (B,)}`` AUCs (see :func:`causal_curves`)."""
    curves = causal_curves(classifier, images, heatmaps, target, steps=steps, baseline=baseline)
    return {kind: auc(c) for kind, c in curves.items()}
