"""The embedded streaming task ``digit-streams``: long frame sequences from a slowly moving camera,
one handwritten digit at a time that appears, drifts and is replaced by another.

Built from ``digits-natural``'s parts (:mod:`iared.data.natural`: the same bundled photographs,
disjoint per split, the same scikit-learn source digits split as in ``digits-clutter``, the same
alpha mattes, colours, contrasts and tapered distractor fragments), so the ``digits_natural_vit``
backbone classifies every frame as it is, without training on streams:

- **sequence**: ``FRAMES`` = 64 frames of 64x64 RGB (``digits-natural``'s canvas), values in [0, 1]
  quantised to 8 bits after a little sensor noise (``NOISE``: no two frames are exactly equal);
- **camera**: a crop of one of the split's photographs rendered as a panorama at the same texture
  scale as ``digits-natural``'s backgrounds, seen through a 64x64 window panning at ``PAN_SPEED`` px
  per frame in a random direction, in whole-pixel steps (the window moves every 2-5 frames);
- **segments** of ``SEGMENT`` frames: each shows one digit (label of those frames) drawn as on
  ``digits-natural`` at a random place, drifting by ``DIGIT_DRIFT`` px per frame, and its distractors
  (crops of other digits, outside the digit's ink box over the whole segment, about half of them
  drifting); at a segment boundary the digit and its distractors are replaced at once, which is
  where a computation reused from earlier frames is most likely to be wrong.

Items are ``(frames, labels, masks)``: float32 ``(T, 3, 64, 64)``, int64 ``(T,)`` in 0..9, bool
``(T, 64, 64)`` (the digit's matte > ``INK_THRESHOLD`` in each frame). Everything is a pure function
of ``(seed, split, index)``.
"""

from __future__ import annotations

import numpy as np
import torch

from .digits import CANVAS, INK_THRESHOLD, MARGIN, PATCH, SPLITS, _split_tables
from .moving import _start_range, _track
from .natural import (
    CROP_SIDES,
    DIGIT_SIDES,
    FRAGMENT_COVER,
    MAX_FRAGMENTS,
    OPACITY,
    _background,
    _blend,
    _bundled_photos,
    _digit_mattes,
    _pick_colour,
    fragment_crop,
)

__all__ = ["FRAMES", "DigitStreams"]

FRAMES = 64
PAN_SPEED = (0.2, 0.6)  # camera pan, px per frame
SEGMENT = (12, 28)  # frames per digit
DIGIT_DRIFT = (0.0, 0.3)  # the digit's motion in the frame, px per frame
FRAGMENT_SPEED = (0.2, 0.8)  # drifting distractors, px per frame
STILL_SHARE = 0.5  # share of distractors that stay where they are in the frame
NOISE = 1.0 / 255  # sensor noise (std) added to every frame before 8-bit quantisation
PLACEMENT_TRIES = 24
DEFAULT_LENGTHS = {"train": 256, "val": 32, "test": 32}


def _segments(rng: np.random.Generator, frames: int) -> list[tuple[int, int]]:
    """Cut ``range(frames)`` into ``(start, end)`` pieces of ``SEGMENT`` frames (the last one may be
    longer, never shorter than ``SEGMENT[0]`` unless the sequence is)."""
    cuts, start = [], 0
    while frames - start > SEGMENT[1]:
        end = start + int(rng.integers(SEGMENT[0], SEGMENT[1] + 1))
        if frames - end < SEGMENT[0]:
            break
        cuts.append((start, end))
        start = end
    cuts.append((start, frames))
    return cuts


