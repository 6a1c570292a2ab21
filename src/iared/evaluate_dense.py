"""``iared eval-dense``'s library side: segmentation quality, compute and speed of a dense model,
unpruned (mode ``all``) against IA-RED²-pruned (threshold mode), on the same images and clock.

GFLOPs are analytic MACs per image (:mod:`iared.flops`' convention) of the whole model: backbone,
interpreters (pruned) and the DPT head, which runs on the full grid in both. Throughput is timed
by :func:`iared.timing.time_interleaved` (the pruned model in the packed layout, as deployed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iared.dense import DenseModel, SegmentationTask, confusion_matrix, load_dense, scores_from_confusion
from iared.timing import machine_info, median_ms, time_interleaved

__all__ = ["evaluate_dense", "render_predictions", "segmentation_scores"]


def _batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


@torch.no_grad()
def segmentation_scores(model: DenseModel, dataset, *, threshold=0.5, device="cpu", batch_size: int = 128) -> dict:
    """mIoU, pixel accuracy and GFLOPs of the unpruned and the pruned model on ``dataset`` (items
    ``(image, target)``); the pruned side adds its kept fraction per stage."""
    model.eval()
    K = model.dpt_cfg.num_classes
    conf = {"unpruned": torch.zeros(K, K, dtype=torch.long), "pruned": torch.zeros(K, K, dtype=torch.long)}
    macs: dict[str, list[Tensor]] = {"unpruned": [], "pruned": []}
    kept = []
    for images, targets in _batches(dataset, batch_size):
        images, targets = images.to(device), targets.to(device)
        for name, mode in (("unpruned", "all"), ("pruned", "threshold")):
            out = model(images, mode, threshold=threshold, layout="padded")
            conf[name] += confusion_matrix(out.logits.argmax(1), targets, K)
            macs[name].append(out.macs.cpu())
            if name == "pruned":
                kept.append(out.kept_fraction().cpu())
    result: dict[str, Any] = {"n": len(dataset), "threshold": threshold}
    for name, counts in conf.items():
        result[name] = {**scores_from_confusion(counts), "gflops": float(torch.cat(macs[name]).mean()) / 1e9}
    result["pruned"]["kept_fraction"] = [round(float(v), 4) for v in torch.cat(kept).mean(0)]
    result["miou_loss_points"] = 100 * (result["unpruned"]["miou"] - result["pruned"]["miou"])
    return result


@torch.no_grad()
def throughput(model: DenseModel, images: Tensor, *, threshold=0.5, repeats: int = 7, clock: str = "wall") -> dict:
    """Images / s of the whole model (backbone + head), unpruned and pruned (packed), timed interleaved
    (``clock``: ``wall``, or ``cpu``: this process's CPU time, which on a shared machine with one
    thread counts only the work done)."""
    model.eval()
    runs = {"unpruned": lambda: model(images, "all"),
            "pruned": lambda: model(images, "threshold", threshold=threshold, layout="packed")}
    times = time_interleaved(runs, images.device, warmup=2, repeats=repeats, clock=clock)
    full, pruned = (len(images) * 1e3 / median_ms(times[n]) for n in ("unpruned", "pruned"))
    return {"batch_size": len(images), "threads": torch.get_num_threads(), "clock": clock,
            "ms_unpruned": median_ms(times["unpruned"]),
            "ms_pruned": median_ms(times["pruned"]), "throughput_unpruned": full, "throughput_pruned": pruned,
            "speedup": pruned / full}


def evaluate_dense(checkpoint, *, task: str = "digits-clutter", split: str = "test", limit: int | None = None,
                   threshold=None, throughput_batch: int = 64, repeats: int = 7, device: str = "cpu",
                   batch_size: int = 128, png_dir=None, png_count: int = 8, clock: str = "wall") -> dict:
    """The report of ``iared eval-dense``: scores, GFLOPs, speed at ``throughput_batch``, and with
    ``png_dir`` one PNG per image of the first ``png_count`` (image, truth, both predictions, kept tokens)."""
    from iared.loading import task_dataset
    from iared.reducers.base import check_threshold

    check_threshold(threshold)
    model = load_dense(checkpoint).to(device)
    threshold = model.reduced.inference.threshold if threshold is None else threshold
    kw = {"length": limit} if limit else {}
    data = SegmentationTask(task_dataset(task, split, model.backbone.cfg, **kw))
    report = {"checkpoint": str(checkpoint), "task": task, "split": split,
              **segmentation_scores(model, data, threshold=threshold, device=device, batch_size=batch_size)}
    n = min(throughput_batch, len(data))
    images = torch.stack([data[i % len(data)][0] for i in range(throughput_batch)]).to(device) if n else None
    if images is not None:
        report["throughput"] = throughput(model, images, threshold=threshold, repeats=repeats, clock=clock)
    report["gflops_head"] = model.head_macs / 1e9
    report["machine"] = machine_info(device)
    if png_dir is not None:
        report["pngs"] = [str(p) for p in render_predictions(model, data, png_dir, png_count, threshold, device)]
    return report


@torch.no_grad()
def render_predictions(model: DenseModel, data, out_dir, count: int, threshold=0.5, device="cpu") -> list[Path]:
    """One PNG per image: the image, the true mask, the unpruned prediction, the pruned prediction
    with the patches dropped by the last stage dimmed and hatched (``iared explain``'s convention)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from iared.explain.render import display_image, save_figure

    out_dir = Path(out_dir)
    cfg = model.backbone.cfg
    K = model.dpt_cfg.num_classes
    colors = ListedColormap(np.vstack([[0, 0, 0, 1], colormaps["tab10"](np.arange(K - 1) % 10)]))
    paths = []
    for i in range(min(count, len(data))):
        image, target = data[i]
        x = image[None].to(device)
        full = model(x, "all").logits.argmax(1)[0].cpu()
        out = model(x, "threshold", threshold=threshold, layout="packed")
        pred = out.logits.argmax(1)[0].cpu()
        kept = out.reduced.keep[-1][0, model.backbone.num_prefix_tokens:].cpu()
        fig = Figure(figsize=(8.8, 2.6))
        axes = fig.subplots(1, 4)
        pixels = display_image(image, cfg.mean, cfg.std)
        panels = [(pixels, "image", None), (target.numpy(), "truth", colors), (full.numpy(), "unpruned", colors),
                  (pred.numpy(), f"pruned: {int(kept.sum())}/{kept.numel()} kept", colors)]
        for ax, (panel, title, cmap) in zip(axes, panels):
            ax.imshow(panel, cmap=cmap or ("gray" if panel.ndim == 2 else None), vmin=0,
                      vmax=(K - 1) if cmap is not None else 1, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        grid_w, p = cfg.grid_size, cfg.patch_size
        for idx in torch.nonzero(~kept).flatten().tolist():
            r, c = divmod(idx, grid_w)
            axes[3].add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, facecolor=(1, 1, 1, 0.25),
                                        hatch="///", edgecolor=(1, 1, 1, 0.5), linewidth=0))
        paths.append(save_figure(fig, out_dir / f"dense_{i:03d}.png"))
    return paths
