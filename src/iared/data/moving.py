"""The embedded video task ``moving-digits``: a handwritten digit filmed by a panning camera over a
photograph, among moving and still fragments of other digits.

Built from ``digits-natural``'s parts (:mod:`iared.data.natural`: the same bundled photographs,
disjoint per split, the same scikit-learn source digits split as in ``digits-clutter``, the same
alpha mattes, colours, contrasts and tapered fragments) and made into clips:

- **clips** of ``FRAMES`` = 8 frames of ``FRAME`` = 48x48 RGB, values in [0, 1] quantised to 8 bits. A
  TimeSformer with 8x8 patches sees 6x6 = 36 patches per frame, 288 space-time tokens per clip (plus
  the class token). 48x48 rather than 64x64: a clip then costs 288 tokens instead of 512, so divided
  attention and the MLPs of a small TimeSformer (width 64 .. 96, 4 .. 6 blocks) train on 2 CPU cores
  in minutes per epoch of a few thousand clips, while a digit of 16 .. 22 px still spans 3x3 to 4x4
  patches of 8 (a quarter of a frame), as on ``digits-natural``'s 64x64 canvas with 20 .. 28 px digits;
- **camera**: a crop of one of the split's photographs rendered at ``PANORAMA`` px (side log-uniform in
  ``CROP_SIDES`` photo pixels, flipped at random, colour channels permuted in train), seen through a
  48x48 window that pans at ``PAN_SPEED`` px per frame in a random direction (integer steps): every
  textured patch of the background changes from frame to frame;
- **digit**: drawn as on ``digits-natural`` (side in ``DIGIT_SIDES``, one colour for the clip with a
  contrast in ``CONTRAST`` to the mean luminance underneath over the clip), followed by the camera: it
  drifts slowly in the frame (``DIGIT_DRIFT`` px per frame), so its strokes change little between
  frames while the background behind them pans;
- **distractors**: tapered crops of OTHER digits of the split, drawn the same way with their own
  colour, polarity and contrast; about half drift across the frame at ``FRAGMENT_SPEED`` px per frame,
  the others are followed by the camera as the digit is (``STILL_SHARE``), so neither "what moves" nor
  "what stays" singles out the digit. Every distractor stays inside the frame and outside the digit's
  ink box (over all frames, plus ``digits.MARGIN``) on every frame; they are added until they cover
  ``FRAGMENT_COVER`` times as many patches of frame 0 as the digit (at most ``MAX_FRAGMENTS``).

The per-frame mask is the digit's matte > ``INK_THRESHOLD`` in that frame; distractors never touch it,
so masks are exact and the label unambiguous. Everything is a pure function of ``(seed, split, index)``.

How much of the digit the floors find (measured by :func:`token_recall` on the first 500 test clips, seed 0:
the share of the digit's space-time tokens among the top 30 % of a clip's 288 tokens, as
:func:`iared.data.natural.patch_saliency_recall` measures on images; scores exactly those of the floors
in :mod:`iared.reducers.floors` on a TimeSformer with 8x8 patches):

    =======================================================  ======  ======
    rule (top 30 % of a clip's 288 tokens)                   mean    median
    =======================================================  ======  ======
    frame difference (most change since the previous frame)  0.214   0.197
    least change (its reverse)                               0.376   0.375
    pixel floor (pixel standard deviation)                   0.550   0.554
    random                                                   0.300   0.294
    =======================================================  ======  ======

A clip holds 59.5 digit tokens on average (32 .. 96 of 288) and 8.3 distractors. Keeping 50 % of the
tokens, frame difference still finds 0.411 of the digit (random 0.5), the pixel floor 0.736.

A patch that changed most since the previous frame is a textured background patch under the pan or a
drifting distractor; the digit, followed by the camera, changes less than both ("least change" is
listed too: still distractors and flat background rank with it). Pixel variance treats the digit and
the distractors alike (same colours and contrasts), as on ``digits-natural``. The label needs the
digit's shape: which tokens hold it is a question for a model that looks.

Not (yet) built from the issue's list: a label that needs more than one frame (every frame shows the
whole digit). ``iared make-dataset moving-digits --split test --n 100 --out OUT`` writes a
:class:`~iared.data.video.VideoFolder` layout: ``OUT/videos/<label>/NNNNN.mp4`` (H.264 RGB at crf 0:
lossless, and 9 frames, so a clip read back through ``VideoFolder`` with mean 0 / std 1 equals the generated
one: :func:`write_videos`)
and ``OUT/masks/<label>/NNNNN/<frame>.png`` (0 / 255).

Generating a clip takes about 7 ms on a busy core; :class:`MovingDigits` keeps generated clips in
memory (``cache``: 58 KB per distinct index, per process).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .digits import INK_THRESHOLD, MARGIN, SPLITS, _split_tables, patch_foreground
from .natural import (
    OPACITY,
    _background,
    _blend,
    _bundled_photos,
    _digit_mattes,
    _folder_photos,
    _pick_colour,
    fragment_crop,
)
from .samples import RenderCache, RenderedTask, checked_index

__all__ = ["FRAME", "FRAMES", "PATCH", "MovingDigits", "token_recall", "write_videos"]

FRAME = 48  # frame side in pixels
FRAMES = 8
PATCH = 8  # the patch size the task is measured and documented for (36 patches per frame)
PAN_SPEED = (1.5, 3.0)  # camera pan, px per frame, random direction
PANORAMA = FRAME + math.ceil(PAN_SPEED[1] * (FRAMES - 1)) + 1  # the rendered background's side
CROP_SIDES = (140, 420)  # photo pixels mapped onto the panorama (digits-natural's scale: 128 .. 384 -> 64)
DIGIT_SIDES = (16, 18, 20, 22)
DIGIT_DRIFT = (0.0, 0.75)  # the digit's residual motion in the frame, px per frame
FRAGMENT_SPEED = (1.0, 3.0)  # drifting distractors, px per frame
STILL_SHARE = 0.5  # share of distractors that the camera follows (still in the frame, like the digit)
FRAGMENT_COVER = 2.0  # distractor patches of frame 0 >= this x the digit's patches of frame 0
MAX_FRAGMENTS = 12
PLACEMENT_TRIES = 24
DEFAULT_LENGTHS = {"train": 20_000, "val": 1_000, "test": 1_000}
RULES = ("framediff", "leastchange", "pixel", "random")


def _track(rng: np.random.Generator, speed: tuple[float, float], length: int = FRAMES) -> np.ndarray:
    """``(length, 2)`` integer offsets ``(dy, dx)`` of a straight path at a random speed and direction."""
    v = float(rng.uniform(*speed))
    angle = float(rng.uniform(0, 2 * math.pi))
    t = np.arange(length, dtype=np.float64)
    return np.stack([np.rint(v * math.sin(angle) * t), np.rint(v * math.cos(angle) * t)], axis=1).astype(np.int64)


def _start_range(offsets: np.ndarray, size: int, side: int) -> tuple[int, int, int, int]:
    """Start positions ``(y_lo, y_hi, x_lo, x_hi)`` (inclusive) keeping a ``size`` square on the path
    ``offsets`` inside a ``side`` square on every frame."""
    lo, hi = offsets.min(0), offsets.max(0)
    return int(-lo[0]), int(side - size - hi[0]), int(-lo[1]), int(side - size - hi[1])


def _patch_set(alpha: np.ndarray) -> set[int]:
    rows, cols = np.nonzero(alpha > INK_THRESHOLD)
    return set(((rows // PATCH) * (FRAME // PATCH) + cols // PATCH).tolist())


class MovingDigits(RenderedTask):
    """Virtual dataset of clips of a handwritten digit on a panning photograph (module docstring);
    clip ``i`` is a pure function of ``(seed, split, i)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: source digits and photographs disjoint across splits.
        length: number of (virtual) clips; defaults to 20 000 / 1 000 / 1 000.
        seed: changes which clips are drawn, never which sources belong to a split.
        cache: keep generated clips in memory (58 KB per distinct index, per process).
        backgrounds: a folder of photographs (searched recursively) panned over instead of the
            split's bundled ones (``iared make-dataset moving-digits --backgrounds DIR``: the task over
            a user's own scenes). Checked and decoded here: an empty or unreadable folder raises a
            one-line ``ValueError`` naming it.

    Items are ``(clip, label, masks)``: float32 ``(8, 3, 48, 48)`` in [0, 1] (8-bit levels); ``int`` in
    0..9; bool ``(8, 48, 48)``, True on the digit's pixels of each frame.
    """

    PIXELS = "clip"
    MASK = "masks"

    num_classes = 10
    in_chans = 3
    image_size = FRAME
    num_frames = FRAMES
    classes = tuple(str(c) for c in range(10))

    def __init__(self, split: str = "train", length: int | None = None, seed: int = 0, cache: bool = True,
                 backgrounds: str | os.PathLike | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        length = DEFAULT_LENGTHS[split] if length is None else length
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split, self.length, self.seed, self.cache = split, int(length), int(seed), bool(cache)
        self._split_index = SPLITS.index(split)
        self._memo = RenderCache(self.length, (FRAMES, 3, FRAME, FRAME), (FRAMES, FRAME, FRAME))
        self.backgrounds = None if backgrounds is None else str(Path(backgrounds).expanduser().resolve())
        self._photos()  # fail now, not in the middle of training

    def _photos(self) -> tuple[np.ndarray, ...]:
        return _bundled_photos(self.split) if self.backgrounds is None else _folder_photos(self.backgrounds)

    def __repr__(self) -> str:
        bg = "" if self.backgrounds is None else f", backgrounds={self.backgrounds!r}"
        return f"MovingDigits(split={self.split!r}, length={self.length}, seed={self.seed}{bg})"

    @property
    def source_indices(self) -> np.ndarray:
        """Sorted indices into ``sklearn.datasets.load_digits()`` of this split's source digits."""
        return _split_tables(self.split)[0]

    def render(self, i) -> dict:
        """Generate clip ``i`` with its parts, for inspection and tests.

        Returns a dict: ``clip`` float32 (8, 3, 48, 48) in [0, 1]; ``label``; ``masks`` bool (8, 48, 48);
        ``digit_alpha`` / ``clutter_alpha`` float32 (8, 48, 48) (clutter: max over distractors);
        ``source``; ``fragment_sources``; ``fragment_still`` (bool per distractor); ``photo`` (index into
        the split's photographs); ``pan`` (8, 2) camera offsets; ``digit_path`` (8, 2) digit positions.
        """
        i = checked_index(self, i)
        rng = np.random.default_rng([self.seed, self._split_index, i, FRAMES])
        indices, by_class = _split_tables(self.split)
        label = int(rng.integers(10))
        pool = by_class[label]
        source = int(pool[rng.integers(len(pool))])

        photos = self._photos()
        photo = int(rng.integers(len(photos)))
        panorama = _background(photos[photo], rng, permute=self.split == "train", size=PANORAMA,
                               crop_sides=CROP_SIDES)
        pan = _track(rng, PAN_SPEED)
        py0, py1, px0, px1 = _start_range(pan, FRAME, PANORAMA)
        oy, ox = int(rng.integers(py0, py1 + 1)), int(rng.integers(px0, px1 + 1))
        frames = np.stack([panorama[oy + dy: oy + dy + FRAME, ox + dx: ox + dx + FRAME] for dy, dx in pan])
        mean_frame = frames.mean(0)

        side = int(DIGIT_SIDES[rng.integers(len(DIGIT_SIDES))])
        mattes, boxes = _digit_mattes(side)
        drift = _track(rng, DIGIT_DRIFT)
        y_lo, y_hi, x_lo, x_hi = _start_range(drift, side, FRAME)
        y0, x0 = int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))
        digit_path = drift + np.array([y0, x0])
        matte = mattes[source] * np.float32(rng.uniform(*OPACITY))
        colour, contrast = _pick_colour(mean_frame, matte, y0, x0, rng)
        digit_alpha = np.zeros((FRAMES, FRAME, FRAME), np.float32)
        for t, (y, x) in enumerate(digit_path):
            digit_alpha[t, y: y + side, x: x + side] = matte
            _blend(frames[t], matte, int(y), int(x), colour)
        masks = digit_alpha > INK_THRESHOLD
        t_, b_, l_, r_ = (int(v) for v in boxes[source])
        top, bottom = int(digit_path[:, 0].min()) + t_ - MARGIN, int(digit_path[:, 0].max()) + b_ + MARGIN
        left, right = int(digit_path[:, 1].min()) + l_ - MARGIN, int(digit_path[:, 1].max()) + r_ + MARGIN
        n_digit = len(_patch_set(digit_alpha[0]))

        clutter_alpha = np.zeros((FRAMES, FRAME, FRAME), np.float32)
        covered: set[int] = set()
        fragment_sources: list[int] = []
        fragment_still: list[bool] = []
        contrasts = [contrast]
        misses = 0
        while len(fragment_sources) < MAX_FRAGMENTS and len(covered) < FRAGMENT_COVER * n_digit and misses < 8:
            f_src, crop = fragment_crop(mattes, indices, source, side, rng)
            size = crop.shape[0]
            still = bool(rng.random() < STILL_SHARE)
            path = _track(rng, DIGIT_DRIFT if still else FRAGMENT_SPEED)
            fy_lo, fy_hi, fx_lo, fx_hi = _start_range(path, size, FRAME)
            start = None
            for _ in range(PLACEMENT_TRIES):
                if fy_lo > fy_hi or fx_lo > fx_hi:
                    break
                fy, fx = int(rng.integers(fy_lo, fy_hi + 1)), int(rng.integers(fx_lo, fx_hi + 1))
                ys, xs = path[:, 0] + fy, path[:, 1] + fx
                apart = (ys + size <= top) | (ys >= bottom) | (xs + size <= left) | (xs >= right)
                if apart.all():
                    start = (fy, fx)
                    break
            if start is None:
                misses += 1
                continue
            f_colour, f_contrast = _pick_colour(mean_frame, crop, start[0] + int(path[0, 0]),
                                                start[1] + int(path[0, 1]), rng)
            for t, (dy, dx) in enumerate(path):
                y, x = start[0] + int(dy), start[1] + int(dx)
                _blend(frames[t], crop, y, x, f_colour)
                region = clutter_alpha[t, y: y + size, x: x + size]
                np.maximum(region, crop, out=region)
            covered |= _patch_set(clutter_alpha[0])
            fragment_sources.append(f_src)
            fragment_still.append(still)
            contrasts.append(f_contrast)

        clip = np.rint(frames.transpose(0, 3, 1, 2) * 255) / np.float32(255)  # 8 bits, as in a lossless video
        return {
            "clip": np.ascontiguousarray(clip, dtype=np.float32), "label": label, "masks": masks,
            "digit_alpha": digit_alpha, "clutter_alpha": clutter_alpha, "source": source,
            "fragment_sources": fragment_sources, "fragment_still": fragment_still, "photo": photo,
            "pan": pan + np.array([oy, ox]), "digit_path": digit_path, "contrasts": contrasts,
        }


