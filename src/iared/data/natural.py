"""The embedded task ``digits-natural``: handwritten digits drawn onto real photographs.

On ``digits-clutter`` the background is exactly black, so "keep the patches with ink" is as good as a
learned token-pruning policy. Here the background is a crop of a real photograph, and the digit and
its distractors are drawn with the same colours and contrasts, so which patches matter is a question
of shape, not of pixel statistics.

Each sample is a 64x64 RGB image, values in [0, 1] quantised to 8 bits (``digits_natural_vit``'s
mean / std are 0 / 1); a ViT with 8x8 patches sees 64 tokens:

- **background**: a random square crop of one of the split's photographs, side drawn log-uniformly
  in ``CROP_SIDES`` photo pixels (clipped to the photo), resized to 64x64 (bilinear, antialiased),
  flipped left-right with probability 1/2 and, in the train split only, with its colour channels
  in a random order (more colours from few photographs). Downscaling keeps the photographs' texture;
- **digit**: a real handwritten digit (scikit-learn's ``load_digits``, 8x8) upsampled to a side in
  ``DIGIT_SIDES`` (bilinear), turned into an alpha matte by a smoothstep over ``MATTE_RAMP`` (strokes
  with 1-3 px soft edges) times an opacity in ``OPACITY``, at a random position. It is painted
  ``(1 - a) * background + a * colour`` with a random colour whose luminance differs from the matte-
  weighted mean luminance underneath by a contrast in ``CONTRAST``, darker or brighter at random (the
  other way where there is no room);
- **distractors**: crops of OTHER digits of the split (side ``FRAGMENT_FRACTION`` of the digit's, cut
  edges tapered), drawn exactly the same way with their own colour, polarity and contrast from the
  same ranges, placed outside the digit's matte box (plus ``digits.MARGIN``; :func:`digits.place_fragment`), added until they cover at least
  ``FRAGMENT_COVER`` times as many patches as the digit (at most ``MAX_FRAGMENTS``).

The mask is the digit's matte > ``INK_THRESHOLD`` (0.1); distractors never touch it, so the mask is
exact and the label unambiguous. Everything is a pure function of ``(seed, split, index)``.

Photographs (bundled in the scikit-image and scikit-learn wheels, nothing is downloaded), disjoint
per split, as listed in :data:`PHOTOS`:

    =====  =======================================================================================
    split  photographs
    =====  =======================================================================================
    train  skimage: astronaut, chelsea, rocket, stereo_motorcycle (left view), immunohistochemistry,
           brick, grass, coins, moon, clock, cell; matplotlib: grace_hopper (12)
    val    sklearn: flower; skimage: camera, gravel
    test   sklearn: china; skimage: coffee
    =====  =======================================================================================

Source digits are split as in ``digits-clutter`` (``digits._split_tables``: 60 / 20 / 20 %,
stratified by class). ``backgrounds=DIR`` (``iared make-dataset --backgrounds DIR``) replaces the
bundled photographs by every image below ``DIR``, for every split.

Measured on the first 2000 samples of each split (seed 0). "Recall" is the share of the digit's
patches among the 30 % of patches (19 of 64) that a pixel-saliency rule ranks highest
(:func:`patch_saliency_recall`: pixel variance, or max - min luminance); random choice gives 0.30,
and on ``digits-clutter`` test the same rules give 0.833 / 0.818:

    =====  ==========  ==============  ===============  ===========  ===============  ===============
    split  background  digit patches   clutter patches  fragments    recall variance  recall contrast
    =====  ==========  ==============  ===============  ===========  ===============  ===============
    train  0.837       10.4 (5 .. 17)  22.1 (12 .. 36)  5.81 (<=11)  0.661            0.632
    val    0.837       10.4 (3 .. 18)  22.1 (7 .. 37)   5.80 (<=11)  0.614            0.566
    test   0.838       10.4 (4 .. 17)  22.0 (11 .. 35)  5.77 (<=11)  0.558            0.545
    =====  ==========  ==============  ===============  ===========  ===============  ===============

"background" is :func:`~iared.data.digits.background_fraction` (patches holding no digit pixel).
Distractors covered at least as many patches as the digit on all 6000 samples. Keeping 50 % of the
patches, the variance rule still misses a quarter of the digit on test (recall 0.741).

The ranges trade that floor against learnability: with fainter strokes (contrast 0.25 .. 0.45) and
larger fragments (40 .. 60 % of the digit) test recall fell to 0.45 / 0.41, but neither a small CNN
nor the ViT left chance level within a CPU budget of minutes; with the values above a small CNN
reaches 85 % training accuracy in 200 steps of 64.

What makes it hard for a ViT is polarity. A linear patch embedding maps a dark stroke to roughly the
negative of the bright one; a CNN's first ReLUs see both (a 4-stage CNN of 60 M MACs: val 47 % after
100 steps of 128, 97.1 % after 500, ten minutes on 2 cores: the task is learnable to the target),
while a plain ViT started from ``digits_vit`` (bright ink on black; embedding repeated over R, G, B)
learns the bright digits (val 49.5 % on them after 300 steps of 64) and stays at chance on the dark
ones (9.9 %). Neither a head on max-pooled patches, a randomly initialised conv stem, nor first
teaching ``digits_vit`` inverted ``digits-clutter`` changed that within CPU minutes; from scratch the
plain ViT sits at chance for the first several hundred steps, and distilled from the CNN (logits and
per-token hints, :mod:`iared.train.distill`) it reached only 33 % validation after 750 steps of 128.

What works on 2 cores: ``digits_natural_vit`` is a hybrid ViT (``conv_stem`` (16, 32, 64): three
3x3 conv stages, 11.8 M of its 116 M MACs, then the 6 transformer blocks on the 64 patch tokens),
distilled from ``digits_natural_cnn`` whose first three stages it starts from: 90.6 % validation
after 250 steps, 93.9 % test after the whole recipe (``iared.train.backbone``'s docstring).

Generating a sample takes about 2.5 ms on an idle core; :class:`DigitsNatural` keeps generated items
in memory (``cache``), so a training run pays that once per sample.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .digits import CANVAS, INK_THRESHOLD, PATCH, SPLITS, _patch_ids, _split_tables, place_fragment
from .samples import RenderCache, RenderedTask, checked_index

__all__ = [
    "PHOTOS",
    "DigitsNatural",
    "patch_saliency_recall",
    "write_dataset",
]

DIGIT_SIDES = (20, 22, 24, 26, 28)  # side of the upsampled 8x8 digit, drawn uniformly
CROP_SIDES = (128, 384)  # background crop side in photo pixels, log-uniform (texture-rich after resizing)
MATTE_RAMP = (0.05, 0.6)  # upsampled source intensity mapped to alpha 0 .. 1 (smoothstep)
OPACITY = (0.85, 1.0)  # peak alpha of a drawn layer
CONTRAST = (0.4, 0.65)  # |luminance(colour) - luminance under the layer|, same range for digit and distractors
FRAGMENT_FRACTION = (0.3, 0.45)  # distractor crop side / digit side
FRAGMENT_COVER = 2.0  # distractor patches >= this x digit patches
MIN_FRAGMENT_INK = 12
MAX_FRAGMENTS = 16
PHOTO_MAX_SIDE = 640  # larger photographs are downscaled once on load
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
DEFAULT_LENGTHS = {"train": 50_000, "val": 2_000, "test": 2_000}

# (package, name): skimage.data.<name>(), sklearn.datasets.load_sample_image("<name>.jpg") or
# matplotlib.cbook.get_sample_data("<name>.jpg")
PHOTOS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("skimage", "astronaut"), ("skimage", "chelsea"), ("skimage", "rocket"),
              ("skimage", "stereo_motorcycle"), ("skimage", "immunohistochemistry"), ("skimage", "brick"),
              ("skimage", "grass"), ("skimage", "coins"), ("skimage", "moon"), ("skimage", "clock"),
              ("skimage", "cell"), ("matplotlib", "grace_hopper")),
    "val": (("sklearn", "flower"), ("skimage", "camera"), ("skimage", "gravel")),
    "test": (("sklearn", "china"), ("skimage", "coffee")),
}


# -- sources ------------------------------------------------------------------------------------


def _fit(arr: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3), longest side at most ``PHOTO_MAX_SIDE``."""
    from PIL import Image

    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = arr[:, :, :3]
    h, w = arr.shape[:2]
    if max(h, w) > PHOTO_MAX_SIDE:
        s = PHOTO_MAX_SIDE / max(h, w)
        arr = np.asarray(Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.BILINEAR))
    return np.ascontiguousarray(arr)


