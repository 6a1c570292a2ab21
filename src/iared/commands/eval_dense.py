"""``iared eval-dense``: mIoU, pixel accuracy, GFLOPs and measured speed of a dense (DPT) model,
unpruned against IA-RED²-pruned on the same images (:func:`iared.evaluate_dense.evaluate_dense`)."""

from __future__ import annotations

import argparse

from iared.commands import (
    add_checkpoint_argument,
    add_config_file_argument,
    add_json_argument,
    add_task_argument,
    check_json_path,
    parse_floats,
    resolve_task,
    write_report,
)
from iared.evaluate_dense import evaluate_dense
from iared.files import check_output_dir
from iared.timing import use_threads


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval-dense", help="segmentation quality and speed of a DPT model, unpruned vs pruned",
                              description=__doc__.split("\n\n")[0])
    add_config_file_argument(p)
    add_checkpoint_argument(p, "dense checkpoint: train-dense's DIR/dense.pt (or its DIR/checkpoint.pt)", required=True)
    add_task_argument(p, "embedded task or folder with masks")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only")
    p.add_argument("--threshold", type=parse_floats, metavar="T[,T...]",
                   help="interpreter threshold, one or comma-separated per stage (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--throughput-batch", type=int, default=64, metavar="B")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per throughput figure (median)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="timing clock: wall, or this process's CPU time (steadier on a shared machine, 1 thread)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--png-dir", metavar="DIR", help="also write one PNG per image: truth, predictions, kept tokens")
    p.add_argument("--png-count", type=int, default=8)
    add_json_argument(p, "write the report as JSON to PATH", bare=True, old=("--save-json",))
    p.set_defaults(func=main)
    return p


def format_report(r: dict) -> str:
    u, p = r["unpruned"], r["pruned"]
    lines = [f"{r['task']} {r['split']} (n={r['n']}, threshold {r['threshold']})",
             (f"  unpruned: mIoU {100 * u['miou']:.2f}  pixel acc {100 * u['pixel_accuracy']:.2f}  "
              f"{u['gflops']:.4f} GFLOPs"),
             (f"  pruned:   mIoU {100 * p['miou']:.2f}  pixel acc {100 * p['pixel_accuracy']:.2f}  "
              f"{p['gflops']:.4f} GFLOPs  kept {p['kept_fraction']}")]
    t = r.get("throughput")
    if t:
        lines.append(f"  batch {t['batch_size']}, {t['threads']} threads, {t['clock']} clock: {t['throughput_unpruned']:.0f} -> "
                     f"{t['throughput_pruned']:.0f} img/s ({t['speedup']:.2f}x)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    use_threads(args.threads)
    check_json_path(args.json)
    if args.png_dir:
        check_output_dir(args.png_dir, "--png-dir folder")
    task = resolve_task(args.task, args.checkpoint)
    report = evaluate_dense(args.checkpoint, task=task, split=args.split, limit=args.limit,
                            threshold=args.threshold, throughput_batch=args.throughput_batch, repeats=args.repeats,
                            device=args.device, batch_size=args.batch_size, png_dir=args.png_dir,
                            png_count=args.png_count, clock=args.clock)
    write_report(report, format_report(report), args.json)
    return 0
