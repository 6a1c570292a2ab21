"""Pictures of explanations: per-image panels and the evaluation's bar chart.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend state; PNGs
go through Agg) and written atomically: a temporary file beside the target, then ``os.replace``,
so an interrupted run never leaves half a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["bar_chart", "display_image", "render_panel", "render_video", "save_figure"]


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, default png) through the one atomic writer."""
    from iared.files import save_figure as write_figure

    return write_figure(fig, path, dpi=dpi, bbox_inches="tight")


def display_image(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A model input ``(C, H, W)`` back to pixels: ``(H, W)`` (one channel) or ``(H, W, 3)`` in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def _show(ax, pixels: np.ndarray, **kw):
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1, **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def render_panel(path, pixels: np.ndarray, keep: Sequence[Tensor], heatmaps: Mapping[str, Tensor], *,
                 patch_size: int, title: str = "", dpi: int = 100) -> Path:
    """One PNG per image: the image, the patches kept at each stage, each method's heatmap.

    pixels: ``(H, W)`` or ``(H, W, 3)`` in [0, 1]; keep: per stage a ``(h*w,)`` bool of the patch
    tokens alive after that stage (prefix tokens removed; stages numbered from 0 like
    ``interpreter:g``); heatmaps: ``{name: (H, W)}`` in [0, 1], drawn over the grayscale image.
    Dropped patches are dimmed and hatched.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    top = 1 + len(keep)
    ncols = max(top, len(heatmaps), 1)
    nrows = 2 if heatmaps else 1
    fig = Figure(figsize=(2.2 * ncols, 2.4 * nrows + (0.4 if title else 0)))
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    ax = axes[0, 0]
    ax.set_axis_on()
    _show(ax, pixels)
    ax.set_title("image", fontsize=9)
    grid_w = pixels.shape[1] // patch_size
    for stage, kept in enumerate(keep):
        kept = kept.detach().cpu().bool()
        dim = np.kron((~kept).view(-1, grid_w).numpy(), np.ones((patch_size, patch_size), bool))
        shown = np.where(dim if pixels.ndim == 2 else dim[..., None], 0.25 * pixels, pixels)
        ax = axes[0, 1 + stage]
        ax.set_axis_on()
        _show(ax, shown)
        for idx in torch.nonzero(~kept).flatten().tolist():
            r, c = divmod(idx, grid_w)
            ax.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                   fill=False, hatch="///", edgecolor=(1, 1, 1, 0.35), linewidth=0))
        ax.set_title(f"after stage {stage}: {int(kept.sum())}/{kept.numel()} kept", fontsize=9)
    gray = pixels if pixels.ndim == 2 else pixels.mean(-1)
    for i, (name, heat) in enumerate(heatmaps.items()):
        ax = axes[1, i]
        ax.set_axis_on()
        _show(ax, gray)
        ax.imshow(heat.detach().float().cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=dpi)


def render_video(png_path, gif_path, frames: np.ndarray, keep: Sequence[Tensor], heatmaps: Mapping[str, Tensor], *,
                 patch_size: int, title: str = "", scale: int = 4, fps: float = 4.0, dpi: int = 100
                 ) -> tuple[Path, Path]:
    """A clip's explanation: a PNG strip and an animated GIF.

    frames: ``(T, H, W)`` or ``(T, H, W, 3)`` in [0, 1]; keep: per stage a ``(T*h*w,)`` bool of the patch
    tokens alive after that stage (prefix removed, frame-major); heatmaps: ``{name: (T, H, W)}`` in [0, 1].
    The PNG has one column per frame and one row each for the frames, the tokens kept after every
    stage (dropped patches dimmed and hatched) and every heatmap (over the grayscale frame). The GIF
    shows, frame after frame, the frame, the tokens kept after the last stage and each heatmap side by
    side (``scale`` x nearest-neighbour upsampling, ``fps`` frames per second; Pillow, written atomically).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    from iared.files import write_atomic

    T, W = frames.shape[0], frames.shape[2]
    grid_w = W // patch_size
    rgb = frames if frames.ndim == 4 else np.repeat(frames[..., None], 3, axis=-1)
    gray = rgb.mean(-1)
    kept = [k.detach().cpu().bool().reshape(T, -1, grid_w).numpy() for k in keep]
    heat = {name: h.detach().float().cpu().numpy() for name, h in heatmaps.items()}

    def dimmed(t: int, stage_keep: np.ndarray) -> np.ndarray:
        dim = np.kron(~stage_keep[t], np.ones((patch_size, patch_size), bool))
        return np.where(dim[..., None], 0.25 * rgb[t], rgb[t])

    jet = colormaps["jet"]

    def overlay(t: int, h: np.ndarray) -> np.ndarray:
        return 0.5 * np.repeat(gray[t][..., None], 3, axis=-1) + 0.5 * jet(h[t])[..., :3]

    rows = 1 + len(kept) + len(heat)
    fig = Figure(figsize=(1.6 * T + 1.2, 1.7 * rows + (0.4 if title else 0)))
    axes = np.asarray(fig.subplots(rows, T, squeeze=False))
    labels = ["frames"] + [f"kept after stage {g}" for g in range(len(kept))] + list(heat)
    for t in range(T):
        pictures = [rgb[t]] + [dimmed(t, k) for k in kept] + [overlay(t, h) for h in heat.values()]
        for r, pic in enumerate(pictures):
            ax = axes[r, t]
            _show(ax, np.clip(pic, 0, 1))
            if 1 <= r <= len(kept):
                for idx in np.flatnonzero(~kept[r - 1][t]).tolist():
                    rr, cc = divmod(idx, grid_w)
                    ax.add_patch(Rectangle((cc * patch_size - 0.5, rr * patch_size - 0.5), patch_size, patch_size,
                                           fill=False, hatch="///", edgecolor=(1, 1, 1, 0.35), linewidth=0))
                ax.set_title(f"{int(kept[r - 1][t].sum())}/{kept[r - 1][t].size}", fontsize=7)
            elif r == 0:
                ax.set_title(f"frame {t}", fontsize=8)
            if t == 0:
                ax.set_ylabel(labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    png = save_figure(fig, png_path, dpi=dpi)

    tiles_per_frame = []
    for t in range(T):
        tiles = [rgb[t]] + ([dimmed(t, kept[-1])] if kept else []) + [overlay(t, h) for h in heat.values()]
        row = np.concatenate([np.pad(np.clip(x, 0, 1), ((0, 0), (0, 1), (0, 0)), constant_values=1.0)
                              for x in tiles], axis=1)
        row = np.kron(row, np.ones((scale, scale, 1)))
        tiles_per_frame.append(Image.fromarray((row * 255).round().astype(np.uint8)))
    duration = round(1000 / fps)
    gif = write_atomic(gif_path, lambda f: tiles_per_frame[0].save(
        f, format="GIF", save_all=True, append_images=tiles_per_frame[1:], duration=duration, loop=0))
    return png, gif


def bar_chart(results: dict, path, metrics: Sequence[str] = ("pixel_accuracy", "miou", "map", "pointing",
                                                               "deletion", "insertion")) -> Path:
    """Grouped bars: one group per metric, one bar per method (``evaluate_explanations`` output)."""
    from matplotlib.figure import Figure

    methods = list(results["methods"])
    fig = Figure(figsize=(3.0 + 1.3 * len(metrics), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(metrics))
    for i, name in enumerate(methods):
        values = [results["methods"][name].get(m) for m in metrics]
        values = [np.nan if v is None else float(v) for v in values]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=name)
    labels = {"pixel_accuracy": "pixel acc", "miou": "mIoU", "map": "mAP", "pointing": "pointing",
              "deletion": "deletion (lower=better)", "insertion": "insertion"}
    ax.set_xticks(x, [labels.get(m, m) for m in metrics], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"explanations on {results.get('data', 'data')} (n={results['n']})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=120)
