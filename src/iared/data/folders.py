"""User image folders: robust image loading, ImageFolder-style datasets and timm transforms.

Layout expected by :class:`ImageFolderDataset`: ``root/<class>/<image>`` (images may sit in nested
folders below the class folder). Every image goes through :func:`load_image`, which always returns
RGB and turns a broken file into a one-line :class:`BadImageError` naming the file.

ImageNet folders (every class folder a WordNet id such as ``n01440764``) are labelled with the
standard ImageNet-1k indices (timm's synset list), not renumbered: a folder holding 60 of the
classes still gives each image the label a 1000-class head predicts for it.
"""

from __future__ import annotations

import os
import re
import sys
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
    "fit_notes",
    "list_images",
    "load_image",
    "imagenet_class_indices",
    "to_model_channels",
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
            if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
                # float TIFFs may hold NaN / inf; casting them to 0..255 would invent pixel values
                raise BadImageError(path, "non-finite pixel values (NaN or inf) in a floating-point image")
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001  a malformed EXIF block must not cost otherwise good pixels
                img = img.copy()
            source_mode = img.mode
            rgb = _to_rgb(img)
            rgb.info["source_mode"] = source_mode  # so a dataset can say once that it adapted channels
            return rgb
    except BadImageError:
        raise
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image file") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"too large to decode safely ({_one_line(exc)})") from None
    except PermissionError:
        raise  # the file may be fine; reporting it as corrupt would mislead
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(path, f"truncated or corrupt ({_one_line(exc)})") from None


def to_model_channels(img: Image.Image, in_chans: int, path) -> Image.Image:
    """An RGB image (:func:`load_image`) in a model's input channels: 3 as it is, 1 as grayscale; any
    other count is a one-line :class:`BadImageError` naming ``path``: an image file has no fourth
    channel to give, and dropping or inventing channels would feed the model silent nonsense."""
    if in_chans == 1:
        return img.convert("L")
    if in_chans != 3:
        raise BadImageError(path, f"the model takes {in_chans}-channel inputs; an image file feeds 1 (grayscale) "
                                  "or 3 (RGB) channels only")
    return img


def fit_notes(seen: dict, size: int, in_chans: int = 3) -> list[str]:
    """One-line warnings for the inputs a model's transform adapts: ``seen`` maps each input to its
    ``((width, height), source mode)``. Inputs not ``size`` x ``size`` are resized (from what to
    what); colour inputs of a one-channel model lose their colour. Empty when everything fits."""
    def sizes(items) -> str:
        distinct = sorted({s for s in items}, key=lambda s: (-s[0] * s[1], s))
        text = ", ".join(f"{w}x{h}" for w, h in distinct[:3])
        return text + (f" ... ({len(distinct)} sizes)" if len(distinct) > 3 else "")

    notes = []
    off = {p: s for p, (s, _) in seen.items() if tuple(s) != (size, size)}
    if len(off) == 1:
        (path, s), = off.items()
        notes.append(f"{path}: resized from {sizes([s])} to the model's {size}x{size} input")
    elif off:
        notes.append(f"{len(off)} of {len(seen)} inputs resized from {sizes(off.values())} to the model's "
                     f"{size}x{size} input")
    colour = [p for p, (_, mode) in seen.items() if not str(mode).startswith(("L", "1", "I", "F"))]
    if in_chans == 1 and colour:
        notes.append(f"{len(colour)} colour input(s) converted to grayscale for the model's 1 input channel "
                     f"(first: {colour[0]})")
    return notes


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


_WNID = re.compile(r"n\d{8}")
_said: set[str] = set()


def _say_once(message: str) -> None:
    """Tell the user, once per process, about an adaptation made to their data."""
    if message not in _said:
        _said.add(message)
        print(f"iared: {message}", file=sys.stderr)


