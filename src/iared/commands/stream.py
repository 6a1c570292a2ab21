"""``iared stream``: frame-by-frame inference that recomputes only the tokens that changed.

Inputs: video files, folders of frame images (sorted by name), or the embedded task
``digit-streams`` (the default). Output: one JSON line per frame (top classes, MACs, kept and
recomputed token shares, measured frames/s) and a summary line; ``--explain DIR`` writes one strip
per stream of recomputed / reused / dropped tokens. ``--compare`` runs every method and floor on
``digit-streams`` with knobs chosen on validation (:func:`iared.stream_eval.compare_streaming`).
The library side is :mod:`iared.streaming` and :mod:`iared.stream_eval`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from iared.commands import (
    add_calibration_arguments,
    add_json_argument,
    add_model_arguments,
    check_calibration_options,
    check_json_path,
    finish_calibration,
    model_options,
    write_report,
)
from iared.streaming import GATE_RULES, GatePolicy, Stream

# the value a rule given without one takes ("--policy top" = "--policy top:0.3")
DEFAULT_VALUES = {"threshold": 0.1, "top": 0.3, "random": 0.3, "pixel": 0.05, "all": 0.0, "hold": 0.0}
from iared.timing import use_threads


def _policy(text: str) -> tuple[str, float | None]:
    """``threshold:0.1`` / ``top:0.3`` / ``all`` -> (rule, value or None)."""
    rule, _, value = text.partition(":")
    if rule not in GATE_RULES:
        raise argparse.ArgumentTypeError(f"unknown gate rule {rule!r}: expected one of {', '.join(GATE_RULES)} "
                                         "(RULE or RULE:VALUE, e.g. threshold:0.1)")
    try:
        return rule, float(value) if value else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"gate value must be a number, got {value!r} in {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("stream", help="stream videos frame by frame, recomputing only changed tokens",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", metavar="VIDEO|FOLDER",
                   help="video files or folders of frames (default: the embedded digit-streams test sequences)")
    add_model_arguments(p, "the model: a pruned IA-RED² checkpoint (its interpreters drop tokens, the gates reuse "
                           "the rest) or backbone weights (reuse only); default: the shipped digits-natural model",
                        pretrained_help="with --model and no --checkpoint: timm's download (network needed); "
                                        "without it the model has random weights")
    p.add_argument("--policy", type=_policy, metavar="RULE[:VALUE]",
                   help="which tokens the gates recompute: threshold:X (relative change above X), top:F / random:F "
                        "(that fraction of alive tokens), pixel:X (patch pixels changed by X), all (every token: "
                        "the per-frame model), hold (key frames only; needs --keyframe-every); without a value: "
                        "threshold 0.1, top / random 0.3, pixel 0.05 (default: threshold:0.1)")
    p.add_argument("--keyframe-every", type=int, default=0, metavar="K", help="recompute everything every K frames")
    p.add_argument("--drift", type=float, default=0.0, metavar="D",
                   help="recompute everything when a stream's first-block tokens drifted by D (relative) since its "
                        "last key frame (default: off)")
    p.add_argument("--backbone-only", action="store_true", help="with a pruned checkpoint: drop no tokens, reuse only")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="the interpreters' keep threshold (default: the checkpoint's)")
    add_calibration_arguments(p, "frames of the streams given, evenly spaced over all of them")
    g = p.add_argument_group("the embedded task (no inputs)")
    g.add_argument("--split", default="test", choices=("val", "test"))
    g.add_argument("--streams", type=int, metavar="N",
                   help="sequences, streamed as one batch (default: 8; with --compare: 32 test sequences)")
    g.add_argument("--frames", type=int, default=64, metavar="T", help="frames per sequence (default: 64)")
    p.add_argument("--max-frames", type=int, metavar="N", help="videos and folders: the first N frames only")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="classes per frame in the output (default: 1)")
    add_json_argument(p, "write one JSON line per frame and a summary line to PATH (default: '-')")
    p.add_argument("--explain", metavar="DIR", help="write one PNG strip per stream: recomputed / reused / dropped tokens")
    p.add_argument("--compare", action="store_true",
                   help="every method and floor on digit-streams, knobs chosen on validation; --json gets the report")
    p.add_argument("--max-loss", type=float, default=1.0, metavar="PT",
                   help="--compare: per-frame top-1 points a setting may lose on validation (default: 1.0)")
    p.add_argument("--repeats", type=int, default=5, help="--compare: interleaved timing rounds (default: 5)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="--compare: wall (elapsed) or cpu (process CPU time, robust to other jobs with --threads 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.set_defaults(func=main, json="-")
    return p


def _load(args):
    """The model to stream and its class names: a pruned checkpoint whole, or a backbone."""
    from iared.checkpoint import read_checkpoint
    from iared.loading import is_pruned, load_backbone, load_pruned_checked
    from iared.stream_eval import default_checkpoint

    opts = model_options(args)
    if args.checkpoint is None and args.model is None:
        opts["checkpoint"] = str(default_checkpoint())
    if opts["checkpoint"] is not None and args.model is None and is_pruned(read_checkpoint(opts["checkpoint"])):
        model = load_pruned_checked(opts["checkpoint"])
        return (model.backbone if args.backbone_only else model), model
    return load_backbone(**opts), None


def main(args: argparse.Namespace) -> int:
    from iared.stream_eval import StreamCompareConfig, compare_streaming, format_compare

    use_threads(args.threads)
    check_json_path(args.json)
    for name in ("streams", "frames", "top_k", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.compare:
        if args.inputs:
            raise ValueError("--compare runs on the embedded digit-streams task: give no inputs")
        given = [flag for flag, value in (("--policy", args.policy), ("--keyframe-every", args.keyframe_every),
                                          ("--drift", args.drift), ("--threshold", args.threshold),
                                          ("--model", args.model), ("--backbone-only", args.backbone_only),
                                          ("--explain", args.explain),
                                          ("--target-kept", args.target_kept is not None)) if value]
        if given:
            raise ValueError(f"--compare chooses every method's settings on validation itself: {', '.join(given)} "
                             "do not apply")
        cfg = StreamCompareConfig(checkpoint=args.checkpoint, max_loss=args.max_loss, repeats=args.repeats,
                                  clock=args.clock, frames=args.frames,
                                  test_streams=args.streams or StreamCompareConfig.test_streams)
        result = compare_streaming(cfg)
        write_report(result, format_compare(result), None if args.json == "-" else args.json)
        return 0
    rule, value = args.policy or ("threshold", None)
    policy = GatePolicy(rule, DEFAULT_VALUES[rule] if value is None else value, keyframe_every=args.keyframe_every,
                        drift=args.drift)
    check_calibration_options(args)
    model, pruned = _load(args)
    kwargs = {}
    if pruned is not None and not args.backbone_only:
        if args.threshold is not None and not 0 <= args.threshold <= 1:
            raise ValueError(f"--threshold must lie in [0, 1], got {args.threshold}")
        kwargs = {"mode": "threshold",
                  "threshold": args.threshold if args.threshold is not None else pruned.inference.threshold}
    elif args.threshold is not None or args.target_kept is not None:
        flag = "--threshold" if args.threshold is not None else "--target-kept"
        raise ValueError(f"{flag} sets the interpreters' keep thresholds: it needs a pruned checkpoint "
                         "(and no --backbone-only)")
    streams = _inputs(args, model)
    if args.target_kept is not None:
        import torch

        from iared.stream_eval import default_checkpoint

        frames = torch.cat([s.frames for s in streams])
        picked = torch.linspace(0, len(frames) - 1, min(args.calibration_samples, len(frames))).round().long()
        kwargs["threshold"] = pruned.calibrate(frames[picked], args.target_kept).threshold
        finish_calibration(pruned, args.checkpoint or default_checkpoint(), args, "iared stream")
    stream = Stream(model, policy, record_tokens=bool(args.explain), **kwargs)
    strips = _Strips(streams, stream) if args.explain else None
    out = sys.stdout if args.json == "-" else None
    from iared.prediction import class_names
    from iared.stream_eval import stream_records

    records = []
    # digit-streams is rendered for the digits-natural model: its class names
    classes = class_names(stream.model.backbone.cfg.num_classes, None if args.inputs else "digits-natural")
    for group in _same_length(streams):
        for rec in stream_records(stream, group, classes, args.top_k, strips.add if strips else None):
            if out is not None:
                try:
                    print(json.dumps(rec), file=out, flush="summary" in rec)
                except BrokenPipeError:  # the reader (``| head``) is done: stop quietly, as Unix tools do
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
                    return 0
            records.append(rec)
    if out is None:
        _write_lines(args.json, records)
    if strips is not None:
        for path in strips.save(args.explain):
            print(f"iared stream: wrote {path}", file=sys.stderr)
    return 0


def _inputs(args, model):
    from iared.stream_eval import read_stream, task_streams

    backbone = getattr(model, "backbone", model)  # a pruned model, or the backbone alone
    if not args.inputs:
        if (backbone.cfg.img_size, backbone.cfg.in_chans) != (64, 3):
            raise ValueError(f"the embedded digit-streams task is 64x64 RGB; this model takes "
                             f"{backbone.cfg.img_size}x{backbone.cfg.img_size} x {backbone.cfg.in_chans}: give videos "
                             "or frame folders")
        return task_streams(args.split, args.streams or 8, args.frames)
    if args.streams is not None or args.split != "test":
        raise ValueError("--streams and --split choose digit-streams sequences: with videos or folders give neither")
    cfg = backbone.cfg
    for path in args.inputs:  # every input checked before any is decoded
        if not Path(path).exists():
            raise FileNotFoundError(f"no such video or folder: {path}")
    return [read_stream(path, cfg.img_size, cfg.in_chans, cfg.mean, cfg.std, args.max_frames) for path in args.inputs]


def _same_length(streams):
    """Streams grouped by frame count (each group runs as one batch), in input order of first appearance."""
    groups: dict[int, list] = {}
    for s in streams:
        groups.setdefault(s.frames.shape[0], []).append(s)
    return list(groups.values())


def _write_lines(path: str, records: list[dict]) -> None:
    from iared.files import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class _Strips:
    """Per-stream strips: the frames on top, under each the token map (red: recomputed, grey: reused,
    black: not computed), one column per frame."""

    def __init__(self, streams, stream: Stream):
        self.names = [s.name for s in streams]
        self.stream = stream
        self.frames: dict[str, list] = {n: [] for n in self.names}
        self.codes: dict[str, list] = {n: [] for n in self.names}

    def add(self, names, t, frames, state) -> None:
        for b, name in enumerate(names):
            self.frames[name].append(frames[b].float())
            self.codes[name].append(state.last.tokens[b])

    def save(self, folder: str) -> list[Path]:
        import io

        import numpy as np
        from PIL import Image

        from iared.files import write_bytes

        backbone = self.stream.model.backbone
        cfg = backbone.cfg
        grid, prefix = backbone.token_grid, backbone.num_prefix_tokens
        mean = np.array(cfg.mean, np.float32)[:, None, None]
        std = np.array(cfg.std, np.float32)[:, None, None]
        colours = np.array([[0, 0, 0], [150, 150, 150], [230, 40, 40]], np.uint8)
        Path(folder).mkdir(parents=True, exist_ok=True)
        paths = []
        for i, name in enumerate(self.names):
            columns = []
            for frame, codes in zip(self.frames[name], self.codes[name]):
                img = (frame.numpy() * std + mean).clip(0, 1)
                img = (img.transpose(1, 2, 0) * 255).astype(np.uint8)
                if img.shape[2] == 1:
                    img = img.repeat(3, 2)
                tokens = colours[codes[prefix:].numpy().astype(np.int64)].reshape(*grid, 3)
                scale = img.shape[0] // grid[0]
                tokens = tokens.repeat(scale, 0).repeat(scale, 1)
                columns.append(np.concatenate([img, tokens], 0))
            strip = Image.fromarray(np.concatenate(columns, 1))
            path = Path(folder) / f"stream-{i:03d}.png"
            buf = io.BytesIO()
            strip.save(buf, format="PNG")
            write_bytes(path, buf.getvalue())
            paths.append(path)
        return paths
