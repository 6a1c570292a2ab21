"""The library behind ``iared explain`` (heatmap panels for images) and ``iared explain-eval``
(methods x metrics); the commands themselves are :mod:`iared.commands.explain` and
:mod:`iared.commands.explain_eval`.

    iared explain IMAGE_OR_DIR [--checkpoint PRUNED.pt] --out DIR [--methods ...] [--threshold 0.5]
    iared explain-eval [--checkpoint PRUNED.pt] [--images DIR --masks DIR] [--limit N]
                       [--json PATH] [--plot PNG] [--methods ...] [--steps 16] [--baseline rise]

Without ``--checkpoint`` the pruned model shipped for the embedded task is used
(``iared/assets/digits_natural_pruned.pt`` for digits-natural, the default, and
``digits_pruned.pt`` with ``--task digits-clutter``; written by :func:`iared.pruning.save_pruned`)
when present; otherwise the command stops and asks for ``--checkpoint``.

``explain-eval`` runs on the embedded task's test split (``DigitsClutter("test")``, the first
``--limit`` samples, 500 by default) unless ``--images`` / ``--masks`` name a folder pair: files
pair up by name stem (every image needs a mask and every mask an image; the unpaired names are
listed otherwise). Masks are binary images: 0/1 or 0/255, any channel above half scale (or equal
to 1 in a 0/1 mask) marks the object. Images and masks are resized to the model's square input
(images bicubic, masks nearest; no crop, as in Chefer et al.'s ImageNet-segmentation
evaluation) and must have the same size as each other.

Input is checked before anything is written: a missing folder, an unreadable image or mask, an
image/mask size mismatch end the command with one line naming the files, and no output. Grayscale
images are converted for RGB models and RGB images to grayscale for one-channel models. PNGs and
JSON are written through :func:`iared.files.write_atomic`.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from iared.data import DEFAULT_TASK
from iared.explain.evaluate import build_methods, evaluate_explanations
from iared.explain.methods import default_methods
from iared.models import TASK_PRUNED
from iared.pruning import IARed
from iared.timing import machine_info

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "default_checkpoint_path",
    "evaluate_methods",
    "evaluate_readouts",
    "explain_files",
    "explain_inputs",
    "load_explain_model",
    "load_mask",
    "load_model_input",
    "pair_folders",
]

DEFAULT_CHECKPOINTS = {task: TASK_PRUNED[task] for task in ("digits-natural", "digits-clutter")}
"""File names, inside the package's ``assets`` folder, of the pruned model shipped for each embedded task."""

DIGITS_DEFAULT_LIMIT = 500


# -- inputs -----------------------------------------------------------------------------------


def default_checkpoint_path(task: str | None = None) -> Path:
    """Where the pruned model shipped for ``task`` (default digits-natural) lives, present or not."""
    return Path(str(resources.files("iared") / "assets" / DEFAULT_CHECKPOINTS[task or DEFAULT_TASK]))


def load_explain_model(checkpoint=None, device: str = "cpu", model: str | None = None,
                       pretrained: bool = False, task: str | None = None, allow_untrained: bool = True) -> IARed:
    """A pruned model from ``checkpoint``; a backbone (``--model NAME`` / weights without
    interpreters) with fresh interpreters (:func:`iared.loading.load_iared`; refused unless
    ``allow_untrained``); or the pruned model shipped for ``task`` when nothing is given
    (FileNotFoundError naming it if absent)."""
    from iared.loading import load_iared

    return load_iared(checkpoint, model, pretrained, default=default_checkpoint_path(task),
                      allow_untrained=allow_untrained).to(device).eval()


def _image_transform(model: IARed, squash: bool):
    from iared.data import eval_transform

    cfg = model.backbone.cfg
    kw = {"crop_pct": 1.0, "crop_mode": "squash"} if squash else {}
    return eval_transform(cfg.img_size, cfg.mean, cfg.std, **kw)


def _as_model_mode(img, model: IARed, path):
    from iared.data.folders import to_model_channels

    # load_image always gives RGB (grayscale, palette, alpha, 16-bit converted)
    return to_model_channels(img, model.backbone.cfg.in_chans, path)


