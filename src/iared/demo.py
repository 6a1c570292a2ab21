"""``iared demo``: the whole IA-RED² story on an embedded task, offline, in a few minutes on a CPU.

1. the project's backbone for the task (shipped with the package; ``digits-natural`` by default,
   ``--task digits-clutter`` for the black-background task, ``--task moving-digits`` for video),
2. interpreters trained by reward, stage by stage (:mod:`iared.train.interpreters`),
3. the operating threshold chosen on the validation split: the cheapest within ``max_loss`` points of
   the unpruned model (:func:`iared.operating_point.choose_threshold`; recorded in the checkpoint),
4. evaluation on the test split, once, at that threshold: accuracy, kept tokens, GFLOPs, measured throughput,
5. ``results.json``, a table on the terminal, pictures of what each stage kept (on video a PNG strip
   and an animated GIF per clip), and the accuracy-against-throughput plot (thresholds
   ``CURVE_THRESHOLDS``, one interleaved timing run, at ``THROUGHPUT_BATCH`` images or clips).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from iared.files import check_output_dir, save_figure, write_json
from iared.measure import accuracy_and_compute, accuracy_throughput_curve, compare_throughput
from iared.pruning import IARed
from iared.timing import machine_info
from iared.train.interpreters import InterpreterTrainConfig, build_model, load_split, train_from_config

NUM_PICTURES = 16
# Interpreters alone cost accuracy (about 1 point on 500 validation images at -71 % FLOPs); 300
# distillation steps under the learned policy (about a minute on 2 cores) bring the test loss to
# 0.5 points (README, "Measured results").
DEMO_FINETUNE_STEPS = 300
# Per task: (REINFORCE steps per stage, fine-tuning steps); tau per task is iared.train.interpreters.TASK_TAU.
# digits-natural: 300 steps per stage without fine-tuning fits the demo in about 10 minutes on 2 cores.
# moving-digits: REINFORCE on 288 space-time tokens per clip costs about 5x an image step on 2 cores.
DEMO_SCHEDULES = {"digits-natural": (300, 0), "digits-clutter": (500, DEMO_FINETUNE_STEPS), "moving-digits": (200, 0)}
# the batch the demo times at: 64 images, or 8 clips (what #13's target is stated at)
THROUGHPUT_BATCH = {"moving-digits": 8}
NUM_CLIP_PICTURES = 4
# thresholds of the accuracy-against-throughput plot (the run's own threshold is added)
CURVE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
# the demo's operating point: the cheapest threshold within this many points of the unpruned top-1 on
# validation (the target the README states), chosen on DEMO_VAL_SAMPLES validation inputs
DEMO_MAX_LOSS = 0.5
DEMO_VAL_SAMPLES = {"moving-digits": 300}  # else 1000 images


def mask_score_contrast(model: IARed, images: Tensor, masks: Tensor, threshold: float) -> dict:
    """Mean first-stage interpreter score on patches inside the digit mask vs outside it."""
    from iared.data import patch_foreground

    with torch.no_grad():
        out = model(images, threshold=threshold)
    scores = out.scores[0][:, out.num_prefix:]
    # image masks (B, H, W) or clip masks (B, T, H, W): patches frame-major, as the tokens
    inside = patch_foreground(masks, model.backbone.cfg.patch_size).reshape(scores.shape)
    return {"score_inside_mask": float(scores[inside].mean()), "score_outside_mask": float(scores[~inside].mean())}


def combined_heatmap(scores: list[Tensor | None], num_prefix: int, grid: int) -> Tensor:
    """``(B, grid, grid)``: mean over stages of the interpreter scores (0 where already dropped)."""
    stacked = torch.stack([s[:, num_prefix:] for s in scores if s is not None])
    return stacked.mean(0).reshape(-1, grid, grid)


def save_pictures(model: IARed, images: Tensor, labels: Tensor, out_dir: Path, threshold: float) -> list[str]:
    """One PNG per image: the input, the patches alive after each stage, the interpreter heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = model.backbone.cfg
    grid, patch = cfg.grid_size, cfg.patch_size
    with torch.no_grad():
        out = model(images, threshold=threshold)
    heat = combined_heatmap(out.scores, out.num_prefix, grid)
    preds = out.logits.argmax(-1)
    paths = []
    for i in range(len(images)):
        image = images[i].mean(0).numpy()
        fig, axes = plt.subplots(1, model.num_stages + 2, figsize=(2.2 * (model.num_stages + 2), 2.6))
        axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"label {int(labels[i])} / pred {int(preds[i])}", fontsize=8)
        for stage in range(model.num_stages):
            alive = out.keep[stage][i, out.num_prefix:].reshape(grid, grid).float()
            shade = alive.repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()
            # dropped patches turn mid-grey (their ink faint), so dropped background is visible too
            axes[stage + 1].imshow(shade * image + (1 - shade) * (0.35 + 0.3 * image), cmap="gray", vmin=0, vmax=1)
            axes[stage + 1].set_title(f"stage {stage + 1}: {int(alive.sum())}/{grid * grid} kept", fontsize=8)
        axes[-1].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[-1].imshow(heat[i].numpy(), cmap="jet", alpha=0.5, extent=(-0.5, image.shape[1] - 0.5,
                                                                         image.shape[0] - 0.5, -0.5))
        axes[-1].set_title("interpreter heatmap", fontsize=8)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        path = out_dir / f"test_{i:02d}.png"
        save_figure(fig, path, dpi=90)
        plt.close(fig)
        paths.append(path.name)
    return paths


