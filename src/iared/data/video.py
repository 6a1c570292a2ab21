"""Video folders decoded with PyAV: ``root/<class>/<video>`` as TimeSformer clips.

Layout: every non-hidden subfolder of ``root`` is a class (sorted names -> labels 0, 1, ...) holding
video files (nested folders allowed). An item is ``(clip, label)`` with ``clip`` a float tensor
``(T, C, H, W)``: frames first, the layout :meth:`iared.models.timesformer.TimeSformer.embed` takes
per clip, so a standard ``DataLoader`` stacks clips into ``(B, T, C, H, W)`` (the official
TimeSformer code takes ``(B, C, T, H, W)``: ``clips.transpose(1, 2)``).

Frame sampling, as TimeSformer samples Something-Something (``timesformer/datasets/ssv2.py``): the
``n`` decodable frames are cut into ``T`` equal segments (``seg = (n - 1) / T``, segment i spans
``round(seg * i)`` to ``round(seg * (i + 1))``); evaluation takes the middle of every segment
(deterministic), training a uniformly random frame of every segment. **Short videos** (fewer
decodable frames than ``T``) repeat frames, as TimeSformer's samplers do (segments shorter than
one frame land on the same frame); ``min_frames`` turns a video with fewer decodable frames into
an error instead (``min_frames=T``: never repeat).

Spatial processing, as TimeSformer's ``spatial_sampling``: evaluation resizes the shorter side to
``img_size`` (bilinear, ``align_corners=False``) and takes the centre ``img_size`` square; training
resizes the shorter side to a random length in ``scale_range * img_size`` (TimeSformer: 256 to 320
for 224 crops), takes a random square and flips it horizontally with probability 0.5 (``flip``;
off for Something-Something, where left and right are labels). Then ``(x / 255 - mean) / std``
with the model's ``mean`` / ``std`` (:meth:`VideoFolder.for_model` reads them, with ``img_size``
and ``num_frames``, off the model's config).

Training draws are a pure function of ``(seed, epoch, index)`` (:meth:`VideoFolder.set_epoch`), so
they do not depend on the number of loader workers or on which worker reads an item.

Broken files: every problem is a one-line :class:`BadVideoError` naming the file: empty (0 bytes),
not a readable container (corrupt, or truncated before its index), no video stream (audio-only),
unsupported codec (no decoder in this FFmpeg), corrupt frame data, no decodable frame, truncated
(the header announces frames that do not decode: fewer than 90 % of them), too short (fewer than
``min_frames`` decodable frames). :meth:`VideoFolder.check` finds them before any work starts: by
default (``check="decode"``) every frame of every file is decoded once at construction, which also
records the exact frame counts (Kinetics' 10 s clips at 340x256: about 0.25 s each on one core);
``check="open"`` only opens each file and decodes its first frame (headers, codecs, audio-only;
truncation and length are found when the item is read); ``check="none"`` defers everything.
``skip_bad=True`` drops the bad files found by the check instead of raising, keeps them in
``skipped`` (path, problem) and says how many on stderr once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from iared.data.folders import _normalise_extensions, _walk_images
from iared.models.timesformer import KINETICS_MEAN, KINETICS_STD

__all__ = [
    "VIDEO_EXTENSIONS",
    "BadVideoError",
    "VideoFolder",
    "VideoInfo",
    "clip_transform",
    "load_clip",
    "probe_video",
    "read_frames",
    "sample_indices",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv",
                    ".3gp", ".ts")
TRUNCATED_FRACTION = 0.9  # fewer decodable frames than this fraction of the header's count: truncated
Check = Literal["decode", "open", "none"]


class BadVideoError(ValueError):
    """A video file that cannot be used; ``path`` names it, the message is one line."""

    def __init__(self, path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"bad video {path}: {problem}")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learnt about a file. ``frames``: decodable frames when ``exact``, else
    the header's announcement (0: unknown)."""

    path: Path
    frames: int
    exact: bool
    width: int
    height: int
    codec: str
    fps: float


def _one_line(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split()) or type(e).__name__