# -- measurements ------------------------------------------------------------------------------


def _geometry(num_frames: int, img_size: int, patch: int):
    """A minimal TimeSformer of the clips' geometry: the floors read pixels through its ``patch_pixels``."""
    from iared.models.timesformer import TimeSformer, TimeSformerConfig

    return TimeSformer(TimeSformerConfig(img_size=img_size, patch_size=patch, num_frames=num_frames, depth=1,
                                         embed_dim=8, num_heads=1, num_classes=1))


def token_recall(clips: torch.Tensor, masks: torch.Tensor, rule: str = "framediff", keep: float = 0.3,
                 patch: int = PATCH, seed: int = 0) -> torch.Tensor:
    """Share of the digit's space-time tokens among the ``keep`` fraction of a clip's patch tokens that
    ``rule`` ranks highest, per clip.

    Args:
        clips: float ``(B, T, C, H, W)``. masks: bool ``(B, T, H, W)``.
        rule: ``framediff`` (:func:`iared.reducers.floors.frame_change`: most change since the previous
            frame), ``leastchange`` (its reverse), ``pixel`` (:func:`iared.reducers.floors.patch_std`, the
            pixel floor's score) or ``random`` (uniform scores from ``seed``).

    Returns:
        float ``(B,)``: |top-k ∩ digit tokens| / |digit tokens|, ``k = round(keep * T * H/p * W/p)``.
    """
    from iared.reducers.floors import frame_change, patch_std

    b, t, _, h, w = clips.shape
    geometry = _geometry(t, h, patch)
    if rule in ("framediff", "leastchange"):
        score = frame_change(geometry, clips)
        score = -score if rule == "leastchange" else score
    elif rule == "pixel":
        score = patch_std(geometry, clips)
    elif rule == "random":
        score = torch.rand(b, t * (h // patch) * (w // patch), generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown rule {rule!r}: expected one of {', '.join(RULES)}")
    k = max(1, round(keep * score.shape[1]))
    top = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
    fg = patch_foreground(masks.flatten(0, 1), patch).reshape(b, -1)
    return (top & fg).sum(1).float() / fg.sum(1).clamp(min=1).float()


# -- writing a dataset to disk -------------------------------------------------------------------


def write_videos(split: str, n: int, out: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
                 progress: bool = True, backgrounds: str | os.PathLike | None = None) -> Path:
    """Render ``n`` clips of ``moving-digits`` to ``out/videos/<label>/NNNNN.mp4`` (H.264 RGB, crf 0:
    lossless, 8 fps) and the digit masks (0 / 255) to ``out/masks/<label>/NNNNN/<frame>.png``.

    A video holds the clip's 8 frames and the last one again: TimeSformer's segment sampler
    (:func:`iared.data.video.sample_indices`, segments of ``(n - 1) / 8`` frames) reads frames 0 .. 7 of
    9 frames, so ``VideoFolder`` (mean 0, std 1, 48 px) returns exactly the generated clip; of 8 frames
    it would read 0, 1, 2, 3, 4, 4, 5, 6. ``backgrounds``: a folder of photographs instead of the
    split's bundled ones (:class:`MovingDigits`).

    ``out`` is checked before any work (an existing non-empty ``out`` is refused unless ``overwrite``);
    files go to a temporary folder beside ``out`` renamed into place at the end
    (:func:`iared.files.write_folder_atomic`), so ``out`` is never half written.
    """
    import av
    from PIL import Image

    from iared.files import write_folder_atomic

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    dataset = MovingDigits(split, length=int(n), seed=seed, cache=False, backgrounds=backgrounds)

    def fill(tmp: Path) -> None:
        from tqdm.auto import tqdm

        width = max(5, len(str(n - 1)))
        for i in tqdm(range(n), desc=f"make-dataset moving-digits {split}", disable=not progress,
                      dynamic_ncols=True, mininterval=1.0):
            clip, label, masks = dataset[i]
            name = f"{i:0{width}d}"
            video = tmp / "videos" / str(label) / f"{name}.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            frames = (clip.numpy().transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)
            with av.open(str(video), "w") as container:
                stream = container.add_stream("libx264rgb", rate=8, options={"crf": "0", "preset": "medium"})
                stream.width, stream.height, stream.pix_fmt = FRAME, FRAME, "rgb24"
                for f in [*frames, frames[-1]]:  # 9 frames: the segment sampler then reads 0 .. 7
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            folder = tmp / "masks" / str(label) / name
            folder.mkdir(parents=True, exist_ok=True)
            for t, m in enumerate(masks.numpy()):
                Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"{t}.png")

    return write_folder_atomic(out, fill)