def load_model_input(path, model: IARed, transform=None, seen: dict | None = None) -> torch.Tensor:
    """An image file as the model's input ``(C_in, S, S)``.

    Default transform: images already of the model's size are used whole, others are resized
    and centre-cropped as in evaluation. A broken file, or a model whose channels an image cannot
    feed, raises the data module's one-line ``BadImageError`` naming it. ``seen``: gets
    ``path -> ((width, height), source mode)``, for :func:`iared.data.folders.fit_notes`.
    """
    from iared.data import load_image

    original = load_image(path)
    if seen is not None:
        seen[path] = (original.size, original.info.get("source_mode"))
    img = _as_model_mode(original, model, path)
    if transform is None:
        size = model.backbone.cfg.img_size
        transform = _image_transform(model, squash=img.size == (size, size))
    return transform(img)


def load_mask(path, size: int | None = None) -> torch.Tensor:
    """A binary mask file as ``(size, size)`` bool (nearest-neighbour resize; None keeps its size).

    Foreground: any channel > 127, or, in a mask whose values are only 0 and 1, the ones.
    """
    from PIL import Image

    from iared.data import load_image

    img = load_image(path)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    values = np.asarray(img).max(-1)
    return torch.from_numpy(values > (0 if values.max() <= 1 else 127))


def _folder(path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} folder {folder} is a file, not a folder")
    return folder


def _show_names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def pair_folders(images_dir, masks_dir) -> list[tuple[Path, Path]]:
    """``(image, mask)`` files paired by stem (sorted); an unpaired or ambiguous name is a ValueError."""
    from iared.data import list_images

    def by_stem(folder, what):
        table: dict[str, Path] = {}
        for f in list_images(_folder(folder, what)):
            if f.stem in table:
                raise ValueError(f"{what} folder {folder}: two files share the stem {f.stem!r} "
                                 f"({table[f.stem]}, {f}); stems must be unique")
            table[f.stem] = f
        return table

    images, masks = by_stem(images_dir, "image"), by_stem(masks_dir, "mask")
    only_images, only_masks = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
    if only_images or only_masks:
        parts = []
        if only_images:
            parts.append(f"images without a mask in {masks_dir}: {_show_names(only_images)}")
        if only_masks:
            parts.append(f"masks without an image in {images_dir}: {_show_names(only_masks)}")
        raise ValueError("image and mask folders do not pair up by file stem: " + "; ".join(parts))
    return [(images[s], masks[s]) for s in sorted(images)]


def check_pairs(pairs: list[tuple[Path, Path]]) -> None:
    """Decode every image and mask once; one ValueError listing every unreadable file or size clash."""
    from iared.data import BadImageError, load_image

    problems = []
    for image_path, mask_path in pairs:
        sizes = []
        for path in (image_path, mask_path):
            try:
                sizes.append(load_image(path).size)
            except BadImageError as e:
                problems.append(f"{path} ({e.problem})")
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            problems.append(f"{image_path} is {sizes[0][0]}x{sizes[0][1]} but its mask {mask_path} is "
                            f"{sizes[1][0]}x{sizes[1][1]}")
    if problems:
        raise ValueError(f"{len(problems)} bad image/mask file(s): {_show_names(problems, 5)}")


def _methods_for(model: IARed, names, threshold: float | None):
    return build_methods(names if names else default_methods(model), threshold)


def _use_threshold(model: IARed, threshold: float | None) -> float:
    """One threshold for every method of a run: the given one, else the checkpoint's; the model
    records it so the attention methods explain the same pruned pass as the interpreter maps."""
    from dataclasses import replace

    from iared.reducers.base import check_threshold

    if check_threshold(threshold) is not None:
        model.inference = replace(model.inference, threshold=threshold)
    return model.inference.threshold


# -- iared explain ----------------------------------------------------------------------------


def _panel_names(files: list[Path], source: Path) -> list[str]:
    """One output file name per input: its path below ``source`` with '__' for '/', then .png;
    inputs that would collide (a.jpg, a.png) keep their extension in the name."""
    stems = []
    for path in files:
        rel = path.relative_to(source) if source.is_dir() else Path(path.name)
        stems.append(("__".join(rel.with_suffix("").parts), rel.suffix.lstrip(".").lower()))
    counts: dict[str, int] = {}
    for stem, _ in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [f"{stem}_{ext}.png" if counts[stem] > 1 else f"{stem}.png" for stem, ext in stems]


