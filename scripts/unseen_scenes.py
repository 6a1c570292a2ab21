"""The shipped models on scenes they never saw: both embedded tasks rendered over a folder of photographs
that no split holds (default: the 60 ImageNet photos of ``shared/data/imagenet-sample``), against the
bundled test split, in one run, same models and clock (issue 32). Writes one JSON::

    python scripts/unseen_scenes.py --threads 1 --clock cpu --timing-runs 5 --json docs/unseen-scenes.json

Per task: the backbone's top-1 and the pruned model's top-1, kept fractions, GFLOPs and measured
speed-up (``--timing-runs`` interleaved runs, reported as a range) on

- ``bundled``: the test split over its bundled photographs, the pruned file's stored threshold;
- ``unseen``: the test split's digits over the unseen photographs, the stored threshold;
- ``unseen_calibrated``: the same, thresholds calibrated (:func:`iared.calibration.calibrate_thresholds`)
  on unlabelled *validation-split* renders over the same photographs (other digits, other crops), to
  the per-stage kept fractions the model has on the bundled test split;
- ``unseen_random`` / ``unseen_pixel``: the random-dropping and pixel-saliency floors (no learning) at the
  calibrated model's per-stage kept shares.

Accuracy differences carry a paired bootstrap interval (:func:`iared.stats.paired_bootstrap`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from iared.calibration import calibrate_thresholds
from iared.data import build_dataset
from iared.files import write_json
from iared.loading import load_pruned_checked
from iared.reducers.registry import build_reduced, runner
from iared.stats import paired_bootstrap
from iared.timing import machine_info, median_ms, speed_probe_ms, time_interleaved, use_threads

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
ASSETS = Path(__file__).resolve().parents[1] / "src" / "iared" / "assets"
TASKS = {  # task: (pruned file, test items, timing batch)
    "digits-natural": ("digits_natural_pruned.pt", 1000, 64),
    "moving-digits": ("moving_digits_pruned.pt", 500, 8),
}


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, *_ in items]), torch.tensor([y for _, y, *_ in items])


@torch.inference_mode()
def predictions(fn, x: torch.Tensor, batch: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted classes ``(N,)``, kept fraction per stage ``(N, G)`` (None for the backbone) and MACs ``(N,)``."""
    preds, kept, macs = [], [], []
    for s in range(0, len(x), batch):
        out = fn(x[s: s + batch])
        if isinstance(out, torch.Tensor):
            preds.append(out.argmax(-1))
            continue
        preds.append(out.logits.argmax(-1))
        kept.append(out.kept_fraction())
        macs.append(out.macs)
    return torch.cat(preds), (torch.cat(kept) if kept else None), (torch.cat(macs) if macs else None)


def row(name, correct, kept, macs, full_macs, backbone_correct) -> dict:
    r = {"top1": float(correct.double().mean())}
    if kept is not None:
        r.update(kept_fraction=[round(float(v), 4) for v in kept.mean(0)], gflops=float(macs.mean()) / 1e9,
                 speedup_ideal=full_macs / float(macs.mean()))
        d = paired_bootstrap(correct, backbone_correct)
        r["top1_minus_backbone"] = {k: round(v, 5) for k, v in d.items()}
    print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    return r