@functools.cache
def _bundled_photos(split: str) -> tuple[np.ndarray, ...]:
    out = []
    for package, name in PHOTOS[split]:
        if package == "sklearn":
            from sklearn.datasets import load_sample_image

            arr = load_sample_image(f"{name}.jpg")
        elif package == "matplotlib":
            from matplotlib import cbook
            from PIL import Image

            with Image.open(cbook.get_sample_data(f"{name}.jpg")) as img:
                arr = np.asarray(img.convert("RGB"))
        else:
            import skimage.data

            arr = getattr(skimage.data, name)()
            if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
                arr = arr[0]
        out.append(_fit(np.asarray(arr)))
    return tuple(out)


@functools.cache
def _folder_photos(folder: str) -> tuple[np.ndarray, ...]:
    """Every image below ``folder`` (recursive, sorted), decoded. One-line ``ValueError`` naming the folder
    (or the broken file: :class:`~iared.data.folders.BadImageError`) when it cannot be used."""
    from .folders import IMAGE_EXTENSIONS, list_images, load_image

    path = Path(folder)
    if not path.exists():
        raise ValueError(f"backgrounds folder {folder} does not exist")
    if not path.is_dir():
        raise ValueError(f"backgrounds folder {folder} is not a folder")
    try:
        os.listdir(path)  # os.walk (list_images) would silently skip an unreadable folder
    except OSError as e:
        raise ValueError(f"backgrounds folder {folder} is not readable ({e.strerror or e})") from None
    try:
        files = list_images(path)
    except ValueError:
        raise ValueError(f"backgrounds folder {folder} is empty: no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})") from None
    return tuple(_fit(np.asarray(load_image(f))) for f in files)


