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
    "DEFAULT_TASK",
    "DIGIT_SCALE",
    "IMAGE_EXTENSIONS",
    "PATCH",
    "SPLITS",
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
    "folder_media",
    "is_video_folder",
    "list_images",
    "load_image",
    "patch_foreground",
    "split_folder",
    "train_transform",
]

TASKS = {"digits-clutter": DigitsClutter, "digits-natural": DigitsNatural, "moving-digits": MovingDigits}
# The task a command uses when given neither --task nor a checkpoint that names one (RGB, so a timm-style
# model fits it; digits-clutter is the one-channel variant).
DEFAULT_TASK = "digits-natural"
SPLITS = ("train", "val", "test")


def build_dataset(task_or_path: str, split: str, **kw):
    """Build the dataset for a registered task or an image folder.

    Args:
        task_or_path: a key of ``TASKS`` (e.g. ``"digits-clutter"``), or an existing directory laid out
            as ``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` (:func:`split_folder`).
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
    folder = split_folder(root, split)
    if folder_media(folder) == "videos":
        kw.setdefault("train", split == "train")
        return VideoFolder(folder, **kw)
    image_size = kw.pop("image_size", 224)
    transform = kw.pop("transform", None)
    if transform is None:
        transform = train_transform(image_size) if split == "train" else eval_transform(image_size)
    return ImageFolderDataset(folder, transform=transform, **kw)


def split_folder(root, split: str) -> Path:
    """The folder holding ``split`` of the dataset folder ``root``: ``root/split``, or ``root`` itself
    when it has no split folders at all (a flat ``root/<class>/...`` serves every split).

    A ``root`` with some split folders but not this one is refused in one line (read as classes,
    ``train`` and ``test`` would become two classes). A flat ``root`` read as ``val`` is said once on
    stderr: validation then reads the very images training reads, so its figures flatter the model.
    Warned, not refused: a flat folder is the usual first try, and a user may mean it.
    """
    root = Path(root).expanduser()
    if (root / split).is_dir():
        return root / split
    present = [s + "/" for s in SPLITS if (root / s).is_dir()]
    if present:
        raise ValueError(f"dataset folder {root} has {', '.join(present)} but no {split}/: add "
                         f"{root / split}/<class>/... or use another split")
    if split == "val":
        from .folders import _say_once

        _say_once(f"{root} has no val/ folder: validating on the same images training reads (optimistic "
                  f"figures); put held-out images in {root}/val/<class>/ and the rest in {root}/train/<class>/")
    return root


def folder_media(root) -> str:
    """What the ``root/<class>/...`` dataset folder holds: ``"images"`` or ``"videos"`` (the kind of its
    media files), ``"images"`` when it holds none (the image dataset then says so).

    One-line ValueError, naming the folder, for media files that lie directly in ``root`` with none in
    class folders (loose files are not a dataset: which labels?) and for class folders that mix images
    and videos (one model reads one kind).
    """
    import os

    root = Path(root)
    inside = {"images": 0, "videos": 0}
    loose = {"images": 0, "videos": 0}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        counts = loose if Path(dirpath) == root else inside
        for f in filenames:
            suffix = Path(f).suffix.lower()
            if not f.startswith(".") and suffix in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
                counts["videos" if suffix in VIDEO_EXTENSIONS else "images"] += 1
    if not any(inside.values()) and any(loose.values()):
        found = " and ".join(f"{n} {kind}" for kind, n in loose.items() if n)
        kind = "video" if loose["videos"] else "image"
        raise ValueError(f"dataset folder {root} holds {found} directly, not in class folders: a dataset is laid "
                         f"out as {root}/<class>/<{kind}> (to classify loose files: iared predict {root})")
    if inside["images"] and inside["videos"]:
        raise ValueError(f"dataset folder {root} mixes {inside['images']} images and {inside['videos']} videos in "
                         "its class folders: a dataset holds one kind (images for image models, videos for video "
                         "models)")
    return "videos" if inside["videos"] else "images"


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