def save_clip_pictures(model: IARed, clips: Tensor, labels: Tensor, out_dir: Path, threshold: float) -> list[str]:
    """Per clip a PNG strip (frames, tokens kept after each stage, the interpreter heatmap per frame)
    and an animated GIF (:func:`iared.explain.render.render_video`, as ``iared explain`` on a video)."""
    import numpy as np

    from iared.explain.methods import make_method
    from iared.explain.render import display_image, render_video

    cfg = model.backbone.cfg
    interpreter = make_method("interpreter", threshold=threshold)
    names = []
    for i in range(len(clips)):
        x = clips[i:i + 1]
        with torch.no_grad():
            out = model(x, threshold=threshold)
        heat = interpreter(model, x, out.logits.argmax(-1))[0]
        keep = [k[0, out.num_prefix:] for k in out.keep]
        frames = np.stack([display_image(frame, cfg.mean, cfg.std) for frame in x[0]])
        title = f"label {int(labels[i])} / pred {int(out.logits.argmax())}, {float(out.gflops[0]):.3g} GFLOPs"
        png, gif = render_video(out_dir / f"test_{i:02d}.png", out_dir / f"test_{i:02d}.gif", frames, keep,
                                {"interpreter": heat}, patch_size=cfg.patch_size, title=title)
        names += [Path(png).name, Path(gif).name]
    return names


