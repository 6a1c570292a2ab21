"""User image folders: robust image loading, ImageFolder-style datasets and timm transforms.

Layout expected by :class:`ImageFolderDataset`: ``root/<class>/<image>`` (images may sit in nested
folders below the class folder). Every image goes through :func:`load_image`, which always returns
RGB and turns a broken file into a one-line :class:`BadImageError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageFolderDataset",
    "eval_transform",
    "list_images",
    "load_image",
    "train_transform",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# ViT checkpoints in timm (DeiT, augreg) are trained with bicubic resizing.
_INTERPOLATION = "bicubic"


class BadImageError(ValueError):
    """An image file that cannot be decoded (empty, truncated, corrupt or not an image).

    ``path`` holds the offending file; the message is a single line naming it.
    """

    def __init__(self, path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"bad image {path}: {problem}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels often hold arbitrary (frequently black) colour: show them as white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        # PIL's own conversion clips 16-bit values at 255, turning most of the image white.
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if img.mode == "F" and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0  # float images are usually stored in [0, 1]
        return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path) -> Image.Image:
    """Load an image file as a fully decoded RGB ``PIL.Image``.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted (alpha is composited on white);
    the EXIF orientation tag is applied so the pixels match what an image viewer shows.

    Raises:
        FileNotFoundError: the file does not exist.
        BadImageError: the file is empty, truncated, corrupt or not an image.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    if path.is_dir():
        raise BadImageError(path, "is a directory, not an image file")
    if size == 0:
        raise BadImageError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            # Decoding happens lazily: load() inside the try is what surfaces truncated data.
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001  a malformed EXIF block must not cost otherwise good pixels
                img = img.copy()
            return _to_rgb(img)
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image file") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"too large to decode safely ({_one_line(exc)})") from None
    except PermissionError:
        raise  # the file may be fine; reporting it as corrupt would mislead
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(path, f"truncated or corrupt ({_one_line(exc)})") from None


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise ValueError("extensions must not be empty")
    return exts


def _walk_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # Hidden entries are tool droppings (.ipynb_checkpoints, macOS "._x.jpg" resource forks).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath) / f for f in filenames if not f.startswith(".") and _has_extension(f, extensions)
        )
    return sorted(found)


def list_images(path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files at ``path``: the file itself, or every image below a directory (recursive, sorted).

    A single file is returned as given, whatever its extension (the user asked for it explicitly).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a directory without any image file.
    """
    path = Path(path).expanduser()
    exts = _normalise_extensions(extensions)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"image file or folder not found: {path}")
    images = _walk_images(path, exts)
    if not images:
        raise ValueError(f"no images found in {path} (expected image files ending in {', '.join(exts)})")
    return images


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class>/<image>``; class indices follow the sorted class folder names.

    Args:
        root: dataset folder. Every non-hidden subfolder is a class (kept even if empty, so the class
            indices of a train and a val folder agree); images are found recursively below it.
        transform: applied to the RGB ``PIL.Image`` (e.g. :func:`eval_transform`). With ``None`` the
            item's first element is the PIL image itself.
        extensions: accepted file suffixes, matched case-insensitively (ImageNet files end in .JPEG).

    Items are ``(image, target)``: ``image`` is usually a float tensor ``(3, H, W)``, ``target`` an int.
    Attributes ``classes``, ``class_to_idx``, ``samples`` (list of ``(Path, int)``) and ``targets``
    mirror torchvision's ``ImageFolder``.
    """

    def __init__(
        self,
        root,
        transform: Callable | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        exts = _normalise_extensions(extensions)
        classes = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
        samples = [(p, idx) for idx, c in enumerate(classes) for p in _walk_images(root / c, exts)]
        if not samples:
            raise ValueError(f"no images found in {root} (expected {root}/<class>/<image>.jpg)")
        self.root = root
        self.transform = transform
        self.extensions = exts
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [t for _, t in samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, images={len(self)}, classes={len(self.classes)})"

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        img = load_image(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def eval_transform(
    image_size: int = 224,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    crop_pct: float = 0.875,
    **kwargs,
):
    """Evaluation transform: resize the short side to ``image_size / crop_pct``, centre-crop, normalise.

    PIL RGB image -> float tensor ``(3, image_size, image_size)``. ``kwargs`` go to
    ``timm.data.create_transform``.
    """
    kwargs.setdefault("interpolation", _INTERPOLATION)
    return create_transform(
        input_size=image_size,
        is_training=False,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
        **kwargs,
    )


def train_transform(
    image_size: int = 224,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    **kwargs,
):
    """Training transform (timm defaults): random resized crop, horizontal flip, colour jitter, normalise.

    PIL RGB image -> float tensor ``(3, image_size, image_size)``. ``kwargs`` go to
    ``timm.data.create_transform`` (e.g. ``scale=(0.25, 1.0)``, ``auto_augment="rand-m9-mstd0.5"``).
    """
    kwargs.setdefault("interpolation", _INTERPOLATION)
    return create_transform(
        input_size=image_size, is_training=True, mean=tuple(mean), std=tuple(std), **kwargs
    )
