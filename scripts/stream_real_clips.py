"""Stream the real clips of ``shared/data/video`` with a random-weight DeiT-S, frame by frame.

Random weights say nothing about accuracy: this measures speed and the share of tokens the gates
recompute on real camera footage, against the per-frame model (every gate open) on the same frames,
clock and process. Writes one JSON (default ``docs/stream-real-clips-deit-s.json``)::

    python scripts/stream_real_clips.py --frames 32 --json docs/stream-real-clips-deit-s.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from iared.files import write_json
from iared.models import create_model
from iared.stream_eval import read_stream, stream_records
from iared.streaming import GatePolicy, Stream
from iared.timing import machine_info, use_threads

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", default=str(DATA), help=f"folder of clips (default: {DATA})")
    p.add_argument("--frames", type=int, default=32, help="first N frames of each clip")
    p.add_argument("--policies", default="all,threshold:0.1,threshold:0.3",
                   help="comma-separated gate rules, RULE[:VALUE]; 'all' is the per-frame model")
    p.add_argument("--json", default="docs/stream-real-clips-deit-s.json")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    use_threads(args.threads)
    clips = sorted(f for f in Path(args.videos).iterdir() if f.suffix in (".mp4", ".avi"))
    if not clips:
        raise SystemExit(f"no clips in {args.videos}")
    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224").eval()
    cfg = model.cfg
    result = {"model": "deit_small_patch16_224 (random weights, seed 0)", "frames_per_clip": args.frames,
              "machine": machine_info(), "clips": []}
    for clip in clips:
        stream_input = read_stream(clip, cfg.img_size, cfg.in_chans, cfg.mean, cfg.std, args.frames)
        rows = {}
        for text in args.policies.split(","):
            rule, _, value = text.partition(":")
            stream = Stream(model, GatePolicy(rule, float(value) if value else 0.0))
            *_, last = stream_records(stream, [stream_input])
            rows[text] = {k: last["summary"][k] for k in ("frames_per_s", "macs_reduction", "recomputed")}
            print(f"{clip.name} {text}: {rows[text]}")
        full_fps = rows.get("all", {}).get("frames_per_s")
        for row in rows.values():
            if full_fps:
                row["speedup_vs_all"] = row["frames_per_s"] / full_fps
        result["clips"].append({"clip": clip.name, "frames": int(stream_input.frames.shape[0]), "policies": rows})
    result["machine_end"] = machine_info()
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
