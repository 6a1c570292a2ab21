"""Streaming applications: run a model over a video, a folder of frames or the embedded stream task
frame by frame (:func:`stream_records`), and compare streaming reuse with IA-RED², their combination,
the floors and ToMe on ``digit-streams`` (:func:`compare_streaming`).

The comparison picks every knob on the validation sequences (the setting with the fewest MACs whose
per-frame accuracy is within ``max_loss`` points of the full per-frame model) and reports the test
sequences once: per-frame top-1 with a paired bootstrap interval over sequences for the difference
to the full model, MACs per frame, and measured frames/s of a batch of streams, every method timed
interleaved with the full model on the same frames and clock.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from iared.stages import ReducedModel
from iared.stats import paired_bootstrap
from iared.streaming import GatePolicy, Stream, run_stream
from iared.timing import machine_info, median_ms, time_interleaved

STREAM_TASK = "digit-streams"
DEFAULT_CHECKPOINT = "digits_natural_pruned.pt"  # the shipped IA-RED² model the stream task is rendered for


def default_checkpoint() -> Path:
    from importlib import resources

    return Path(str(resources.files("iared") / "assets" / DEFAULT_CHECKPOINT))


# -- inputs -------------------------------------------------------------------------------------

@dataclass
class StreamInput:
    """One stream: ``frames`` ``(T, C, H, W)`` normalised for the model, ``labels`` ``(T,)`` or None."""

    name: str
    frames: Tensor
    labels: Tensor | None = None


def _say(message: str) -> None:
    print(f"iared stream: {message}", file=sys.stderr)


def _fit(frames: Tensor, size: int, name: str) -> Tensor:
    """``(T, C, H, W)`` in [0, 255] -> shorter side resized to ``size``, centre crop (said once when it changes)."""
    h, w = frames.shape[-2:]
    if (h, w) != (size, size):
        _say(f"{name}: frames resized from {w}x{h} to the model's {size}x{size} (shorter side, centre crop)")
    short = size
    out_hw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    if out_hw != (h, w):
        frames = F.interpolate(frames, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    top, left = (out_hw[0] - size) // 2, (out_hw[1] - size) // 2
    return frames[:, :, top: top + size, left: left + size]


def _normalise(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=frames.dtype).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=frames.dtype).view(1, -1, 1, 1) * 255
    return ((frames - m) / s).contiguous()


def read_stream(path: str | Path, img_size: int, in_chans: int, mean, std, max_frames: int | None = None) -> StreamInput:
    """A video file or a folder of frame images (sorted by name) as one stream for a model of
    ``img_size`` / ``in_chans`` / ``mean`` / ``std``. Problems are one-line errors naming the path."""
    from iared.data import VIDEO_EXTENSIONS
    from iared.data.folders import list_images, load_image, to_model_channels
    from iared.data.video import probe_video, read_frames

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such video or folder: {path}")
    if path.is_dir():
        files = list_images(path)
        if max_frames:
            files = files[:max_frames]
        arrays = []
        for f in files:
            img = to_model_channels(load_image(f), in_chans, f)
            arrays.append(np.asarray(img, dtype=np.float32).reshape(img.size[1], img.size[0], -1))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{path}: frames of different sizes {sorted(shapes)[:2]}: a stream needs one frame size")
        frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(f"{path}: not a video ({', '.join(VIDEO_EXTENSIONS)}) or a folder of frames")
        if in_chans != 3:
            raise ValueError(f"{path}: a video feeds RGB frames, the model takes {in_chans} channels")
        info = probe_video(path, decode=not max_frames)  # with a limit: the header's count, no full decode
        count = min(info.frames, max_frames) if max_frames and info.frames else max_frames or info.frames
        frames = torch.from_numpy(read_frames(path, range(count))).permute(0, 3, 1, 2).float()
    return StreamInput(str(path), _normalise(_fit(frames, img_size, str(path)), mean, std))


def task_streams(split: str = "test", length: int | None = None, frames: int | None = None) -> list[StreamInput]:
    """The embedded ``digit-streams`` sequences (already in ``digits_natural_vit``'s input format)."""
    from iared.data.streams import FRAMES, DigitStreams

    data = DigitStreams(split, length=length, frames=frames or FRAMES)
    out = []
    for i in range(len(data)):
        x, labels, _ = data[i]
        out.append(StreamInput(f"{STREAM_TASK}/{split}/{i}", x, labels))
    return out


def batched(streams: Sequence[StreamInput]) -> tuple[Tensor, Tensor | None]:
    """Streams of one length as ``(B, T, C, H, W)`` frames and ``(B, T)`` labels (None if any is unlabelled)."""
    lengths = {s.frames.shape[0] for s in streams}
    if len(lengths) != 1:
        raise ValueError(f"streams of different lengths {sorted(lengths)}: run them one at a time")
    labels = None if any(s.labels is None for s in streams) else torch.stack([s.labels for s in streams])
    return torch.stack([s.frames for s in streams]), labels


# -- per-frame records ----------------------------------------------------------------------------

def stream_records(stream: Stream, streams: Sequence[StreamInput], classes: Sequence[str] | None = None,
                   top_k: int = 1, on_tokens: Callable[..., None] | None = None) -> Iterator[dict]:
    """One dict per frame of every stream (the JSON lines of ``iared stream``), then a summary dict
    (``{"summary": ...}``). Streams of one length run as one batch; frames/s is each step's measured
    rate over the batch. ``on_tokens(names, t, frames, state)`` sees every step (heatmap strips)."""
    frames, labels = batched(streams)
    B, T = frames.shape[:2]
    state = stream.init(B, frames.device)
    full = stream.model.full_macs()
    totals = {"frames": 0, "seconds": 0.0, "macs": 0.0, "correct": 0, "labelled": 0, "recomputed": 0.0}
    for t in range(T):
        t0 = time.perf_counter()
        logits, state = stream.step(frames[:, t], state)
        seconds = time.perf_counter() - t0
        if on_tokens is not None:
            on_tokens([s.name for s in streams], t, frames[:, t], state)
        stats = state.last
        prob = logits.float().softmax(-1)
        top_p, top_i = prob.topk(min(top_k, prob.shape[-1]), dim=-1)
        alive = stats.alive.double().clamp_min(1)
        share = (stats.recomputed.double().sum(-1) / (3 * alive)).mean(-1)  # of alive tokens, over blocks
        kept = stats.alive.double().mean(-1) / stream.num_tokens
        for b in range(B):
            rec = {"stream": streams[b].name, "frame": t,
                   "top_k": [{"index": int(i), **({"label": classes[int(i)]} if classes else {}),
                              "probability": round(float(p), 6)} for p, i in zip(top_p[b], top_i[b])],
                   "macs": float(stats.macs[b]), "macs_ratio": round(float(stats.macs[b]) / full, 5),
                   "kept": round(float(kept[b]), 4), "recomputed": round(float(share[b]), 4),
                   "key_frame": bool(stats.key[b]), "frames_per_s": round(B / max(seconds, 1e-9), 2)}
            if labels is not None:
                rec["label"] = int(labels[b, t])
                rec["correct"] = int(top_i[b, 0]) == int(labels[b, t])
                totals["correct"] += rec["correct"]
                totals["labelled"] += 1
            totals["macs"] += rec["macs"]
            totals["recomputed"] += rec["recomputed"]
            yield rec
        totals["frames"] += B
        totals["seconds"] += seconds
    n = max(totals["frames"], 1)
    summary = {"streams": B, "frames": totals["frames"], "policy": stream.policy.describe(),
               "frames_per_s": round(totals["frames"] / max(totals["seconds"], 1e-9), 2),
               "macs_per_frame": totals["macs"] / n, "full_macs_per_frame": full,
               "macs_reduction": full * n / max(totals["macs"], 1.0), "recomputed": totals["recomputed"] / n}
    if totals["labelled"]:
        summary["top1"] = totals["correct"] / totals["labelled"]
    yield {"summary": summary}


# -- the comparison on digit-streams ---------------------------------------------------------------

@dataclass
class StreamCompareConfig:
    """``iared stream --compare``: every method on ``digit-streams``, knobs chosen on validation."""

    checkpoint: str | None = None  # a pruned checkpoint over digits_natural_vit (default: the shipped one)
    val_streams: int = 16
    test_streams: int = 32
    frames: int = 64
    max_loss: float = 1.0  # points of per-frame top-1 a setting may lose on validation
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # the reuse gate's relative change
    tome_r: tuple[int, ...] = (2, 4, 6, 8, 10)
    repeats: int = 5  # timed rounds per method (interleaved); ranges reported
    clock: str = "wall"  # iared.timing's clocks: wall, or cpu (process CPU time; robust to other jobs at 1 thread)
    bootstrap: int = 2000
    seed: int = 0


@dataclass
class _Method:
    """A way to run a batch of streams: ``run(frames (B, T, ...)) -> (logits (B, T, K), macs (B, T), share)``,
    ``share`` the mean share of alive tokens its gates recomputed (None for per-frame methods)."""

    name: str
    knob: dict
    run: Callable[[Tensor], tuple[Tensor, Tensor, float | None]]
    extra: dict = field(default_factory=dict)


def _per_frame(model: ReducedModel, **kw) -> Callable[[Tensor], tuple[Tensor, Tensor, None]]:
    """The model on every frame from scratch (``frames (B, T, ...)``): the per-frame baselines."""

    @torch.no_grad()
    def run(frames):
        B, T = frames.shape[:2]
        logits, macs = [], []
        for t in range(T):
            out = model(frames[:, t], **kw)
            logits.append(out.logits)
            macs.append(out.macs.double().cpu().expand(B))
        return torch.stack(logits, 1), torch.stack(macs, 1), None

    return run


def _streamed(stream: Stream) -> Callable[[Tensor], tuple[Tensor, Tensor, float]]:
    def run(frames):
        r = run_stream(stream, frames)
        alive = r["alive"].double().clamp_min(1)[..., None]
        # after the first frame, which every rule computes in full
        return r["logits"], r["macs"], float((r["recomputed"][:, 1:].double() / alive[:, 1:]).mean())

    return run


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float()  # (S, T)


def compare_streaming(cfg: StreamCompareConfig, progress: Callable[[str], None] = _say) -> dict:
    """Run the comparison (module docstring) and return its JSON-ready result."""
    from iared.loading import load_pruned_checked
    from iared.reducers.registry import build_reduced, forward_kwargs

    path = cfg.checkpoint or str(default_checkpoint())
    iared = load_pruned_checked(path).eval()
    backbone = iared.backbone
    full_model = ReducedModel(backbone, [None], [0]).eval()
    threshold = iared.inference.threshold
    progress(f"rendering {cfg.val_streams} validation and {cfg.test_streams} test sequences of {cfg.frames} frames")
    val_x, val_y = batched(task_streams("val", cfg.val_streams, cfg.frames))
    test_x, test_y = batched(task_streams("test", cfg.test_streams, cfg.frames))
    full_macs = full_model.full_macs()

    def methods_for(knobs_of: dict[str, list[_Method]]) -> list[_Method]:
        return [m for ms in knobs_of.values() for m in ms]

    base = {
        "full": [_Method("full", {}, _per_frame(full_model))],
        "iared": [_Method("iared", {"threshold": threshold}, _per_frame(iared, mode="threshold", threshold=threshold))],
    }
    sweeps = {
        "reuse": [_Method("reuse", {"rule": "threshold", "value": v}, _streamed(Stream(backbone, GatePolicy("threshold", v))))
                  for v in cfg.thresholds],
        "iared+reuse": [_Method("iared+reuse", {"threshold": threshold, "rule": "threshold", "value": v},
                                _streamed(Stream(iared, GatePolicy("threshold", v))))
                        for v in cfg.thresholds],
        "tome": [_Method("tome", {"r": r}, _per_frame(build_reduced("tome", backbone, r).eval(),
                                                      **forward_kwargs("tome", r))) for r in cfg.tome_r],
    }

    memo: dict[tuple[int, int], dict] = {}

    def measure(method: _Method, x: Tensor, y: Tensor) -> dict:
        key = (id(method), id(x))
        if key not in memo:
            logits, macs, share = method.run(x)
            correct = _accuracy(logits, y)
            memo[key] = {"correct": correct, "top1": float(correct.mean()), "macs": float(macs.mean()),
                         "recomputed": share}
        return memo[key]

    progress("validation: full per-frame model and IA-RED²")
    val = {name: measure(ms[0], val_x, val_y) for name, ms in base.items()}
    full_val = val["full"]["top1"]
    chosen: dict[str, _Method] = {name: ms[0] for name, ms in base.items()}
    selection = {}
    for name, ms in sweeps.items():
        rows = []
        for m in ms:
            r = measure(m, val_x, val_y)
            rows.append({"knob": m.knob, "top1": r["top1"], "macs": r["macs"], "recomputed": r["recomputed"],
                         "loss_pt": 100 * (full_val - r["top1"])})
            progress(f"validation {name} {m.knob}: top-1 {100 * r['top1']:.2f} %, {r['macs'] / 1e6:.1f} M MACs")
        ok = [i for i, row in enumerate(rows) if row["loss_pt"] <= cfg.max_loss]
        pick = min(ok, key=lambda i: rows[i]["macs"]) if ok else max(range(len(rows)), key=lambda i: rows[i]["top1"])
        chosen[name] = ms[pick]
        selection[name] = {"sweep": rows, "chosen": ms[pick].knob, "within_loss": bool(ok)}

    # Floors at the chosen reuse-only budget: the same share of tokens recomputed at random, by pixel
    # change (its value picked on validation to spend no more MACs), and key frames only.
    reuse = chosen["reuse"]
    reuse_val = measure(reuse, val_x, val_y)
    share = reuse_val["recomputed"]
    floors = {"random": [_Method("random", {"rule": "random", "value": round(share, 4)},
                                 _streamed(Stream(backbone, GatePolicy("random", share, seed=cfg.seed))))]}
    pixel = []
    for v in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
        m = _Method("pixel", {"rule": "pixel", "value": v}, _streamed(Stream(backbone, GatePolicy("pixel", v))))
        r = measure(m, val_x, val_y)
        pixel.append((r["macs"], v, m))
    affordable = [p for p in pixel if p[0] <= reuse_val["macs"]]
    floors["pixel"] = [min(affordable, key=lambda p: p[1])[2] if affordable else min(pixel, key=lambda p: p[0])[2]]
    combined_val = measure(chosen["iared+reuse"], val_x, val_y)
    every = max(2, round(full_macs / combined_val["macs"]))
    floors["keyframes"] = [_Method("keyframes", {"rule": "hold", "keyframe_every": every},
                                   _streamed(Stream(backbone, GatePolicy("hold", keyframe_every=every))))]
    rules = {"random": "the reuse-only choice's share of recomputed tokens after frame 0, on validation",
             "pixel": "the smallest pixel change spending no more MACs than the reuse-only choice on validation",
             "keyframes": "the key-frame interval nearest to IA-RED²+reuse's MACs on validation"}
    for name, ms in floors.items():
        chosen[name] = ms[0]
        selection[name] = {"chosen": ms[0].knob, "rule": rules[name]}
    selection["pixel"]["within_budget"] = bool(affordable)

    progress("test: every method once")
    order = ["full", "iared", "reuse", "iared+reuse", "tome", "random", "pixel", "keyframes"]
    test = {name: measure(chosen[name], test_x, test_y) for name in order}
    full_correct = test["full"]["correct"]
    rows = []
    for name in order:
        r = test[name]
        diff = paired_bootstrap(r["correct"], full_correct, resamples=cfg.bootstrap, seed=cfg.seed)
        rows.append({"method": name, "knob": chosen[name].knob, "top1": r["top1"], "recomputed": r["recomputed"],
                     "delta_pt": {k: 100 * v for k, v in diff.items()},
                     "macs_per_frame": r["macs"], "macs_reduction": full_macs / r["macs"]})
        progress(f"test {name}: top-1 {100 * r['top1']:.2f} % ({100 * diff['mean']:+.2f} pt), "
                 f"{full_macs / r['macs']:.2f}x fewer MACs")

    progress(f"timing {len(order)} methods, {cfg.repeats} interleaved rounds over {tuple(test_x.shape[:2])} streams x frames")
    info_start = machine_info()
    times = time_interleaved({name: (lambda m=chosen[name]: m.run(test_x)) for name in order},
                             warmup=1, repeats=cfg.repeats, min_ms=0, clock=cfg.clock)
    frames_total = test_x.shape[0] * test_x.shape[1]
    for row in rows:
        t = times[row["method"]]
        fps = [frames_total / (ms / 1e3) for ms in t]
        ratio = [times["full"][i] / t[i] for i in range(len(t))]  # per round: same machine state
        row["frames_per_s"] = {"min": min(fps), "median": float(np.median(fps)), "max": max(fps)}
        row["speedup"] = {"min": min(ratio), "median": float(np.median(ratio)), "max": max(ratio)}
        row["ms_per_batch_step"] = median_ms(t) / test_x.shape[1]
    return {
        "task": STREAM_TASK, "checkpoint": Path(path).name, "config": asdict(cfg), "threads": torch.get_num_threads(),
        "streams": {"val": list(val_x.shape[:2]), "test": list(test_x.shape[:2])},
        "full_macs_per_frame": full_macs, "validation": {"full_top1": full_val, "selection": selection},
        "test": rows, "machine": info_start, "machine_end": machine_info(),
        "notes": ("knobs chosen on validation (fewest MACs within max_loss of the full model); test reported "
                  "once; delta_pt: paired bootstrap over sequences (95 % interval); frames_per_s and speedup: "
                  "ranges over interleaved timing rounds of the whole test batch of streams"),
    }


def format_compare(result: dict) -> str:
    lines = [f"{'method':<12} {'knob':<40} {'top-1':>7} {'delta pt [95% CI]':>22} {'MACs':>6} {'frames/s':>18}"]
    for r in result["test"]:
        d, f = r["delta_pt"], r["frames_per_s"]
        knob = ", ".join(f"{k}={v}" for k, v in r["knob"].items()) or "-"
        lines.append(f"{r['method']:<12} {knob:<40} {100 * r['top1']:6.2f}% "
                     f"{d['mean']:+6.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {r['macs_reduction']:5.2f}x "
                     f"{f['min']:6.0f}-{f['max']:6.0f} ({r['speedup']['median']:.2f}x)")
    return "\n".join(lines)