def _av():
    """PyAV, imported when a video is first opened (the embedded tasks and image work never need it)."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"decoding videos needs PyAV: pip install av ({_one_line(e)})") from None
    return av


def _open(path: Path):
    """``(container, video stream)``, or a BadVideoError for files that are not usable videos."""
    av = _av()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"video file not found: {path}") from None
    if path.is_dir():
        raise BadVideoError(path, "is a directory, not a video file")
    if size == 0:
        raise BadVideoError(path, "file is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except PermissionError:
        raise  # the file may be fine: calling it corrupt would mislead
    except av.error.FFmpegError as e:
        raise BadVideoError(path, f"not a readable video container, corrupt or truncated ({_one_line(e)})") from None
    try:
        if not container.streams:  # e.g. an MP4 cut before its index (moov), which sits at the end
            raise BadVideoError(path, "not a readable video container, corrupt or truncated (no streams found)")
        if not container.streams.video:
            kinds = ", ".join(f"{s.type} {s.codec_context.name if s.codec_context else '?'}"
                              for s in container.streams) or "none"
            raise BadVideoError(path, f"no video stream (streams: {kinds}; audio-only?)")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise BadVideoError(path, f"unsupported codec: no decoder for its video stream in this FFmpeg "
                                      f"(PyAV {av.__version__})")
    except BaseException:
        container.close()
        raise
    return container, stream


def _announced_frames(container, stream) -> int:
    """Frames the header announces: the stream's count, else duration x frame rate, else 0 (unknown)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if container.duration and rate:
        return int(round(container.duration / 1e6 * float(rate)))
    return 0


def _decode(path: Path, container, stream, stop: int | None = None):
    """Decode frames in order, yielding ``(index, frame)`` up to index ``stop`` (inclusive; None: all).
    Decoder errors become BadVideoError."""
    av = _av()
    index = -1
    try:
        for frame in container.decode(stream):
            index += 1
            yield index, frame
            if stop is not None and index >= stop:
                return
    except av.error.DecoderNotFoundError:
        raise BadVideoError(path, f"unsupported codec {stream.codec_context.name!r}: no decoder in this FFmpeg "
                                  f"(PyAV {av.__version__})") from None
    except av.error.FFmpegError as e:
        raise BadVideoError(path, f"corrupt video data after frame {index + 1} ({_one_line(e)})") from None


def _check_count(path: Path, decoded: int, announced: int, min_frames: int) -> None:
    if decoded == 0:
        raise BadVideoError(path, "no decodable video frame")
    if announced and decoded < TRUNCATED_FRACTION * announced:
        raise BadVideoError(path, f"truncated: the header announces {announced} frames, only {decoded} decode")
    if decoded < min_frames:
        raise BadVideoError(path, f"too short: {decoded} decodable frames, need at least {min_frames}")


def probe_video(path, decode: bool = True, min_frames: int = 1) -> VideoInfo:
    """Check that ``path`` is a usable video; every problem is a one-line :class:`BadVideoError`.

    ``decode=True`` decodes every frame (exact count; finds truncation, corrupt data and short
    videos); ``False`` decodes the first frame only and reports the header's frame count.
    """
    path = Path(path)
    container, stream = _open(path)
    with container:
        announced = _announced_frames(container, stream)
        stop = None if decode else 0
        decoded = sum(1 for _ in _decode(path, container, stream, stop=stop))
        if decode:
            _check_count(path, decoded, announced, min_frames)
        elif decoded == 0:
            raise BadVideoError(path, "no decodable video frame")
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(path, decoded if decode else announced, decode, stream.width, stream.height,
                         stream.codec_context.name, float(rate) if rate else 0.0)


