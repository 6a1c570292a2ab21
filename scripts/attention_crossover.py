"""Where CPU attention should leave torch's fused kernel for two batched matmuls (iared.tokens).

Times ``F.scaled_dot_product_attention`` against ``iared.tokens._matmul_attention`` (the path
``_sdpa_heads`` takes when ``_matmul_attention_pays``) on the geometries of the shipped models and
DeiT-S, key lengths 8 to 197, with and without a key mask, q / k / v as slices of one qkv buffer
as the models make them. The two are interleaved call by call; each figure is the fastest of
``--rounds`` rounds (the least disturbed by other jobs on a shared machine), and the median is
kept beside it in the JSON.

    python scripts/attention_crossover.py --json docs/attention-crossover-cpu.json
    python scripts/attention_crossover.py --threads 2 --geometries "64,4,36;288,4,36"   # after set_num_threads
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from iared.timing import machine_info
from iared.tokens import _matmul_attention

# (B, H, D): the digits models (4 heads of 36), the video model's temporal attention (thousands of
# 8-frame sequences), DeiT-S (6 heads of 64)
GEOMETRIES = [(1, 4, 36), (8, 4, 36), (64, 4, 36), (288, 4, 36), (1024, 4, 36), (1, 6, 64), (16, 6, 64),
              (64, 6, 64)]
KEYS = [8, 16, 24, 32, 40, 48, 56, 65, 80, 100, 140, 197]


def fused(q, k, v, mask):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def matmul(q, k, v, mask):
    return _matmul_attention(q, k, v, mask, every_query_has_a_key=True)


def time_pair(B, H, D, N, masked, rounds):
    qkv = torch.randn(B, N, 3 * H * D)
    q, k, v = qkv.unflatten(-1, (3, H, D)).unbind(-3)  # (B, N, H, D) slices of one buffer
    mask = None
    if masked:
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[:, :, :, N - max(1, N // 8):] = False  # the last eighth of the keys are padding
    assert torch.allclose(fused(q, k, v, mask), matmul(q, k, v, mask), atol=1e-5)
    calls = max(1, int(2e6 / (B * H * N * N * D / 100 + 2e4)))
    times = {"fused": [], "matmul": []}
    for _ in range(rounds):
        for name, fn in (("fused", fused), ("matmul", matmul)):
            start = time.perf_counter()
            for _ in range(calls):
                fn(q, k, v, mask)
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: {"ms_min": min(t), "ms_median": statistics.median(t)} for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="call torch.set_num_threads with this (even torch's own count: that call slows the fused kernel)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--geometries", default=None,
                    help="B,H,D triples separated by ';' (default: the shipped models' and DeiT-S's)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        # torch.set_num_threads itself, even for the count torch already has: the state this measures
        torch.set_num_threads(args.threads)
    geometries = GEOMETRIES if not args.geometries else [tuple(int(x) for x in g.split(","))
                                                         for g in args.geometries.split(";")]
    rows = []
    with torch.inference_mode():
        for B, H, D in geometries:
            for masked in (False, True):
                line = []
                for N in KEYS:
                    t = time_pair(B, H, D, N, masked, args.rounds)
                    ratio = t["matmul"]["ms_min"] / t["fused"]["ms_min"]
                    rows.append({"batch": B, "heads": H, "head_dim": D, "keys": N, "masked": masked,
                                 **{f"{n}_{k}": v for n, d in t.items() for k, v in d.items()},
                                 "matmul_over_fused": ratio})
                    line.append(f"{N}:{ratio:.2f}")
                print(f"B={B:3d} H={H} D={D:2d} {'mask ' if masked else 'plain'} matmul/fused  " + " ".join(line),
                      flush=True)
    report = {"machine": machine_info("cpu"), "rounds": args.rounds, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