def explain_inputs(source, out_dir) -> list[Path]:
    """The files to explain: ``source`` itself or every image and video below it, less anything inside
    ``out_dir`` (never explain our own panels from an earlier run into the same folder)."""
    from iared.data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, list_images

    source = Path(source).expanduser()
    try:
        files = list_images(source, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    except ValueError:
        raise ValueError(f"no images or videos found in {source}") from None
    if source.is_dir():
        out_resolved = Path(out_dir).expanduser().resolve()
        files = [f for f in files if out_resolved not in f.resolve().parents]
        if not files:
            raise ValueError(f"no images or videos found in {source} outside the output folder {out_dir}")
    return files


def explain_files(model: IARed, files: list[Path], source, out_dir, method_names=None, threshold: float | None = None,
                  device: str = "cpu") -> list[Path]:
    """One PNG panel per file in ``out_dir`` (names: :func:`_panel_names`); every file is decoded
    first, so an unreadable one stops the run (one ValueError listing them) before any output.

    A video model (TimeSformer) reads video files (:func:`iared.data.video.load_clip`: its frames,
    size and normalisation) and writes, per file, a PNG strip of the frames with the kept tokens and
    heatmaps per frame and an animated GIF beside it (:func:`iared.explain.render.render_video`)."""
    from iared.data import VIDEO_EXTENSIONS, BadImageError, BadVideoError
    from iared.data.folders import fit_notes
    from iared.data.video import load_clip
    from iared.explain.methods import check_video_methods, is_video
    from iared.explain.render import display_image, render_panel, render_video

    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    video = is_video(model)
    if video:
        check_video_methods(method_names or [])
    threshold = _use_threshold(model, threshold)
    methods = _methods_for(model, method_names, threshold)
    cfg = model.backbone.cfg
    inputs, bad, seen = [], [], {}
    for path in files:
        is_video_file = path.suffix.lower() in VIDEO_EXTENSIONS
        try:
            if is_video_file != video:
                raise BadImageError(path, "a video, but the model takes images" if is_video_file
                                    else "an image, but the model takes clips (a video model)")
            inputs.append(load_clip(path, cfg.num_frames, cfg.img_size, cfg.mean, cfg.std) if video
                          else load_model_input(path, model, seen=seen))
        except (BadImageError, BadVideoError) as e:
            bad.append(f"{path} ({e.problem})")
    if bad:
        raise ValueError(f"{len(bad)} unusable input(s), nothing written: {_show_names(bad, 5)}")
    for note in fit_notes(seen, cfg.img_size, cfg.in_chans):
        print(f"iared: {note}", file=sys.stderr)
    written = []
    for path, name, image in zip(files, _panel_names(files, source), inputs):
        x = image[None].to(device)
        with torch.no_grad():
            out = model(x, threshold=threshold)
            target = model.backbone(x).argmax(-1)
        heatmaps = {method_name: method(model, x, target)[0] for method_name, method in methods.items()}
        title = (f"{path.name}   backbone: class {int(target)}   pruned: class {int(out.logits.argmax())}, "
                 f"{float(out.gflops[0]):.3g} GFLOPs")
        keep = [k[0, cfg.num_prefix_tokens:] for k in out.keep]
        if video:
            frames = np.stack([display_image(frame, cfg.mean, cfg.std) for frame in x[0]])
            written.extend(render_video(out_dir / name, out_dir / Path(name).with_suffix(".gif"), frames, keep,
                                        heatmaps, patch_size=cfg.patch_size, title=title))
        else:
            written.append(render_panel(out_dir / name, display_image(x[0], cfg.mean, cfg.std), keep, heatmaps,
                                        patch_size=cfg.patch_size, title=title))
    return written


# -- iared explain-eval -----------------------------------------------------------------------


def embedded_task_for(model: IARed, task: str | None = None) -> str:
    """The embedded task whose test split ``explain-eval`` reads: ``task``, checked against the model's
    input, or (None) the one the model's input fits: one channel -> digits-clutter, RGB -> digits-natural."""
    from iared.data import TASKS

    cfg = model.backbone.cfg
    if task is None:
        task = {1: "digits-clutter", 3: "digits-natural"}.get(cfg.in_chans, "digits-natural")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(sorted(TASKS))}, or --images and --masks")
    want = (TASKS[task].in_chans, TASKS[task].image_size)
    if (cfg.in_chans, cfg.img_size) != want:
        raise ValueError(f"the embedded {task} task needs a {want[1]}x{want[1]} model with {want[0]} input channel(s), "
                         f"this one takes {cfg.img_size}x{cfg.img_size}x{cfg.in_chans}; pass --images and --masks")
    return task