def plot_curve(curve: dict, threshold: float, path: Path) -> None:
    """Top-1 against measured throughput: the unpruned model and the pruned one at each threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    u = curve["unpruned"]
    ax.plot([u["images_per_s"]], [100 * u["top1"]], "ks", label="unpruned")
    pts = sorted(curve["points"], key=lambda p: p["images_per_s"])
    ax.plot([p["images_per_s"] for p in pts], [100 * p["top1"] for p in pts], "o-", label="IA-RED², by threshold")
    for p in pts:
        bold = "bold" if p["threshold"] == threshold else "normal"
        ax.annotate(f"{p['threshold']:g}", (p["images_per_s"], 100 * p["top1"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, fontweight=bold)
    unit = curve.get("unit", "images")
    ax.set_xlabel(f"measured {unit}/s at batch {curve['batch_size']} ({curve['clock']} clock)")
    ax.set_ylabel("top-1 %")
    ax.set_title("accuracy against measured throughput (one interleaved run)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def format_table(results: dict) -> str:
    rows = [
        ("top-1 accuracy", f"{results['accuracy_full']:.2%}", f"{results['accuracy_pruned']:.2%}"),
        (f"GFLOPs / {results.get('unit', 'images')[:-1]}", f"{results['gflops_full']:.4f}",
         f"{results['gflops_pruned']:.4f}"),
        (f"throughput ({results.get('unit', 'images')}/s, batch {results.get('throughput_batch', 64)})",
         f"{results['throughput_full']:.0f}", f"{results['throughput_pruned']:.0f}"),
    ]
    lines = [f"{'':32}{'unpruned':>12}{'IA-RED²':>12}"]
    lines += [f"{name:32}{a:>12}{b:>12}" for name, a, b in rows]
    lines.append(f"{'kept patch tokens per stage':32}{'':>12}{' / '.join(f'{k:.2f}' for k in results['kept_fraction']):>12}")
    probe = f" (speed probe {results['speed_probe_ms']:.3f} ms)" if results.get("speed_probe_ms") is not None else ""
    lines.append(f"speed-up: measured {results['speedup']:.2f}x{probe}, FLOPs-ideal {results['speedup_ideal']:.2f}x; "
                 f"FLOPs -{results['flops_reduction']:.0%}; accuracy change "
                 f"{100 * (results['accuracy_pruned'] - results['accuracy_full']):+.2f} pt")
    lines.append(f"interpreter score inside digit {results['score_inside_mask']:.3f} vs outside "
                 f"{results['score_outside_mask']:.3f}")
    op = results.get("operating_point")
    if op:
        chosen = next(p for p in op["points"] if p["threshold"] == op["threshold"])
        lines.append(f"threshold {op['threshold']:g} chosen on {op['n']} validation inputs: the cheapest within "
                     f"{op['max_loss']:g} pt there (validation loss {chosen['loss_pt']:.2f} pt"
                     f"{'' if op['within'] else ', none was within'})")
    return "\n".join(lines)


def run_demo(out: Path, cfg: InterpreterTrainConfig, test_samples: int = 2000, progress: bool = True,
             max_loss: float | None = DEMO_MAX_LOSS, val_samples: int | None = None) -> dict:
    """The demo on ``cfg.task`` (an embedded task, images or clips) with ``cfg``'s backbone (default: the task's
    shipped one, :data:`iared.models.TASK_BACKBONES`). ``max_loss``: the operating threshold is the cheapest
    within that many points on ``val_samples`` validation inputs; None: ``cfg.threshold``, the training one."""
    from dataclasses import replace

    from iared.data import build_dataset
    from iared.operating_point import check_max_loss, choose_threshold
    from iared.pruning import save_inference

    check_output_dir(out, "--out folder")
    check_max_loss(max_loss)
    started = time.perf_counter()
    cfg.out = str(out / "interpreters")
    model, history = train_from_config(cfg, progress=progress)
    train_seconds = time.perf_counter() - started

    # the unpruned reference is the backbone as shipped, also when the run fine-tuned model.backbone
    reference = build_model(cfg).backbone if cfg.finetune_steps else None
    threshold, operating_point = cfg.threshold, None
    if max_loss is not None:
        val_images, val_labels = load_split(cfg.task, "val", val_samples or DEMO_VAL_SAMPLES.get(cfg.task, 1000))
        operating_point = choose_threshold(model, val_images, val_labels, max_loss, reference=reference)
        threshold = operating_point["threshold"]
        model.inference = replace(model.inference, threshold=threshold)
        checkpoint = Path(cfg.out) / "pruned.pt"
        save_inference(checkpoint, checkpoint, model.inference)  # the file runs where the demo reports it
    images, labels = load_split(cfg.task, "test", test_samples)
    results = accuracy_and_compute(model, images, labels, threshold=threshold, reference=reference)
    results["operating_point"] = operating_point
    test = build_dataset(cfg.task, "test")
    masks = torch.stack([torch.as_tensor(test[i][2]) for i in range(min(500, test_samples))])
    results.update(mask_score_contrast(model, images[: len(masks)], masks, threshold))
    video = images.dim() == 5
    batch = THROUGHPUT_BATCH.get(cfg.task, 64)
    results.update(compare_throughput(model, images, threshold=threshold, batch_size=batch),
                   throughput_batch=batch, unit="clips" if video else "images")
    if video:
        results["pictures"] = save_clip_pictures(model, images[:NUM_CLIP_PICTURES], labels[:NUM_CLIP_PICTURES], out,
                                                 threshold)
    else:
        results["pictures"] = save_pictures(model, images[:NUM_PICTURES], labels[:NUM_PICTURES], out, threshold)
    thresholds = sorted({*CURVE_THRESHOLDS, float(threshold)})
    results["curve"] = accuracy_throughput_curve(model, images, labels, thresholds, reference=reference,
                                                 batch_size=batch)
    results["curve"]["unit"] = results["unit"]
    plot_curve(results["curve"], float(threshold), out / "accuracy_vs_throughput.png")
    results.update(
        task=cfg.task, backbone=cfg.backbone or f"{cfg.model} (shipped)",
        train_seconds=round(train_seconds, 1), total_seconds=round(time.perf_counter() - started, 1),
        machine=machine_info(images.device),
        checkpoint=str(Path(cfg.out) / "pruned.pt"), history=history,
    )
    write_json(out / "results.json", results)
    return results