@functools.cache
def _digit_mattes(side: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 source digits upsampled to ``side`` (float32 (1797, side, side), peak 1) and their
    matte boxes ``(top, bottom, left, right)`` of pixels > ``INK_THRESHOLD`` (exclusive ends)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images.astype(np.float32))[:, None]
    up = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    images = up[:, 0].clamp_(min=0).numpy()
    images /= images.max(axis=(1, 2), keepdims=True)
    # The 8x8 sources are blurry: a smooth ramp turns them into strokes with soft (1-2 px) edges and
    # an exactly empty surround, so a crop of a stroke looks like a stroke, not a coloured square.
    t = np.clip((images - MATTE_RAMP[0]) / (MATTE_RAMP[1] - MATTE_RAMP[0]), 0, 1)
    images = (t * t * (3 - 2 * t)).astype(np.float32)
    ink = images > INK_THRESHOLD
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    boxes = np.stack([rows.argmax(1), side - rows[:, ::-1].argmax(1), cols.argmax(1), side - cols[:, ::-1].argmax(1)],
                     axis=1).astype(np.int64)
    for a in (images, boxes):
        a.setflags(write=False)
    return images, boxes


# -- the dataset --------------------------------------------------------------------------------


class DigitsNatural(RenderedTask):
    """Virtual dataset of handwritten digits on photographs; sample ``i`` is a pure function of
    ``(seed, split, i)`` (and of the background photographs).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: selects the source digits (as ``digits-clutter``)
            and the bundled photographs (:data:`PHOTOS`), both disjoint across splits.
        length: number of (virtual) samples; defaults to 50 000 / 2 000 / 2 000.
        seed: changes which samples are drawn, never which sources belong to a split.
        backgrounds: a folder of photographs (searched recursively) used instead of the bundled ones,
            for every split. Checked (and decoded) here: an empty or unreadable folder raises a
            one-line ``ValueError`` naming it.
        cache: keep each generated item in memory (about 12.8 KB per distinct index, per process), so
            a training run that revisits its samples pays the ~2.5 ms generation once per sample.

    Images are quantised to 8 bits (``k / 255``), so an item is the same whether cached, regenerated
    or read back from the PNG that :func:`write_dataset` writes.

    Items are ``(image, label, mask)``: float32 ``(3, 64, 64)`` in [0, 1]; ``int`` in 0..9; bool
    ``(64, 64)``, True on the digit's pixels (matte > 0.1) only.
    """

    num_classes = 10
    in_chans = 3
    image_size = CANVAS
    classes = tuple(str(c) for c in range(10))

    def __init__(self, split: str = "train", length: int | None = None, seed: int = 0,
                 backgrounds: str | os.PathLike | None = None, cache: bool = True):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        if length is None:
            length = DEFAULT_LENGTHS[split]
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split = split
        self.length = int(length)
        self.seed = int(seed)
        self.backgrounds = None if backgrounds is None else str(Path(backgrounds).expanduser().resolve())
        self._split_index = SPLITS.index(split)
        self.cache = bool(cache)
        self._memo = RenderCache(self.length, (3, CANVAS, CANVAS), (CANVAS, CANVAS))
        self._photos()  # fail now, not in the middle of training

    def _photos(self) -> tuple[np.ndarray, ...]:
        return _bundled_photos(self.split) if self.backgrounds is None else _folder_photos(self.backgrounds)

    @property
    def source_indices(self) -> np.ndarray:
        """Sorted indices into ``sklearn.datasets.load_digits()`` of this split's source digits."""
        return _split_tables(self.split)[0]

    def __repr__(self) -> str:
        bg = "" if self.backgrounds is None else f", backgrounds={self.backgrounds!r}"
        return f"DigitsNatural(split={self.split!r}, length={self.length}, seed={self.seed}{bg})"

    def render(self, i) -> dict:
        """Generate sample ``i`` with its parts, for inspection and tests.

        Returns a dict: ``image`` float32 (3, 64, 64) in [0, 1]; ``label``; ``mask`` bool (64, 64);
        ``background`` float32 (3, 64, 64); ``digit_alpha`` / ``clutter_alpha`` float32 (64, 64)
        (the clutter matte is the max over distractors); ``source``; ``fragment_sources``;
        ``photo`` (index into the photographs); ``contrasts`` (digit first, then each distractor).
        """
        i = checked_index(self, i)
        rng = np.random.default_rng([self.seed, self._split_index, i])
        indices, by_class = _split_tables(self.split)

        label = int(rng.integers(10))
        pool = by_class[label]
        source = int(pool[rng.integers(len(pool))])

        photos = self._photos()
        photo = int(rng.integers(len(photos)))
        image = _background(photos[photo], rng, permute=self.split == "train")
        background = image.copy()

        side = int(DIGIT_SIDES[rng.integers(len(DIGIT_SIDES))])
        mattes, boxes = _digit_mattes(side)
        y0, x0 = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
        digit_alpha = np.zeros((CANVAS, CANVAS), np.float32)
        digit_alpha[y0 : y0 + side, x0 : x0 + side] = mattes[source] * np.float32(rng.uniform(*OPACITY))
        contrasts = [_paint(image, digit_alpha[y0 : y0 + side, x0 : x0 + side], y0, x0, rng)]
        mask = digit_alpha > INK_THRESHOLD
        rows, cols = np.nonzero(mask)
        n_digit = len(np.unique(_patch_ids(rows, cols)))

        t, b, l, r = (int(v) for v in boxes[source])
        top, bottom, left, right = y0 + t, y0 + b, x0 + l, x0 + r
        clutter_alpha = np.zeros((CANVAS, CANVAS), np.float32)
        covered = np.zeros((CANVAS // PATCH) ** 2, bool)
        fragment_sources: list[int] = []
        while len(fragment_sources) < MAX_FRAGMENTS and covered.sum() < FRAGMENT_COVER * n_digit:
            f_src, crop = fragment_crop(mattes, indices, source, side, rng)
            size = crop.shape[0]
            (fy, fx), best_fp = place_fragment(crop, (top, bottom, left, right), covered, rng)
            contrasts.append(_paint(image, crop, fy, fx, rng))
            region = clutter_alpha[fy : fy + size, fx : fx + size]
            np.maximum(region, crop, out=region)
            covered |= best_fp
            fragment_sources.append(f_src)

        image = np.rint(image.transpose(2, 0, 1) * 255) / np.float32(255)  # 8 bits, as in a PNG
        return {
            "image": image.astype(np.float32),
            "label": label,
            "mask": mask,
            "background": np.ascontiguousarray(background.transpose(2, 0, 1)),
            "digit_alpha": digit_alpha,
            "clutter_alpha": clutter_alpha,
            "source": source,
            "fragment_sources": fragment_sources,
            "photo": photo,
            "contrasts": contrasts,
        }


def fragment_crop(mattes: np.ndarray, indices: np.ndarray, source: int, side: int,
                  rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A distractor: a tapered crop (side ``FRAGMENT_FRACTION`` of ``side``) of the strokes of another
    source digit than ``source`` (one of ``indices``), at a random opacity. Returns its source and
    matte. Shared by every task drawn from these parts, so their distractors are alike."""
    f_src = source
    while f_src == source:
        f_src = int(indices[rng.integers(len(indices))])
    size = round(side * rng.uniform(*FRAGMENT_FRACTION))
    for _ in range(8):  # a random window can miss the strokes; retry a few times
        cy, cx = rng.integers(0, side - size + 1, size=2)
        crop = mattes[f_src, cy: cy + size, cx: cx + size]
        if (crop > INK_THRESHOLD / OPACITY[0]).sum() >= MIN_FRAGMENT_INK:
            break
    return f_src, crop * _taper(size) * np.float32(rng.uniform(*OPACITY))


@functools.cache
def _taper(size: int) -> np.ndarray:
    """(size, size) window falling linearly to 1/3 at the border: a distractor's cut edges are soft."""
    ramp = np.minimum(np.arange(size) + 1, np.arange(size)[::-1] + 1).astype(np.float32) / 3
    w = np.minimum(np.minimum(ramp[:, None], ramp[None, :]), 1)
    w.setflags(write=False)
    return w


def _background(photo: np.ndarray, rng: np.random.Generator, permute: bool = False, size: int = CANVAS,
                crop_sides: tuple[int, int] = CROP_SIDES) -> np.ndarray:
    """A random square crop of ``photo`` (side log-uniform in ``crop_sides`` photo pixels) resized to
    ``size``: float32 (size, size, 3) in [0, 1]. ``permute``: also shuffle the colour channels (6 orders;
    more colours from few photographs)."""
    from PIL import Image

    h, w = photo.shape[:2]
    short = min(h, w)
    lo, hi = min(crop_sides[0], short), min(crop_sides[1], short)
    c = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    flip = bool(rng.integers(2))
    img = Image.fromarray(photo).resize((size, size), Image.BILINEAR, box=(x, y, x + c, y + c))
    arr = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    if permute:
        arr = arr[:, :, rng.permutation(3)]
    return np.ascontiguousarray(arr[:, ::-1] if flip else arr)


def _paint(image: np.ndarray, alpha: np.ndarray, y: int, x: int, rng: np.random.Generator) -> float:
    """Blend a colour into ``image`` (H, W, 3) in place through ``alpha`` (h, w), placed at ``(y, x)``;
    returns the signed luminance contrast between the colour and the alpha-weighted mean luminance
    underneath."""
    colour, contrast = _pick_colour(image, alpha, y, x, rng)
    _blend(image, alpha, y, x, colour)
    return contrast


def _pick_colour(image: np.ndarray, alpha: np.ndarray, y: int, x: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """:func:`_paint`'s colour for ``alpha`` at ``(y, x)`` over ``image``: float32 (3,) whose luminance
    differs from the alpha-weighted mean luminance underneath by a contrast in ``CONTRAST``, darker or
    brighter at random; and that signed contrast."""
    h, w = alpha.shape
    region = image[y : y + h, x : x + w]
    under = float(np.einsum("ijc,c,ij->", region, LUMA, alpha) / max(float(alpha.sum()), 1e-6))
    contrast = float(rng.uniform(*CONTRAST))
    sign = 1.0 if rng.integers(2) else -1.0
    if not 0.0 <= under + sign * contrast <= 1.0:
        sign = -sign
    target = min(max(under + sign * contrast, 0.0), 1.0)
    colour = rng.uniform(0, 1, size=3).astype(np.float32)
    colour = np.clip(colour + np.float32(target - float(colour @ LUMA)), 0, 1)
    colour = np.clip(colour + np.float32(target - float(colour @ LUMA)), 0, 1)  # re-centre after clipping
    return colour, float(colour @ LUMA) - under


def _blend(image: np.ndarray, alpha: np.ndarray, y: int, x: int, colour: np.ndarray) -> None:
    """``image[y:y+h, x:x+w] = (1 - alpha) * image + alpha * colour``, in place."""
    h, w = alpha.shape
    region = image[y : y + h, x : x + w]
    a = alpha[:, :, None]
    region += a * (colour - region)


# -- measurements ------------------------------------------------------------------------------


def patch_saliency_recall(images: torch.Tensor, masks: torch.Tensor, keep: float = 0.3,
                          rule: str = "variance", patch: int = PATCH) -> torch.Tensor:
    """Share of the digit's patches among the ``keep`` fraction of patches a pixel-saliency rule ranks
    highest, per image.

    Args:
        images: float ``(B, C, H, W)``.
        masks: bool ``(B, H, W)``.
        rule: ``"variance"`` (pixel variance over the patch's pixels and channels) or ``"contrast"``
            (max - min luminance in the patch).

    Returns:
        float ``(B,)``: |top-k ∩ digit patches| / |digit patches|, ``k = round(keep * N)``.
    """
    from .digits import patch_foreground

    b, c, h, w = images.shape
    g = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    g = g.reshape(b, (h // patch) * (w // patch), c, patch * patch)
    if rule == "variance":
        score = g.flatten(2).var(dim=2)
    elif rule == "contrast":
        lum = (g * torch.tensor(LUMA[:c] if c == 3 else [1.0])[None, None, :, None]).sum(2)
        score = lum.amax(2) - lum.amin(2)
    else:
        raise ValueError(f"unknown saliency rule {rule!r}: expected variance or contrast")
    k = max(1, round(keep * score.shape[1]))
    top = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
    fg = patch_foreground(masks, patch)
    return (top & fg).sum(1).float() / fg.sum(1).clamp(min=1).float()


# -- writing a dataset to disk -------------------------------------------------------------------


def write_dataset(task: str, split: str, n: int, out: str | os.PathLike, *, seed: int = 0,
                  backgrounds: str | os.PathLike | None = None, overwrite: bool = False,
                  progress: bool = True) -> Path:
    """Render ``n`` samples of ``task`` to ``out/images/<label>/NNNNN.png`` and the digit masks (0 / 255)
    to ``out/masks/<label>/NNNNN.png`` (an ImageFolder plus matching masks).

    ``out`` is checked before any work: an existing non-empty ``out`` is refused unless
    ``overwrite``. Files are written to a temporary folder beside ``out`` that is renamed into place
    at the end (:func:`iared.files.write_folder_atomic`), so ``out`` is never half written.
    """
    from PIL import Image

    from iared.files import write_folder_atomic

    from . import build_dataset

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    from . import TASKS

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(sorted(TASKS))}")
    if getattr(TASKS[task], "num_frames", None):
        raise ValueError(f"{task} is a video task: write it with iared.data.moving.write_videos "
                         "(iared make-dataset moving-digits)")
    kw = {"length": int(n), "seed": seed}
    if TASKS[task] is DigitsNatural:
        kw.update(backgrounds=backgrounds, cache=False)
    elif backgrounds is not None:
        raise ValueError(f"--backgrounds applies to digits-natural only, not {task!r}")
    dataset = build_dataset(task, split, **kw)

    def fill(tmp: Path) -> None:
        from tqdm.auto import tqdm

        width = max(5, len(str(n - 1)))
        for i in tqdm(range(n), desc=f"make-dataset {task} {split}", disable=not progress, dynamic_ncols=True,
                      mininterval=1.0):
            image, label, mask = dataset[i]
            name = f"{i:0{width}d}.png"
            for kind, arr in (("images", image), ("masks", mask)):
                folder = tmp / kind / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                if kind == "images":
                    a = (arr.numpy().transpose(1, 2, 0) * 255).round().clip(0, 255).astype(np.uint8)
                    a = a[:, :, 0] if a.shape[2] == 1 else a
                else:
                    a = arr.numpy().astype(np.uint8) * 255
                Image.fromarray(a).save(folder / name)

    return write_folder_atomic(out, fill)