class DigitStreams(torch.utils.data.Dataset):
    """Virtual dataset of frame sequences (module docstring); sequence ``i`` is a pure function of
    ``(seed, split, i)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: source digits and photographs disjoint across splits.
        length: number of sequences; defaults to 256 / 32 / 32.
        frames: frames per sequence (default 64).
        seed: changes which sequences are drawn, never which sources belong to a split.
    """

    num_classes = 10
    in_chans = 3
    image_size = CANVAS
    classes = tuple(str(c) for c in range(10))

    def __init__(self, split: str = "test", length: int | None = None, frames: int = FRAMES, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        length = DEFAULT_LENGTHS[split] if length is None else length
        for name, value, low in (("length", length, 1), ("frames", frames, 2), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.split, self.length, self.frames, self.seed = split, int(length), int(frames), int(seed)
        self._split_index = SPLITS.index(split)
        _bundled_photos(split)  # fail now, not in the middle of a run

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"DigitStreams(split={self.split!r}, length={self.length}, frames={self.frames}, seed={self.seed})"

    def __getitem__(self, i) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.render(i)
        return torch.from_numpy(s["frames"]), torch.from_numpy(s["labels"]), torch.from_numpy(s["masks"])

    def render(self, i) -> dict:
        """Sequence ``i`` with its parts: ``frames`` float32 (T, 3, 64, 64); ``labels`` int64 (T,);
        ``masks`` bool (T, 64, 64); ``segments`` list of ``(start, end)``; ``pan`` (T, 2) window offsets."""
        from .samples import checked_index

        i = checked_index(self, i)
        T = self.frames
        rng = np.random.default_rng([self.seed, self._split_index, i, 7919])
        indices, by_class = _split_tables(self.split)
        photos = _bundled_photos(self.split)
        pan = _track(rng, PAN_SPEED, T)
        side = CANVAS + int(np.abs(pan).max()) * 2 + 1
        scale = side / CANVAS  # same photo pixels per canvas pixel as digits-natural's backgrounds
        panorama = _background(photos[int(rng.integers(len(photos)))], rng, permute=self.split == "train",
                               size=side, crop_sides=(round(CROP_SIDES[0] * scale), round(CROP_SIDES[1] * scale)))
        py0, py1, px0, px1 = _start_range(pan, CANVAS, side)
        oy, ox = int(rng.integers(py0, py1 + 1)), int(rng.integers(px0, px1 + 1))
        frames = np.stack([panorama[oy + dy: oy + dy + CANVAS, ox + dx: ox + dx + CANVAS] for dy, dx in pan])
        labels = np.zeros(T, np.int64)
        digit_alpha = np.zeros((T, CANVAS, CANVAS), np.float32)
        segments = _segments(rng, T)
        for start, end in segments:
            label = int(rng.integers(10))
            labels[start:end] = label
            self._draw_segment(frames[start:end], digit_alpha[start:end], label, indices, by_class, rng)
        frames = frames + rng.normal(0.0, NOISE, frames.shape).astype(np.float32)
        frames = np.rint(np.clip(frames, 0, 1).transpose(0, 3, 1, 2) * 255) / np.float32(255)
        return {"frames": np.ascontiguousarray(frames, np.float32), "labels": labels,
                "masks": digit_alpha > INK_THRESHOLD, "segments": segments, "pan": pan + np.array([oy, ox])}

    @staticmethod
    def _draw_segment(frames: np.ndarray, digit_alpha: np.ndarray, label: int, indices, by_class,
                      rng: np.random.Generator) -> None:
        """Paint one digit and its distractors into ``frames`` (t, 64, 64, 3) in place."""
        t = len(frames)
        pool = by_class[label]
        source = int(pool[rng.integers(len(pool))])
        side = int(DIGIT_SIDES[rng.integers(len(DIGIT_SIDES))])
        mattes, boxes = _digit_mattes(side)
        drift = _track(rng, DIGIT_DRIFT, t)
        y_lo, y_hi, x_lo, x_hi = _start_range(drift, side, CANVAS)
        digit_path = drift + np.array([int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))])
        matte = mattes[source] * np.float32(rng.uniform(*OPACITY))
        mean_frame = frames.mean(0)
        colour, _ = _pick_colour(mean_frame, matte, int(digit_path[0, 0]), int(digit_path[0, 1]), rng)
        for f, (y, x) in enumerate(digit_path):
            digit_alpha[f, y: y + side, x: x + side] = matte
            _blend(frames[f], matte, int(y), int(x), colour)
        bt, bb, bl, br = (int(v) for v in boxes[source])
        top, bottom = int(digit_path[:, 0].min()) + bt - MARGIN, int(digit_path[:, 0].max()) + bb + MARGIN
        left, right = int(digit_path[:, 1].min()) + bl - MARGIN, int(digit_path[:, 1].max()) + br + MARGIN
        n_digit = len(_patches(digit_alpha[0]))
        covered: set[int] = set()
        placed = misses = 0
        while placed < MAX_FRAGMENTS and len(covered) < FRAGMENT_COVER * n_digit and misses < 8:
            _, crop = fragment_crop(mattes, indices, source, side, rng)
            size = crop.shape[0]
            path = _track(rng, DIGIT_DRIFT if rng.random() < STILL_SHARE else FRAGMENT_SPEED, t)
            fy_lo, fy_hi, fx_lo, fx_hi = _start_range(path, size, CANVAS)
            start = None
            for _ in range(PLACEMENT_TRIES):
                if fy_lo > fy_hi or fx_lo > fx_hi:
                    break
                fy, fx = int(rng.integers(fy_lo, fy_hi + 1)), int(rng.integers(fx_lo, fx_hi + 1))
                ys, xs = path[:, 0] + fy, path[:, 1] + fx
                if ((ys + size <= top) | (ys >= bottom) | (xs + size <= left) | (xs >= right)).all():
                    start = (fy, fx)
                    break
            if start is None:
                misses += 1
                continue
            f_colour, _ = _pick_colour(mean_frame, crop, start[0] + int(path[0, 0]), start[1] + int(path[0, 1]), rng)
            first = np.zeros((CANVAS, CANVAS), np.float32)
            for f, (dy, dx) in enumerate(path):
                y, x = start[0] + int(dy), start[1] + int(dx)
                _blend(frames[f], crop, y, x, f_colour)
                if f == 0:
                    first[y: y + size, x: x + size] = crop
            covered |= _patches(first)
            placed += 1


def _patches(alpha: np.ndarray) -> set[int]:
    rows, cols = np.nonzero(alpha > INK_THRESHOLD)
    return set(((rows // PATCH) * (CANVAS // PATCH) + cols // PATCH).tolist())