def sample_indices(available: int, num_frames: int, train: bool = False,
                   rng: np.random.Generator | None = None) -> list[int]:
    """TimeSformer's segment sampling of ``num_frames`` indices from ``available`` frames (module
    docstring): the middle of each of ``num_frames`` equal segments, or with ``train`` a random frame
    of each (``rng``, default a fresh unseeded one). Fewer frames than ``num_frames`` repeat frames."""
    if available < 1:
        raise ValueError(f"cannot sample frames from a video with {available} frames")
    seg = (available - 1) / num_frames
    rng = rng if rng is not None else np.random.default_rng()
    out = []
    for i in range(num_frames):
        start, end = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        out.append(int(rng.integers(start, end + 1)) if train else (start + end) // 2)
    return out


def read_frames(path, indices: Sequence[int]) -> np.ndarray:
    """``(len(indices), H, W, 3)`` uint8 RGB frames at ``indices`` (repeats allowed) of the video at ``path``.

    Decodes in order and stops after the last index. A video that ends before the last index is a
    :class:`BadVideoError` (:meth:`VideoFolder.load` samples from counts it decoded itself).
    """
    path = Path(path)
    wanted = sorted(set(indices))
    container, stream = _open(path)
    with container:
        keep = set(wanted)
        frames = {i: f.to_ndarray(format="rgb24")
                  for i, f in _decode(path, container, stream, wanted[-1]) if i in keep}
    if len(frames) < len(wanted):
        missing = [i for i in wanted if i not in frames]
        raise BadVideoError(path, f"frame {missing[0]} does not decode (the video ends after "
                                  f"{len(frames)} of the {len(wanted)} wanted frames)")
    return np.stack([frames[i] for i in indices])


def clip_transform(frames: np.ndarray, img_size: int, mean: Sequence[float], std: Sequence[float],
                   train: bool = False, rng: np.random.Generator | None = None,
                   scale_range: tuple[float, float] = (256 / 224, 320 / 224), flip: bool = True) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 frames -> ``(T, 3, img_size, img_size)`` float32, TimeSformer's spatial
    sampling (module docstring): evaluation resizes the shorter side to ``img_size`` and centre-crops;
    training resizes it to a random length in ``scale_range * img_size``, crops at random and flips."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        lo, hi = (int(round(s * img_size)) for s in scale_range)
        short = int(rng.integers(max(lo, img_size), max(hi, img_size) + 1))
    else:
        short = img_size
    if h <= w:
        size = (short, max(short, int(round(w * short / h))))
    else:
        size = (max(short, int(round(h * short / w))), short)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    h, w = size
    if train:
        top, left = int(rng.integers(0, h - img_size + 1)), int(rng.integers(0, w - img_size + 1))
    else:
        top, left = (h - img_size) // 2, (w - img_size) // 2
    x = x[:, :, top: top + img_size, left: left + img_size]
    if train and flip and rng.random() < 0.5:
        x = x.flip(-1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1) * 255
    return ((x - m) / s).contiguous()


def load_clip(path, num_frames: int, img_size: int, mean: Sequence[float] = KINETICS_MEAN,
              std: Sequence[float] = KINETICS_STD) -> torch.Tensor:
    """One video file as a model input ``(T, C, img_size, img_size)``: decoded and counted
    (:func:`probe_video`), ``num_frames`` evaluation samples (:func:`sample_indices`), resized, centre-cropped
    and normalised (:func:`clip_transform`), as :class:`VideoFolder` reads its items in evaluation.
    A broken file raises the one-line :class:`BadVideoError` naming it."""
    info = probe_video(path, decode=True)
    frames = read_frames(path, sample_indices(info.frames, num_frames))
    return clip_transform(frames, img_size, mean, std)


def _say(message: str) -> None:
    print(f"iared: {message}", file=sys.stderr)


class VideoFolder(torch.utils.data.Dataset):
    """Videos in ``root/<class>/<video>`` as ``(clip (T, C, H, W), label)`` items (module docstring).

    Args:
        root: dataset folder; every non-hidden subfolder is a class and must hold a video.
        num_frames, img_size, mean, std: the model's input (:meth:`for_model` reads them off it).
        train: random segment offsets, scale jitter, random crop and flip; else deterministic.
        seed: training draws are a function of ``(seed, epoch, index)``; :meth:`set_epoch` moves on.
        check: ``decode`` (every frame of every file, at construction), ``open`` (headers and first
            frames) or ``none`` (problems surface when an item is read).
        skip_bad: drop files the check finds bad (listed in ``skipped``) instead of raising.
        min_frames: videos with fewer decodable frames are bad (default 1: short videos repeat frames).

    Attributes mirror :class:`iared.data.folders.ImageFolderDataset`: ``classes``, ``class_to_idx``,
    ``samples`` ``[(Path, label)]``, ``targets``; ``frame_counts`` (decodable frames per sample when
    the check decoded them, else the header's count, 0 when unknown).
    """

    def __init__(self, root, num_frames: int = 8, img_size: int = 224, mean: Sequence[float] = KINETICS_MEAN,
                 std: Sequence[float] = KINETICS_STD, train: bool = False, seed: int = 0, flip: bool = True,
                 scale_range: tuple[float, float] = (256 / 224, 320 / 224),
                 extensions: Iterable[str] = VIDEO_EXTENSIONS, check: Check = "decode", skip_bad: bool = False,
                 min_frames: int = 1):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"video folder not found: {root}")
        if check not in ("decode", "open", "none"):
            raise ValueError(f"check must be 'decode', 'open' or 'none', got {check!r}")
        if num_frames < 1 or min_frames < 1:
            raise ValueError(f"num_frames and min_frames must be >= 1, got {num_frames}, {min_frames}")
        exts = _normalise_extensions(extensions)
        classes = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
        files = {c: _walk_images(root / c, exts) for c in classes}
        if not any(files.values()):
            raise ValueError(f"no videos found in {root} (expected {root}/<class>/<video> with extension "
                             f"{', '.join(exts)})")
        empty = [c for c in classes if not files[c]]
        if empty:
            shown = ", ".join(empty[:5]) + (f" ... ({len(empty)} in all)" if len(empty) > 5 else "")
            raise ValueError(f"video folder {root}: class folder(s) without videos: {shown}")
        self.root = root
        self.num_frames, self.img_size = int(num_frames), int(img_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.train, self.seed, self.flip, self.scale_range = train, int(seed), flip, tuple(scale_range)
        self.min_frames = int(min_frames)
        self.epoch = 0
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = [(p, self.class_to_idx[c]) for c in classes for p in files[c]]
        self.frame_counts = [0] * len(self.samples)
        self._exact = [False] * len(self.samples)
        self.skipped: list[tuple[Path, str]] = []
        if check != "none":
            self.check(decode=check == "decode", skip_bad=skip_bad)

    @classmethod
    def for_model(cls, root, model, **kwargs) -> VideoFolder:
        """A folder feeding ``model`` (or its config): ``num_frames``, ``img_size``, ``mean``, ``std``."""
        cfg = getattr(model, "cfg", model)
        for name in ("num_frames", "img_size", "mean", "std"):
            kwargs.setdefault(name, getattr(cfg, name))
        return cls(root, **kwargs)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check(self, decode: bool = True, skip_bad: bool = False) -> None:
        """Probe every file (:func:`probe_video`); record frame counts. A bad file raises (naming it, and
        counting the others) or, with ``skip_bad``, leaves the dataset and is listed in ``skipped``."""
        good, counts, exact, bad = [], [], [], []
        for (path, label) in self.samples:
            try:
                info = probe_video(path, decode=decode, min_frames=self.min_frames)
            except BadVideoError as e:
                bad.append(e)
                continue
            good.append((path, label))
            counts.append(info.frames)
            exact.append(info.exact)
        if bad and not skip_bad:
            more = f"; {len(bad) - 1} more bad video(s) in {self.root}" if len(bad) > 1 else ""
            raise BadVideoError(bad[0].path, f"{bad[0].problem}{more} (skip them with skip_bad=True)")
        if not good:
            raise ValueError(f"video folder {self.root}: every video is bad ({len(bad)}; first: {bad[0]})")
        self.skipped += [(e.path, e.problem) for e in bad]
        if bad:
            _say(f"{self.root}: skipped {len(bad)} bad video(s) of {len(self.samples)} (first: {bad[0]})")
        self.samples, self.frame_counts, self._exact = good, counts, exact

    def set_epoch(self, epoch: int) -> None:
        """Training draws of the next pass are those of ``epoch`` (call it once per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"VideoFolder(root={str(self.root)!r}, videos={len(self)}, classes={len(self.classes)}, "
                f"frames={self.num_frames}, size={self.img_size}, train={self.train})")

    def load(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``(T, H, W, 3)`` uint8: the sampled frames of sample ``i`` before spatial processing."""
        path, _ = self.samples[i]
        count, exact = self.frame_counts[i], self._exact[i]
        if count and exact:
            return read_frames(path, sample_indices(count, self.num_frames, self.train, rng))
        # Unknown or announced count: decode once to count (checks as the decode pass would), then read.
        info = probe_video(path, decode=True, min_frames=self.min_frames)
        self.frame_counts[i], self._exact[i] = info.frames, True
        return read_frames(path, sample_indices(info.frames, self.num_frames, self.train, rng))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        frames = self.load(i, rng)
        clip = clip_transform(frames, self.img_size, self.mean, self.std, self.train, rng, self.scale_range,
                              self.flip)
        return clip, self.samples[i][1]
