"""The prepared GPU benchmark (issue 27): every way of running a pruned ViT next to the unpruned one and
the peers, in one interleaved run per geometry and batch, into one JSON.

    python scripts/gpu_bench.py --json gpu-bench.json                 # on a GPU, ~7 minutes, bf16
    python scripts/gpu_bench.py --smoke --json /tmp/smoke.json        # CPU, tiny geometry, seconds (tests)

Geometries (random weights; speed needs none), in priority order, so a run cut short by its time
budget still has the most asked-for rows: DeiT-S at batch 64, 1, 256; DeiT-B at 64, 1, 256;
TimeSformer-B (8 frames) at batch 8. Per geometry and batch, timed interleaved (``iared.timing``):

- ``unpruned`` eager, ``unpruned+compile`` (inductor), ``unpruned+cudagraphs`` (compile mode
  ``reduce-overhead``: CUDA graphs);
- ``budget`` (top-k, dense; per stage threshold mode's mean count), eager and with CUDA graphs;
- ``threshold`` dynamic (packed, per-image counts: host reads), eager;
- ``threshold-static`` (each stage padded to a capacity, the largest per-image count of the batch:
  no host synchronisation), compiled ``fullgraph=True`` and with CUDA graphs;
- ``tome`` r = 8 and 13, ``evit`` keep 0.7 (their own placements), eager.

Thresholds keep 0.7 of the alive tokens per stage (quantiles of spread random interpreters, as
``iared bench``). Every row: median ms, speed-up over unpruned eager and over the fastest unpruned,
FLOPs-ideal speed-up from the stage loop's MACs. Candidates that fail (a compile error) keep their
error and the rest go on; compiled candidates are skipped once the time budget runs low. The JSON is
rewritten after every geometry, so a run killed by its time limit keeps what it finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from iared.bench import DTYPES, budget_ratios, calibrate_thresholds, spread_interpreters  # noqa: E402
from iared.calibration import capacity_from_outputs  # noqa: E402
from iared.files import write_json  # noqa: E402
from iared.models import create_model  # noqa: E402
from iared.models.families import input_shape  # noqa: E402
from iared.pruning import IARed  # noqa: E402
from iared.reducers.registry import build_reduced, runner  # noqa: E402
from iared.timing import machine_info, median_ms, time_interleaved  # noqa: E402

SUITE = [  # (label, model name, overrides, batch)
    ("deit-s", "deit_small_patch16_224", {}, 64), ("deit-s", "deit_small_patch16_224", {}, 1),
    ("deit-s", "deit_small_patch16_224", {}, 256), ("deit-b", "deit_base_patch16_224", {}, 64),
    ("deit-b", "deit_base_patch16_224", {}, 1), ("deit-b", "deit_base_patch16_224", {}, 256),
    ("timesformer-b", "timesformer_base_patch16_224", {"num_frames": 8}, 8),
]
SMOKE = [("tiny", "deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}, 4),
         ("tiny-video", "timesformer_base_patch16_224",
          {"num_frames": 2, "img_size": 32, "patch_size": 16, "depth": 3, "embed_dim": 48, "num_heads": 3}, 2)]
COMPILED = ("unpruned+compile", "unpruned+cudagraphs", "budget+cudagraphs", "threshold-static+compile",
            "threshold-static+cudagraphs")


def candidates(model: IARed, x: torch.Tensor, keep: float, compile_ok: bool, cuda: bool) -> dict:
    """name -> zero-argument callable, and name -> ideal speed-up (from the MACs of one call)."""
    thresholds = calibrate_thresholds(model, x, keep)
    with torch.inference_mode():
        ref = model(x, "threshold", threshold=thresholds)
    n_patches = model.backbone.num_tokens - model.backbone.num_prefix_tokens
    ratios = budget_ratios(ref, n_patches)
    capacity = capacity_from_outputs(model, [ref])  # the batch's largest count per stage
    backbone = model.backbone
    fns = {
        "unpruned": lambda: backbone(x),
        "budget": lambda: model(x, "budget", keep_ratio=ratios),
        "threshold": lambda: model(x, "threshold", threshold=thresholds),
    }
    peers = {"tome-r8": ("tome", 8), "tome-r13": ("tome", 13), "evit-0.7": ("evit", 0.7)}
    peer_models = {}
    for name, (method, knob) in peers.items():
        peer_models[name] = build_reduced(method, backbone, knob).to(x.device)
        fns[name] = (lambda run: lambda: run(x))(runner(method, peer_models[name], knob))
    if compile_ok:
        graphs = "reduce-overhead" if cuda else "default"  # CUDA graphs need a GPU
        bb_c = torch.compile(backbone)
        bb_g = torch.compile(backbone, mode=graphs)
        budget_g = torch.compile(model, mode=graphs, fullgraph=True, dynamic=False)
        static_c = torch.compile(model, fullgraph=True, dynamic=False)
        static_g = torch.compile(model, mode=graphs, fullgraph=True, dynamic=False)
        fns.update({
            "unpruned+compile": lambda: bb_c(x),
            "unpruned+cudagraphs": lambda: bb_g(x),
            "budget+cudagraphs": lambda: budget_g(x, "budget", keep_ratio=ratios),
            "threshold-static+compile": lambda: static_c(x, "threshold", threshold=thresholds, layout="static",
                                                         capacity=capacity),
            "threshold-static+cudagraphs": lambda: static_g(x, "threshold", threshold=thresholds, layout="static",
                                                            capacity=capacity),
        })
    full = model.full_macs()
    ideal = {"budget": full / float(model(x, "budget", keep_ratio=ratios).macs.mean()),
             "threshold": full / float(ref.macs.mean())}
    for name, (method, knob) in peers.items():
        with torch.inference_mode():
            ideal[name] = full / float(runner(method, peer_models[name], knob)(x).macs.mean())
    settings = {"thresholds": thresholds, "budget_keep_ratio": ratios, "capacity": capacity,
                "mean_kept": [round(float(k[:, ref.num_prefix:].float().sum(1).mean()), 2) for k in ref.keep]}
    return fns, ideal, settings


def run_one(label, name, overrides, batch, *, device, dtype, keep, compile_ok, repeats, warmup) -> dict:
    torch.manual_seed(0)
    backbone = create_model(name, **overrides)
    model = IARed(backbone).eval()
    spread_interpreters(model)
    model = model.to(device, DTYPES[dtype])
    x = torch.randn(batch, *input_shape(backbone.cfg), generator=torch.Generator().manual_seed(1))
    x = x.to(device, DTYPES[dtype])
    with torch.inference_mode():
        fns, ideal, settings = candidates(model, x, keep, compile_ok, device.type == "cuda")
    rows, ready = {}, {}
    for cand, fn in fns.items():  # first call: compiles, and shows a failing candidate before timing
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                fn()
                fn()  # CUDA graphs record on the second call
            ready[cand] = fn
            rows[cand] = {"first_calls_s": round(time.perf_counter() - start, 2)}
        except Exception as e:  # noqa: BLE001 -- one failing configuration must not end the run
            rows[cand] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            print(f"  {label} b{batch} {cand}: failed: {rows[cand]['error']}", file=sys.stderr)
    with torch.inference_mode():
        times = time_interleaved(ready, device, warmup=warmup, repeats=repeats)
    ms = {cand: median_ms(t) for cand, t in times.items()}
    fastest_unpruned = min(v for k, v in ms.items() if k.startswith("unpruned"))
    for cand, t in times.items():
        base = cand.split("+")[0]
        rows[cand].update(ms_median=round(ms[cand], 4), ms_all=[round(v, 4) for v in t],
                          speedup_vs_eager=round(ms["unpruned"] / ms[cand], 4),
                          speedup_vs_fastest_unpruned=round(fastest_unpruned / ms[cand], 4),
                          ideal_speedup=round(ideal.get(base, ideal.get("threshold") if base.startswith("threshold")
                                                        else 1.0), 4))
    for cand, r in rows.items():
        if "ms_median" in r:
            print(f"  {label} b{batch} {cand}: {r['ms_median']:.3f} ms, x{r['speedup_vs_eager']:.2f} over eager "
                  f"unpruned (ideal x{r['ideal_speedup']:.2f})", file=sys.stderr)
    return {"geometry": label, "model": name, "overrides": overrides, "batch": batch, "dtype": dtype,
            "keep": keep, **settings, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on a GPU, else float32")
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting compiled candidates after this")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny geometries (CPU tests)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    start = time.perf_counter()
    result = {"suite": "gpu-bench", "machine": machine_info(device), "keep": args.keep, "dtype": dtype,
              "runs": [], "skipped": []}
    for label, name, overrides, batch in SMOKE if args.smoke else SUITE:
        elapsed = time.perf_counter() - start
        compile_ok = not args.no_compile and elapsed < args.budget_s * 0.6
        if elapsed > args.budget_s:
            result["skipped"].append({"geometry": label, "batch": batch, "why": f"time budget {args.budget_s} s spent"})
            continue
        print(f"{label} batch {batch} ({elapsed:.0f} s in){'' if compile_ok else ', eager only'}", file=sys.stderr)
        try:
            result["runs"].append(run_one(label, name, overrides, batch, device=device, dtype=dtype, keep=args.keep,
                                          compile_ok=compile_ok, repeats=args.repeats, warmup=args.warmup))
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory at one batch: the others still count
            result["skipped"].append({"geometry": label, "batch": batch,
                                      "why": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()  # each geometry compiles afresh: no recompile limit across them
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(args.json, result)
    result["machine_end"] = machine_info(device)
    write_json(args.json, result)
    print(f"wrote {args.json} ({result['elapsed_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
