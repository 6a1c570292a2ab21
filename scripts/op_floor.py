"""How fast could a pruned model be at this batch if only its arithmetic cost time? (#12's profile)

Records every ATen operation of one unpruned and one pruned (packed threshold) forward pass, then
replays them without Python in two ways, interleaved, fastest of ``--rounds``:
- ``all ops``: every recorded operation again, in order (no Python, no module calls: the floor of
  an eager runtime that keeps torch's kernels);
- ``compute only``: only the matrix products, convolutions and fused attention kernels (every
  other operation free: a bound that no fusion of the elementwise work can beat).
Each gives a speed-up and an efficiency (speed-up / FLOPs-ideal), next to the real forward pass.
If even ``compute only`` stays under a target, no removal of fixed costs reaches it: the kernels'
own efficiency on small matrices is the limit.

    python scripts/op_floor.py --checkpoint src/iared/assets/digits_natural_pruned.pt --task digits-natural --batch 1
    python scripts/op_floor.py --model deit_small_patch16_224 --keep 0.7 --batch 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from iared.bench import BenchConfig, budget_ratios, build_model, calibrate_thresholds, load_task_images
from iared.timing import machine_info, use_threads

# Under inference mode the recorder sees composite operations before they decompose (linear, conv2d,
# scaled_dot_product_attention), elsewhere their parts (addmm, convolution, ...): both are listed.
COMPUTE = {"linear", "matmul", "addmm", "mm", "bmm", "baddbmm", "conv2d", "convolution",
           "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}


def _snapshot(args):
    """Copies of the tensors in ``args``; views of one storage stay views of one copied storage (a
    kernel that reads q, k and v as one strided buffer still can)."""
    storages = {}

    def copy(a):
        if not isinstance(a, torch.Tensor):
            return a
        ptr = a.untyped_storage().data_ptr()
        if ptr not in storages:
            storages[ptr] = a.untyped_storage().clone()
        return torch.empty(0, dtype=a.dtype, device=a.device).set_(storages[ptr], a.storage_offset(), a.size(),
                                                                   a.stride())

    return tree_map(copy, args)


class Recorder(TorchDispatchMode):
    """Keeps (op, inputs) of every ATen call; inputs are copied so a replay cannot see later writes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        snap = _snapshot((args, kwargs))
        self.calls.append((func, *snap))
        return func(*args, **kwargs)


def record(fn):
    rec = Recorder()
    with torch.inference_mode():
        fn()  # first calls fill caches (the folded conv stem): record a steady-state pass
    with torch.inference_mode(), rec:
        fn()
    return rec.calls


def replay(calls):
    for func, args, kwargs in calls:
        func(*args, **kwargs)


def fastest(fns: dict, rounds: int, calls: int) -> dict:
    best = {k: float("inf") for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                start = time.perf_counter()
                for _ in range(calls):
                    f()
                best[k] = min(best[k], (time.perf_counter() - start) / calls * 1e3)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--task")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10, help="calls per timed round")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json")
    args = ap.parse_args()
    use_threads(args.threads)
    cfg = BenchConfig(model=args.model, model_given=True, checkpoint=args.checkpoint, keep=args.keep, task=args.task)
    model, thresholds = build_model(cfg, torch.device("cpu"))
    if args.task:
        images = load_task_images(args.task, args.batch, model.backbone.cfg)
    else:
        mcfg = model.backbone.cfg
        images = torch.randn(args.batch, mcfg.in_chans, mcfg.img_size, mcfg.img_size)
    with torch.inference_mode():
        if thresholds is None:
            thresholds = calibrate_thresholds(model, images, args.keep)
        out = model(images, "threshold", threshold=thresholds)
    ideal = model.full_macs() / float(out.macs.mean())
    unpruned = lambda: model.backbone(images)
    pruned = lambda: model(images, "threshold", threshold=thresholds, layout="packed")
    rec = {"unpruned": record(unpruned), "pruned": record(pruned)}
    compute = {k: [c for c in v if c[0].overloadpacket.__name__ in COMPUTE] for k, v in rec.items()}
    fns = {"unpruned forward": unpruned, "pruned forward": pruned,
           "unpruned all ops": lambda: replay(rec["unpruned"]), "pruned all ops": lambda: replay(rec["pruned"]),
           "unpruned compute only": lambda: replay(compute["unpruned"]),
           "pruned compute only": lambda: replay(compute["pruned"])}
    for k in ("unpruned", "pruned"):  # where the compute goes, by operation
        for name in sorted({c[0].overloadpacket.__name__ for c in compute[k]}):
            group = [c for c in compute[k] if c[0].overloadpacket.__name__ == name]
            fns[f"{k} {name}"] = lambda g=group: replay(g)
    ms = fastest(fns, args.rounds, args.calls)
    report = {"machine": machine_info("cpu"), "batch": args.batch, "ideal_speedup": ideal, "threads": torch.get_num_threads(),
              "ops": {k: len(v) for k, v in rec.items()}, "compute_ops": {k: len(v) for k, v in compute.items()},
              "ms": ms,
              "kept_per_stage": [round(float(k[:, out.num_prefix:].float().sum(1).mean()), 1) for k in out.keep],
              "budget_ratios": budget_ratios(out, model.backbone.cfg.num_patches)}
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, FLOPs-ideal {ideal:.2f}x, "
          f"ops unpruned {len(rec['unpruned'])} / pruned {len(rec['pruned'])} "
          f"(compute {len(compute['unpruned'])} / {len(compute['pruned'])})")
    for what in ("forward", "all ops", "compute only"):
        u, p = ms[f"unpruned {what}"], ms[f"pruned {what}"]
        report[f"speedup_{what.replace(' ', '_')}"] = u / p
        print(f"  {what:13s} unpruned {u:8.3f} ms  pruned {p:8.3f} ms  speed-up {u / p:.2f}x  "
              f"efficiency {u / p / ideal:.2f}")
    for k in ("unpruned", "pruned"):
        print(f"  {k} compute by operation: " + ", ".join(
            f"{name.split(' ', 1)[1]} {v:.3f} ms" for name, v in ms.items()
            if name.startswith(k + " ") and name.split(" ", 1)[1] not in ("forward", "all ops", "compute only")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