def imagenet_class_indices(classes: list[str]) -> dict[str, int] | None:
    """Standard ImageNet-1k index of each class folder when every name is a known WordNet id
    (``n01440764`` -> 0), else None."""
    if not classes or not all(_WNID.fullmatch(c) for c in classes):
        return None
    from timm.data import ImageNetInfo

    index = {name: i for i, name in enumerate(ImageNetInfo().label_names())}
    if not all(c in index for c in classes):
        return None
    return {c: index[c] for c in classes}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class>/<image>``; class indices follow the sorted class folder names, or
    the standard ImageNet-1k indices when every class folder is a WordNet id (module docstring).

    Args:
        root: dataset folder. Every non-hidden subfolder is a class and must hold at least one
            image: an empty class folder is an error (it would silently become a class that no
            image teaches).
        transform: applied to the ``PIL.Image`` (e.g. :func:`eval_transform`). With ``None`` the
            item's first element is the PIL image itself.
        extensions: accepted file suffixes, matched case-insensitively (ImageNet files end in .JPEG).
        in_chans: the model's input channels. 3: RGB (grayscale files are replicated, as every
            ImageNet loader does); 1: images are converted to grayscale (``L``). Either adaptation
            is announced once on stderr; any other count is refused here, before training starts.

    Items are ``(image, target)``: ``image`` is usually a float tensor ``(in_chans, H, W)``, ``target``
    an int. Attributes ``classes``, ``class_to_idx``, ``samples`` (list of ``(Path, int)``) and
    ``targets`` mirror torchvision's ``ImageFolder``; ``num_classes`` is 1000 for ImageNet folders.
    """

    def __init__(
        self,
        root,
        transform: Callable | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        in_chans: int = 3,
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if in_chans not in (1, 3):
            raise ValueError(f"image folder {root}: the model takes {in_chans}-channel images; folders of "
                             "photographs can feed 1 (grayscale) or 3 (RGB) channels only")
        exts = _normalise_extensions(extensions)
        classes = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
        files = {c: _walk_images(root / c, exts) for c in classes}
        if not any(files.values()):
            raise ValueError(f"no images found in {root} (expected {root}/<class>/<image>.jpg)")
        empty = [c for c in classes if not files[c]]
        if empty:
            shown = ", ".join(empty[:5]) + (f" ... ({len(empty)} in all)" if len(empty) > 5 else "")
            raise ValueError(f"image folder {root}: class folder(s) without images: {shown}; remove them or add "
                             f"images (expected extensions: {', '.join(exts)})")
        imagenet = imagenet_class_indices(classes)
        class_to_idx = imagenet or {c: i for i, c in enumerate(classes)}
        self.root = root
        self.transform = transform
        self.extensions = exts
        self.in_chans = in_chans
        self.classes = classes
        self.class_to_idx = class_to_idx
        self.imagenet = imagenet is not None
        self.samples = [(p, class_to_idx[c]) for c in classes for p in files[c]]
        self.targets = [t for _, t in self.samples]
        if self.imagenet:
            _say_once(f"{root}: class folders are ImageNet WordNet ids; labels are the standard 1000-class indices")
        if in_chans == 1:
            _say_once(f"{root}: images converted to grayscale for the model's 1 input channel")

    @property
    def num_classes(self) -> int:
        return 1000 if self.imagenet else len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, images={len(self)}, classes={len(self.classes)})"

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        img = load_image(path)
        if self.in_chans == 1:
            img = img.convert("L")
        elif str(img.info.get("source_mode")).startswith(("L", "1", "I", "F")):
            _say_once(f"{self.root}: grayscale images replicated to the model's 3 input channels")
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
    """Evaluation transform: resize the short side to ``image_size / crop_pct``, centre-crop, normalise
    (images already ``image_size`` square are only normalised).

    PIL RGB image -> float tensor ``(3, image_size, image_size)``. ``kwargs`` go to
    ``timm.data.create_transform``.
    """
    kwargs.setdefault("interpolation", _INTERPOLATION)
    resize_and_crop = create_transform(
        input_size=image_size,
        is_training=False,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
        **kwargs,
    )
    return _PassThroughAtModelSize(image_size, resize_and_crop, mean, std)


class _PassThroughAtModelSize:
    """timm's evaluation transform, except that an image already at the model's size is only
    converted and normalised: resizing to ``size / crop_pct`` and centre-cropping would magnify it
    (a 64x64 ``digits-natural`` PNG by 1.14x, cutting off its borders) and evaluate a different image
    than the generator made."""

    def __init__(self, image_size: int, resize_and_crop, mean, std):
        from torchvision import transforms

        self.image_size = int(image_size)
        self.resize_and_crop = resize_and_crop
        self.convert = transforms.Compose([transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size == (self.image_size, self.image_size):
            return self.convert(img)
        return self.resize_and_crop(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.image_size}, otherwise={self.resize_and_crop!r})"


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
