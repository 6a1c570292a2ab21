"""One-call inference: the top-k classes of images, image folders and videos (``iared predict``'s library).

    import iared
    results = iared.predict("pruned.pt", ["photo.jpg", "photos/", "clip.mp4"], top_k=5)

``model_or_checkpoint``: a model in memory (an :class:`iared.pruning.IARed`, or a backbone), a
checkpoint file, sniffed as every command sniffs one (:mod:`iared.loading`: a pruned checkpoint runs
pruned, at the threshold it records; any backbone file runs whole), or None: the pruned model
shipped for digits-natural. Inputs: image files, video files, folders (searched recursively for
both). An image model reads images (resized and centre-cropped to its input as in evaluation); a
video model (TimeSformer) reads each video as one clip: ``num_frames`` frames, one from the middle
of each of as many equal segments of the whole video (:mod:`iared.data.video`).

One dict per image and per video, in input order::

    {"input": "photos/cat.jpg",
     "top_k": [{"index": 281, "label": "tabby, tabby cat", "probability": 0.61}, ...],  # most likely first
     "frames": [17, 52, ...],                       # videos: the frame indices of the clip
     "kept_fraction": [0.52, 0.30, 0.10],           # pruned models: patch tokens alive after each stage
     "macs": 412000000, "macs_unpruned": 1150000000,
     "explanation": "heatmaps/cat.png"}             # with explain_dir: the interpreter heatmap panel

Labels: ImageNet's for a 1000-class head, an embedded task's (the checkpoint's training task) for
its models, else None. Inputs adapted to the model (resized, colour to grayscale) are said in one
line on stderr, from what to what; what cannot be adapted is refused in one line naming the input.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["collect_inputs", "iter_predictions", "load_predictor", "predict"]


def predict(model_or_checkpoint: nn.Module | str | os.PathLike | None, inputs: str | os.PathLike | Sequence,
            top_k: int = 5, **kw) -> list[dict[str, Any]]:
    """The predictions of :func:`iter_predictions` as a list (module docstring)."""
    return list(iter_predictions(model_or_checkpoint, inputs, top_k, **kw))


def iter_predictions(model_or_checkpoint: nn.Module | str | os.PathLike | None, inputs: str | os.PathLike | Sequence,
                     top_k: int = 5, *, model: str | None = None, pretrained: bool = False, batch_size: int = 32,
                     device: str = "auto",
                     threshold: float | Sequence[float] | None = None,
                     explain_dir: str | os.PathLike | None = None,
                     target_kept: float | Sequence[float] | None = None, calibration_samples: int | None = None,
                     on_calibrated=None) -> Iterator[dict[str, Any]]:
    """One dict per input (module docstring), batch by batch.

    ``model``, ``pretrained``: a registered name saying how to build a weights file, or with
    ``pretrained`` and no file, its released weights (:func:`iared.loading.load_backbone`).
    ``threshold``: a pruned model's keep threshold (one value or one per stage; default: the one it records).
    ``explain_dir``: also write each input's interpreter heatmap panel there (pruned models only).
    ``target_kept``: instead of a threshold, thresholds calibrated on the first ``calibration_samples``
    inputs (default :data:`iared.calibration.DEFAULT_SAMPLES`) so that the kept fraction meets it
    (:meth:`iared.pruning.IARed.calibrate`); ``on_calibrated(model)`` is called then.
    Every problem that can be known before the model runs (missing inputs, images for a video model,
    a bad threshold, ``explain_dir`` with a backbone) is a one-line error before any work.
    """
    from iared.calibration import DEFAULT_SAMPLES, check_calibration, check_target_kept
    from iared.data.folders import fit_notes
    from iared.evaluate import resolve_device
    from iared.models.families import is_video_config
    from iared.pruning import IARed
    from iared.reducers.base import check_threshold

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"--top-k and --batch-size must be at least 1, got {top_k} and {batch_size}")
    check_threshold(threshold)
    check_calibration(target_kept, threshold, calibration_samples)
    files = collect_inputs(inputs)
    net, names = load_predictor(model_or_checkpoint, model, pretrained)
    pruned = isinstance(net, IARed)
    cfg = net.backbone.cfg if pruned else net.cfg
    video = is_video_config(cfg)
    _check_kinds(files, video)
    if explain_dir is not None and not pruned:
        raise ValueError(f"--explain {explain_dir}: the heatmaps are a pruned model's interpreter scores; the "
                         "model given is a backbone (give a pruned checkpoint)")
    if target_kept is not None and not pruned:
        raise ValueError(f"--target-kept calibrates a pruned model's interpreter thresholds; "
                         f"{model_or_checkpoint or model} has no interpreters (give a pruned checkpoint)")
    if target_kept is not None:
        check_target_kept(target_kept, net.num_stages)
    dev = resolve_device(device)
    net = net.to(dev).eval()
    seen: dict = {}
    if target_kept is not None:
        sample = files[: calibration_samples or DEFAULT_SAMPLES]
        load = (lambda p: _load_clip(p, cfg, seen)[0]) if video else (lambda p: _load_image(p, cfg, seen))
        chunks = (torch.stack([load(p) for p in sample[i: i + batch_size]]) for i in range(0, len(sample), batch_size))
        net.calibrate(chunks, target_kept, batch_size=batch_size)
        if on_calibrated is not None:
            on_calibrated(net)
    if pruned:
        threshold = threshold if threshold is not None else net.inference.threshold
    panels = _explain(net, files, explain_dir, threshold, dev) if explain_dir is not None else {}
    for start in range(0, len(files), batch_size):
        chunk = files[start: start + batch_size]
        loaded = [_load_clip(p, cfg, seen) if video else (_load_image(p, cfg, seen), None) for p in chunk]
        x = torch.stack([item for item, _ in loaded]).to(dev)
        with torch.no_grad():
            out = net(x, threshold=threshold, layout="padded") if pruned else None
            logits = out.logits if pruned else net(x)
        probs = logits.float().softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # sorted, most likely first
        for i, path in enumerate(chunk):
            result: dict[str, Any] = {"input": str(path), "top_k": [
                {"index": int(c), "label": names[int(c)] if names else None, "probability": float(p)}
                for p, c in zip(top.values[i], top.indices[i])]}
            if video:
                result["frames"] = loaded[i][1]
            if pruned:
                result["kept_fraction"] = [round(float(v), 4) for v in out.kept_fraction()[i]]
                result["macs"] = int(out.macs[i])
                result["macs_unpruned"] = int(net.full_macs())
            if path in panels:
                result["explanation"] = str(panels[path])
            yield result
    for note in fit_notes(seen, cfg.img_size, cfg.in_chans) if explain_dir is None else ():  # else explain said it
        print(f"iared: {note}", file=sys.stderr)


def collect_inputs(inputs: str | os.PathLike | Sequence) -> list[Path]:
    """The files ``inputs`` name: each a file (used whatever its extension) or a folder (every image
    and video below it, sorted). A missing input or a folder without any is a one-line error naming it."""
    from iared.data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, list_images

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given: name image files, video files or folders")
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        try:
            files += list_images(path, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        except ValueError:
            raise ValueError(f"no images or videos found in {path}") from None
    return files


def load_predictor(model_or_checkpoint: nn.Module | str | os.PathLike | None = None, model: str | None = None,
                   pretrained: bool = False):
    """``(model, class names or None)``: a model in memory as it is, or a checkpoint file sniffed
    (pruned: whole; anything else: a backbone, :func:`iared.loading.load_backbone`'s rules), or
    ``model`` with ``pretrained`` weights, or the shipped digits-natural pruned model when nothing is given."""
    from iared.checkpoint import read_checkpoint
    from iared.explain.cli import default_checkpoint_path
    from iared.loading import is_pruned, load_backbone, load_pruned_checked
    from iared.models import TASK_BACKBONES

    if pretrained and model_or_checkpoint is not None:
        raise ValueError("--pretrained and --checkpoint exclude each other: which weights should be used?")
    if isinstance(model_or_checkpoint, nn.Module):
        net, task = model_or_checkpoint, None
    elif model_or_checkpoint is None and model is not None:
        net = load_backbone(None, model, pretrained)
        task = next((t for t, name in TASK_BACKBONES.items() if name == model), None)  # a shipped backbone's task
    else:
        path = model_or_checkpoint if model_or_checkpoint is not None else default_checkpoint_path()
        obj = read_checkpoint(path)
        net = load_pruned_checked(path, obj) if model is None and is_pruned(obj) else load_backbone(path, model)
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        train = config.get("train") if isinstance(config.get("train"), dict) else {}
        task = train.get("task")
    cfg = net.backbone.cfg if hasattr(net, "backbone") else net.cfg
    return net, class_names(cfg.num_classes, task)


def class_names(num_classes: int, task: str | None = None) -> list[str] | None:
    """Names of a head's classes: the embedded task's it was trained on, ImageNet-1k's for 1000
    classes (timm's descriptions), else None (a folder's class names are not in the checkpoint)."""
    from iared.data import TASKS

    names = getattr(TASKS.get(task), "classes", None)
    if names is not None and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return None


def _check_kinds(files: list[Path], video: bool) -> None:
    from iared.data import VIDEO_EXTENSIONS

    for path in files:
        if (path.suffix.lower() in VIDEO_EXTENSIONS) != video:
            raise ValueError(f"{path}: a video, but the model takes images (give a video model's checkpoint)" if not
                             video else f"{path}: not a video, but the model takes clips (a video model)")


def _load_image(path: Path, cfg, seen: dict) -> torch.Tensor:
    """``(C_in, S, S)``: decoded (:func:`iared.data.load_image`), in the model's channels, resized and
    centre-cropped as in evaluation (inputs already ``S`` x ``S`` are used whole)."""
    from iared.data import eval_transform, load_image
    from iared.data.folders import to_model_channels

    img = load_image(path)
    seen[path] = (img.size, img.info.get("source_mode"))
    return eval_transform(cfg.img_size, cfg.mean, cfg.std)(to_model_channels(img, cfg.in_chans, path))


def _load_clip(path: Path, cfg, seen: dict) -> tuple[torch.Tensor, list[int]]:
    """``((T, C, S, S), frame indices)``: :func:`iared.data.video.load_clip`'s steps, keeping the indices."""
    from iared.data.video import BadVideoError, clip_transform, probe_video, read_frames, sample_indices

    if cfg.in_chans != 3:
        raise BadVideoError(path, f"the model takes {cfg.in_chans}-channel frames; videos decode to RGB")
    info = probe_video(path, decode=True)
    indices = sample_indices(info.frames, cfg.num_frames)
    seen[path] = ((info.width, info.height), "RGB")
    return clip_transform(read_frames(path, indices), cfg.img_size, cfg.mean, cfg.std), indices


def _explain(net, files: list[Path], out_dir, threshold, device) -> dict[Path, Path]:
    """Interpreter heatmap panels of every input in ``out_dir`` (:func:`iared.explain.cli.explain_files`,
    named by each file's path below the inputs' common folder); returns input -> panel."""
    from iared.explain.cli import _panel_names, explain_files
    from iared.files import check_output_dir

    out_dir = check_output_dir(out_dir, "--explain folder")
    absolute = [p.resolve() for p in files]
    source = Path(os.path.commonpath(absolute))
    explain_files(net, absolute, source, out_dir, ["interpreter"], threshold, str(device))
    return {p: out_dir / name for p, name in zip(files, _panel_names(absolute, source))}
