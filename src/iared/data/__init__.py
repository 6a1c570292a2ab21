"""Datasets: the embedded tasks (``digits-natural``, ``digits-clutter``; on video ``moving-digits``),
user image folders and video folders.

``build_dataset(name_or_path, split)`` is the single entry point used by training and evaluation:
a registered task name (see ``TASKS``) or an existing ``root/<class>/<image>`` directory, which is a
:class:`VideoFolder` when its files are videos (:func:`is_video_folder`).
"""

from __future__ import annotations

from pathlib import Path

from .digits import (
    CANVAS,
    DIGIT_SCALE,
    PATCH,
    DigitsClutter,
    background_fraction,
    patch_foreground,
)
from .folders import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageFolderDataset,
    eval_transform,
    list_images,
    load_image,
    train_transform,
)
from .moving import MovingDigits
from .natural import DigitsNatural
from .video import VIDEO_EXTENSIONS, BadVideoError, VideoFolder

__all__ = [
    "CANVAS",
    "DIGIT_SCALE",
    "IMAGE_EXTENSIONS",
    "PATCH",
    "TASKS",
    "VIDEO_EXTENSIONS",
    "BadImageError",
    "BadVideoError",
    "DigitsClutter",
    "DigitsNatural",
    "ImageFolderDataset",
    "MovingDigits",
    "VideoFolder",
    "background_fraction",
    "build_dataset",
    "eval_transform",
    "is_video_folder",
    "list_images",
    "load_image",
    "patch_foreground",
    "train_transform",
]

TASKS = {"digits-clutter": DigitsClutter, "digits-natural": DigitsNatural, "moving-digits": MovingDigits}


def build_dataset(task_or_path: str, split: str, **kw):
    """Build the dataset for a registered task or an image folder.

    Args:
        task_or_path: a key of ``TASKS`` (e.g. ``"digits-clutter"``), or an existing directory laid out
            as ``root/<class>/<image>``; if ``root/<split>`` exists it is used instead of ``root``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        **kw: for a task, passed to its class (e.g. ``length``, ``seed``). For an image folder:
            ``transform`` (overrides the default), ``image_size`` (default 224) and ``extensions``;
            the default transform is ``train_transform`` for ``split == "train"``, else ``eval_transform``.
            For a video folder: :class:`VideoFolder`'s arguments (``num_frames``, ``img_size``, ``mean``,
            ``std``, ``check``, ``skip_bad``, ...); ``train`` defaults to ``split == "train"``.

    Raises:
        ValueError: neither a known task nor an existing directory.
    """
    name = str(task_or_path)
    if name in TASKS:
        return TASKS[name](split=split, **kw)
    root = Path(name).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"unknown task or image folder {name!r}: expected one of {', '.join(sorted(TASKS))} "
            "or an existing directory laid out as <root>/<class>/<image>"
        )
    folder = root / split if (root / split).is_dir() else root
    if is_video_folder(folder):
        kw.setdefault("train", split == "train")
        return VideoFolder(folder, **kw)
    image_size = kw.pop("image_size", 224)
    transform = kw.pop("transform", None)
    if transform is None:
        transform = train_transform(image_size) if split == "train" else eval_transform(image_size)
    return ImageFolderDataset(folder, transform=transform, **kw)


def is_video_folder(root) -> bool:
    """Whether a ``root/<class>/...`` folder holds videos: the first media file found (sorted walk,
    hidden entries skipped) has a video extension (:data:`VIDEO_EXTENSIONS`)."""
    import os

    for dirpath, dirnames, filenames in os.walk(Path(root), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            suffix = Path(f).suffix.lower()
            if f.startswith(".") or dirpath == str(root):
                continue
            if suffix in VIDEO_EXTENSIONS:
                return True
            if suffix in IMAGE_EXTENSIONS:
                return False
    return False
