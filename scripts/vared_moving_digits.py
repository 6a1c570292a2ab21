"""VA-RED² on moving-digits (shipped TimeSformer): fixed choices, the learned policy, the random floor,
and TimeSformer-B geometry efficiency at stride 2 + width 1/2. Writes docs/vared-moving-digits.json.

    PYTHONPATH=src nice python scripts/vared_moving_digits.py --test 500 --steps 150
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from iared.data.moving import MovingDigits
from iared.models import create_model
from iared.reducers.vared import VaRedTimeSformer
from iared.stats import paired_bootstrap
from iared.timing import machine_info, time_interleaved, use_threads
from iared.train.vared import VaRedTrainConfig, train_vared


def load(split, n, start=0):
    ds = MovingDigits(split)
    xs, ys = zip(*[(ds[i][0], ds[i][1]) for i in range(start, start + n)])
    return torch.stack(xs), torch.tensor(ys)


def evaluate(v, X, Y, choice, batch=8):
    preds, macs = [], []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            c = choice if not isinstance(choice, torch.Tensor) else choice[i:i + batch]
            o = v(X[i:i + batch], c)
            preds.append(o.logits.argmax(-1))
            macs.append(o.macs)
    correct = (torch.cat(preds) == Y).float()
    return correct, float(torch.cat(macs).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.45])
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="docs/vared-moving-digits.json")
    a = ap.parse_args()
    use_threads(2)
    torch.manual_seed(0)
    backbone = create_model("moving_digits_tsf", pretrained=True).eval()
    Xtr, Ytr = load("train", a.train)
    Xv, Yv = load("val", a.val)
    Xt, Yt = load("test", a.test)
    result = {"machine": machine_info(), "torch": torch.__version__, "batch": 8, "threads": 2, "dtype": "float32",
              "test_clips": a.test, "val_clips": a.val, "train_clips": a.train, "steps": a.steps, "lam": a.lam}
    base = VaRedTimeSformer(backbone).eval()
    full = base.full_macs()
    rows = {}
    fixed = {"unpruned": (0, 0), "stride2": (1, 0), "width1/2": (0, 1), "stride2+width1/2": (1, 1)}
    for name, c in fixed.items():
        correct, macs = evaluate(base, Xt, Yt, c)
        rows[name] = {"choice": list(c), "acc": float(correct.mean()), "macs_ratio": macs / full, "_correct": correct}
    # the learned policy: one training per target, chosen on val (best val accuracy at macs <= target + 0.05)
    trained = []
    for target in a.targets:
        v = VaRedTimeSformer(create_model("moving_digits_tsf", pretrained=True).eval())
        t0 = time.time()
        hist = train_vared(v, Xtr, Ytr, VaRedTrainConfig(steps=a.steps, batch=8, lr=1e-2, target=target, lam=a.lam),
                           log=lambda r: print(r) if r["step"] % 25 == 0 else None)
        vc, vm = evaluate(v, Xv, Yv, None)
        trained.append({"target": target, "val_acc": float(vc.mean()), "val_macs_ratio": vm / full,
                        "train_s": time.time() - t0, "final_train": hist[-1], "_model": v})
        print("target", target, trained[-1]["val_acc"], vm / full)
    pick = max(trained, key=lambda r: (r["val_macs_ratio"] <= r["target"] + 0.05, r["val_acc"]))
    v = pick["_model"]
    correct, macs = evaluate(v, Xt, Yt, None)
    choices = []
    with torch.no_grad():
        for i in range(0, len(Xt), 8):
            choices.append(v(Xt[i:i + 8]).choices)
    choices = torch.cat(choices)
    rows["policy"] = {"target": pick["target"], "acc": float(correct.mean()), "macs_ratio": macs / full,
                      "_correct": correct, "choice_histogram": torch.bincount(choices.reshape(-1), minlength=9).tolist()}
    # random floor: each clip's stage choices drawn from the policy's own test distribution of choices
    # (shuffled across clips and stages), so the mean MACs match
    g = torch.Generator().manual_seed(0)
    flat = choices.reshape(-1)
    rand = flat[torch.randperm(len(flat), generator=g)].reshape(choices.shape)
    rc, rm = evaluate(v, Xt, Yt, rand)
    rows["random"] = {"acc": float(rc.mean()), "macs_ratio": rm / full, "_correct": rc}
    for name, r in rows.items():
        if name != "unpruned":
            r["acc_diff_vs_unpruned"] = paired_bootstrap(r["_correct"], rows["unpruned"]["_correct"])
    rows["policy"]["acc_diff_vs_random"] = paired_bootstrap(rows["policy"]["_correct"], rows["random"]["_correct"])
    # timing: one batch of 8 test clips, interleaved, several runs -> range of speed-ups
    xb = Xt[:8]
    rb = rand[:8]
    fns = {"unpruned": lambda: backbone(xb), **{k: (lambda c=c: base(xb, c)) for k, c in fixed.items() if k != "unpruned"},
           "policy": lambda: v(xb), "random": lambda: v(xb, rb)}
    speed = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(a.runs):
            t = time_interleaved(fns, repeats=5)
            med = {k: sorted(x)[len(x) // 2] for k, x in t.items()}
            for k in fns:
                speed[k].append(med["unpruned"] / med[k])
    for k in rows:
        rows[k]["speedup"] = {"min": min(speed[k]), "max": max(speed[k]), "runs": speed[k]}
    for r in rows.values():
        r.pop("_correct")
    result["moving_digits"] = rows
    result["policy_selection_val"] = [{k: x for k, x in r.items() if k != "_model"} for r in trained]
    # TimeSformer-B geometry, random weights, 8 frames, batch 2: stride 2 + width 1/2
    b = create_model("timesformer_base_patch16_224").eval()
    vb = VaRedTimeSformer(b).eval()
    xb2 = torch.rand(1, 8, 3, 224, 224)
    ideal = vb.full_macs() / vb.fixed_choice_macs(1, 1)
    with torch.no_grad():
        t = time_interleaved({"unpruned": lambda: b(xb2), "s2w2": lambda: vb(xb2, (1, 1))}, repeats=3, warmup=1)
    med = {k: sorted(x)[len(x) // 2] for k, x in t.items()}
    measured = med["unpruned"] / med["s2w2"]
    result["timesformer_b"] = {"batch": 1, "flops_ideal_speedup": ideal, "measured_speedup": measured,
                               "efficiency": measured / ideal, "ms": med}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: {kk: vv for kk, vv in r.items() if kk != 'speedup'} | {"speedup": r["speedup"]["min"]}
                      for k, r in rows.items()}, indent=1))
    print(result["timesformer_b"])


if __name__ == "__main__":
    main()
