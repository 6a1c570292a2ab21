"""IA-RED² on MViTv2: measured speed-up against the FLOPs-ideal one (random weights, budget mode).

    iared bench-mvit --model mvitv2_tiny --batch 8 --keep 0.7 --threads 1 --out docs/mvit-efficiency.json

The unpruned backbone and the pruned model (one interpreter before each of the first three
resolution stages, :meth:`iared.models.mvit.MultiScaleViT.default_stage_starts`, each keeping
``keep`` of its grid's tokens, top-k) are timed interleaved through :func:`iared.timing.time_interleaved`,
with both the wall clock and this process's CPU clock (on a shared machine the CPU clock counts
only the work done). ``efficiency = measured speed-up / FLOPs speed-up``; FLOPs count the
interpreters. A per-block breakdown (forward hooks, CPU clock, one thread) says where the time goes.
"""

from __future__ import annotations

import time

import torch

from iared.models import create_model
from iared.pruning import IARed
from iared.timing import machine_info, median_ms, time_interleaved


def block_times(model: IARed, run, calls: int = 3) -> list[float]:
    """CPU milliseconds per call spent in each backbone block (median over ``calls``), via forward
    hooks. This process's CPU clock: on a shared machine the wall clock of one block is mostly noise."""
    blocks = model.backbone.blocks
    samples: list[list[float]] = [[] for _ in blocks]
    started: dict[int, float] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: started.__setitem__(i, time.process_time())))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: samples[i].append((time.process_time() - started[i]) * 1e3)))
    try:
        for _ in range(calls):
            run()
    finally:
        for h in handles:
            h.remove()
    return [sorted(s)[len(s) // 2] for s in samples]


def mvit_efficiency(model_name: str = "mvitv2_tiny", batch: int = 8, keep: float = 0.7, repeats: int = 7,
                    warmup: int = 1, seed: int = 0, num_stages: int = 3) -> dict:
    torch.manual_seed(seed)
    backbone = create_model(model_name).eval()
    model = IARed(backbone, num_stages=num_stages).eval()
    images = torch.randn(batch, 3, backbone.cfg.img_size, backbone.cfg.img_size)
    full_macs, pruned_macs = model.full_macs(), model.macs_for_ratios(keep)
    fns = {"full": lambda: backbone(images), "pruned": lambda: model(images, "budget", keep_ratio=keep)}
    report = {"machine": machine_info("cpu"), "model": model_name, "batch": batch, "dtype": "float32",
              "keep_ratio": keep, "mode": "budget", "stage_starts": list(model.stage_starts),
              "weights": "random (timm's initialisation)", "gflops_full": full_macs / 1e9,
              "gflops_pruned": pruned_macs / 1e9, "flops_speedup": full_macs / pruned_macs, "clocks": {}}
    with torch.inference_mode():
        out = fns["pruned"]()
        assert abs(float(out.macs[0]) - pruned_macs) < 1.0  # the analytic prediction is the run's own count
        report["kept_per_stage"] = [float(k.float().mean()) for k in out.keep]
        for clock in ("wall", "cpu"):
            times = time_interleaved(fns, warmup=warmup, repeats=repeats, clock=clock)
            full, pruned = median_ms(times["full"]), median_ms(times["pruned"])
            report["clocks"][clock] = {"full_ms": full, "pruned_ms": pruned, "speedup": full / pruned,
                                       "efficiency": (full / pruned) / report["flops_speedup"], "times_ms": times}
        per_full = block_times(model, fns["full"])
        per_pruned = block_times(model, fns["pruned"])
    rows = []
    for i, block in enumerate(backbone.blocks):
        n_full = backbone.block_input_shape(i)[0]
        n_alive = int(out.tokens_per_block[i][0])
        rows.append({"block": i, "grid": f"{block.size}x{block.size}", "width": block.dim_out,
                     "changes_grid": block.changes_grid, "alive": n_alive, "tokens": n_full,
                     "macs_ratio": float(block.macs(n_alive) / block.macs(n_full)),
                     "full_ms": per_full[i], "pruned_ms": per_pruned[i], "time_ratio": per_pruned[i] / per_full[i]})
    report["blocks"] = rows
    report["blocks_ms"] = {"full": sum(per_full), "pruned": sum(per_pruned)}
    return report


def format_report(report: dict) -> str:
    """The human-readable lines of a :func:`mvit_efficiency` report."""
    lines = [f"{clock:4s}: full {r['full_ms']:.0f} ms, pruned {r['pruned_ms']:.0f} ms, speed-up {r['speedup']:.3f}x "
             f"of FLOPs-ideal {report['flops_speedup']:.3f}x -> efficiency {r['efficiency']:.2f}"
             for clock, r in report["clocks"].items()]
    lines += [f"block {row['block']:2d} {row['grid']:>5s} w{row['width']:<4d} alive {row['alive']:5d}/{row['tokens']:<5d} "
              f"MACs x{row['macs_ratio']:.2f} time x{row['time_ratio']:.2f} ({row['full_ms']:.0f} -> {row['pruned_ms']:.0f} ms)"
              for row in report["blocks"]]
    return "\n".join(lines)