def measure_task(task: str, photos: Path, n_test: int, n_calib: int, timing_batch: int, timing_runs: int,
                 clock: str = "wall") -> dict:
    pruned_file, _, _ = TASKS[task]
    model = load_pruned_checked(ASSETS / pruned_file).eval()
    backbone = model.backbone
    stored = model.inference.threshold
    full_macs = model.full_macs()
    print(f"{task}: {pruned_file}, stored threshold {stored}")
    data = {"bundled": stacked(build_dataset(task, "test", length=n_test, cache=False)),
            "unseen": stacked(build_dataset(task, "test", length=n_test, cache=False, backgrounds=photos))}
    calib_x, _ = stacked(build_dataset(task, "val", length=n_calib, cache=False, backgrounds=photos))
    result = {"pruned_file": pruned_file, "stored_threshold": stored, "n_test": n_test,
              "n_calibration_unlabelled": n_calib, "rows": {}}

    def dropin(threshold):
        return lambda x: model(x, "threshold", threshold=threshold, layout="padded")

    bundled_kept = None
    for where, (x, y) in data.items():
        bb_correct = predictions(backbone, x)[0] == y
        result["rows"][f"{where}_backbone"] = row(f"{where} backbone", bb_correct, None, None, full_macs, None)
        pred, kept, macs = predictions(dropin(stored), x)
        result["rows"][where] = row(where, pred == y, kept, macs, full_macs, bb_correct)
        if where == "bundled":
            bundled_kept = [float(v) for v in kept.mean(0)]
        else:
            calibrated = calibrate_thresholds(model, calib_x, bundled_kept, warn=False)
            pred, kept, macs = predictions(dropin(calibrated), x)
            r = row("unseen calibrated", pred == y, kept, macs, full_macs, bb_correct)
            result["rows"]["unseen_calibrated"] = {"thresholds": calibrated, "target_kept": bundled_kept, **r}
            shares = [r["kept_fraction"][0]] + [b / a for a, b in zip(r["kept_fraction"], r["kept_fraction"][1:])]
            for floor_name in ("random", "pixel"):  # the no-learning floors at the same budget
                floor = build_reduced(floor_name, backbone, shares, model.stage_starts, seed=0)
                pred, kept, macs = predictions(runner(floor_name, floor, shares), x)
                result["rows"][f"unseen_{floor_name}"] = {
                    "keep_ratio": shares, **row(f"unseen {floor_name}", pred == y, kept, macs, full_macs, bb_correct)}
            unseen_x = x
    # measured speed: the backbone and the pruned model at each threshold, interleaved, same batch
    runs = {"bundled": [], "unseen": [], "unseen_calibrated": []}
    batches = {"bundled": data["bundled"][0][:timing_batch], "unseen": unseen_x[:timing_batch],
               "unseen_calibrated": unseen_x[:timing_batch]}
    thresholds = {"bundled": stored, "unseen": stored, "unseen_calibrated": result["rows"]["unseen_calibrated"]["thresholds"]}
    with torch.inference_mode():
        for _ in range(timing_runs):
            fns = {"backbone": lambda: backbone(batches["unseen"])}
            for k in runs:
                fns[k] = lambda k=k: model(batches[k], threshold=thresholds[k])
            times = time_interleaved(fns, "cpu", clock=clock)
            for k in runs:
                runs[k].append(median_ms(times["backbone"]) / median_ms(times[k]))
    for k, speedups in runs.items():
        result["rows"][k]["speedup_measured_runs"] = [round(s, 3) for s in speedups]
        result["rows"][k]["speedup_measured_range"] = [round(min(speedups), 3), round(max(speedups), 3)]
        print(f"  {k}: measured speed-up {min(speedups):.2f}-{max(speedups):.2f}x over {timing_runs} runs")
    result["timing"] = {"batch": timing_batch, "runs": timing_runs, "threads": torch.get_num_threads(), "clock": clock,
                        "layout": "packed (threshold mode's default)", "speed_probe_ms": speed_probe_ms("cpu")}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", default=str(PHOTOS), help=f"unseen photographs (default: {PHOTOS})")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--calibration", type=int, default=256, help="unlabelled validation renders to calibrate on")
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--n", type=int, help="test items per task (default: 1000 images, 500 clips)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: process CPU time, robust to other jobs on a shared machine with --threads 1")
    p.add_argument("--json", default="docs/unseen-scenes.json")
    args = p.parse_args()
    photos = Path(args.photos)
    if not photos.is_dir():
        raise SystemExit(f"no photographs at {photos}")
    use_threads(args.threads)
    result = {"photos": str(photos.name), "machine": machine_info(), "tasks": {}}
    for task in args.tasks.split(","):
        _, n, batch = TASKS[task]
        n = args.n or n
        result["tasks"][task] = measure_task(task, photos, n, args.calibration, batch, args.timing_runs, args.clock)
    result["machine_end"] = machine_info()
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