def _task_batches(task: str, n: int, batch_size: int, seed: int, model: IARed, split: str = "test"):
    from iared.data import TASKS

    cfg = model.backbone.cfg
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
    data = TASKS[task](split, length=n, seed=seed)
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        yield (torch.stack([(it[0] - mean) / std for it in items]), torch.stack([it[2] for it in items]))


def _folder_batches(pairs, model: IARed, batch_size: int):
    from iared.data import load_image

    transform = _image_transform(model, squash=True)
    size = model.backbone.cfg.img_size
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        yield (torch.stack([transform(_as_model_mode(load_image(i), model, i)) for i, _ in chunk]),
               torch.stack([load_mask(m, size) for _, m in chunk]))


def evaluate_methods(model: IARed, *, images=None, masks=None, limit: int | None = None, batch_size: int = 50,
                     seed: int = 0, method_names=None, steps: int = 16, baseline="rise", tolerance: float = 0.0,
                     threshold: float | None = None, device: str = "cpu", progress=None, pairs=None,
                     task: str | None = None, split: str = "test", per_image: bool = False) -> dict:
    """Every method x every metric on an embedded task's test split (``task``, default: the one the
    model's input fits, :func:`embedded_task_for`; first ``limit``, default 500) or on the ``images``
    / ``masks`` folder pair (``pairs``: already paired files).
    Returns :func:`iared.explain.evaluate.evaluate_explanations`' dict plus ``data`` and
    ``environment``; degenerate masks give NaN metrics and an ``UndefinedMetricWarning``."""
    threshold = _use_threshold(model, threshold)
    methods = _methods_for(model, method_names, threshold)
    if images is not None:
        pairs = pairs if pairs is not None else pair_folders(images, masks)[:limit]
        check_pairs(pairs)
        batches = _folder_batches(pairs, model, batch_size)
        data = f"{images} + {masks}"
    else:
        task = embedded_task_for(model, task)
        batches = _task_batches(task, limit or DIGITS_DEFAULT_LIMIT, batch_size, seed, model, split)
        data = f"{task} {split}"
    results = evaluate_explanations(model, batches, methods, steps=steps, baseline=baseline, tolerance=tolerance,
                                    threshold=threshold, device=device, progress=progress, per_image=per_image)
    return {"data": data, **results, "target": "backbone prediction",
            "environment": machine_info(device)}


def check_readouts(candidates) -> None:
    """One-line ValueError unless every candidate is an interpreter readout (a baseline is not one)."""
    bad = [c for c in candidates if not str(c).startswith("interpreter")]
    if bad:
        raise ValueError(f"--readouts takes interpreter readouts (interpreter-<readout>[:stage]), got {', '.join(bad)}")


def evaluate_readouts(model: IARed, candidates, *, val_limit: int, limit: int | None = None, method_names=None,
                      resamples: int = 2000, progress=None, **kw) -> dict:
    """The interpreter readout chosen on validation, then reported once on test beside the baselines.

    ``candidates``: interpreter method specs (``interpreter-attention:0``, ...), scored on the embedded
    task's val split (first ``val_limit``) and ranked by :func:`iared.explain.evaluate.choose_by_rank`;
    the chosen one and ``method_names`` (default: every non-interpreter method) then run on the test
    split (``kw``: :func:`evaluate_methods`' options), with paired bootstrap intervals (``resamples``)
    of chosen minus each baseline. Returns the test report plus ``selection`` and ``differences``."""
    from iared.explain.evaluate import SELECTION_METRICS, choose_by_rank, paired_differences

    check_readouts(candidates)
    val = evaluate_methods(model, method_names=list(candidates), limit=val_limit, split="val", progress=progress,
                           **kw)
    chosen, ranks = choose_by_rank(val["methods"])
    baselines = [m for m in (method_names or default_methods(model)) if not m.startswith("interpreter")]
    test = evaluate_methods(model, method_names=[chosen, *baselines], split="test", limit=limit, per_image=True,
                            progress=progress, **kw)
    per_image = test.pop("per_image")
    test["selection"] = {"split": val["data"], "n": val["n"], "chosen": chosen,
                         "rule": "best mean rank over " + ", ".join(f"{m} ({'higher' if h else 'lower'} better)"
                                                                    for m, h in SELECTION_METRICS)
                                 + "; ties: higher mIoU",
                         "mean_rank": ranks, "candidates": val["methods"]}
    test["differences"] = {"method": chosen, "resamples": resamples, "level": 0.95,
                           "against": paired_differences(per_image, chosen, baselines, resamples)}
    return test
