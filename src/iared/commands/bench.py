"""``iared bench``: throughput and latency of unpruned vs threshold (packed / padded) vs budget mode
(:mod:`iared.bench`); options map one to one onto :class:`iared.bench.BenchConfig`."""

from __future__ import annotations

import argparse
import sys

from iared.bench import CLOCKS, BenchConfig, format_table, run
from iared.commands import (
    add_calibration_arguments,
    add_checkpoint_argument,
    add_config_file_argument,
    add_json_argument,
    add_list_argument,
    check_calibration_options,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from iared import bench

    p = subparsers.add_parser(
        "bench", help="throughput and latency: unpruned vs threshold (packed / padded) vs budget mode",
        description=bench.__doc__.split("\n\n")[0],
    )
    add_config_file_argument(p)
    p.add_argument("--model", default=None, metavar="NAME",
                   help="backbone geometry with random weights (default DeiT-S; 'digits' = the embedded task's "
                        "digits_vit; timesformer_base_patch16_224 etc.: video); with --checkpoint FILE: how to build the file's backbone weights")
    add_checkpoint_argument(p, "a pruned IA-RED² checkpoint (timed at its threshold), or backbone weights "
                               "(official DeiT .pth, state dict, safetensors: fresh interpreters, calibrated)")
    p.add_argument("--threshold", type=float, help="threshold for a pruned --checkpoint (default: the one it records)")
    p.add_argument("--keep", type=float, default=BenchConfig.keep,
                   help="random-weight models: mean kept fraction per stage (thresholds calibrated on the batch)")
    p.add_argument("--frames", type=int, default=None,
                   help="video models with random weights (timesformer_*): frames per clip (default: the model's)")
    p.add_argument("--task", metavar="TASK", help="time on this task's test images (e.g. digits-clutter) instead of Gaussian noise; "
                                  "useful with --checkpoint, whose trained interpreters then keep realistic counts")
    p.add_argument("--device", default=BenchConfig.device, choices=["auto", "cpu", "cuda"],
                   help="default auto: cuda when available")
    add_list_argument(p, "--dtype", default=BenchConfig.dtypes, dest="dtypes", metavar="DTYPE",
                      help="float32, bfloat16, float16")
    add_list_argument(p, "--batch-sizes", int, default=BenchConfig.batch_sizes, metavar="B",
                      help="batch sizes (out-of-memory sizes are skipped)")
    add_list_argument(p, "--strategies", default=BenchConfig.strategies, metavar="STRATEGY",
                      help="packed-attention strategies to time (default: loop,bucket on CPU, where torch's nested "
                           "SDPA has only a slow math path; loop,bucket,nested on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="also time every configuration torch.compile'd (threshold modes with dynamic shapes), "
                        "interleaved with the eager runs; the compile column is eager ms / compiled ms")
    p.add_argument("--compile-mode", default=BenchConfig.compile_mode,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    p.add_argument("--repeats", type=int, default=BenchConfig.repeats, help="timed calls; the median is reported")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", default=BenchConfig.clock, choices=list(CLOCKS),
                   help="wall: elapsed time (default); cpu: process CPU time, robust to other jobs on a shared "
                        "machine when used with --threads 1")
    p.add_argument("--interpreter-std", type=float, default=BenchConfig.interpreter_std,
                   help="random-weight models: std of the re-initialised interpreter weights (score spread; "
                        "default sqrt(3 / embed_dim))")
    p.add_argument("--seed", type=int, default=BenchConfig.seed)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny geometry (unless --checkpoint), at most 1 warm-up and 2 timed calls")
    add_calibration_arguments(p, "the images timed (--task's test images, else Gaussian noise)")
    add_json_argument(p, "write the full report as JSON to PATH")  # written by iared.bench.run (BenchConfig.json)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    check_calibration_options(args)
    names = {f for f in BenchConfig.__dataclass_fields__}
    fields = {k: v for k, v in vars(args).items() if k in names}
    fields["model_given"] = args.model is not None
    if args.model is None:
        fields.pop("model")
    cfg = BenchConfig(**fields)
    report = run(cfg)
    table = format_table(report)
    print(table, file=sys.stderr if cfg.json == "-" else sys.stdout)
    return 0
