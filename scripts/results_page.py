"""Write docs/results.md from the measurement files committed in docs/*.json.

Every number on the page is read from one of those files; each table names its source file and
the machine and torch version recorded in it ("not recorded" where the file has none). The page
is never edited by hand: after adding or replacing a JSON file, run

    python scripts/results_page.py            # rewrites docs/results.md
    python scripts/results_page.py --check    # exit 1 if docs/results.md is stale

``tests/test_docs.py`` runs the check. Files are recognised by their structure (what the command
that wrote them puts in them), not by their names, so a new ``iared compare --json`` or
``iared bench --json`` file gets its tables without a change here; a structure this script does
not know is listed at the end, unrendered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"

# What each known file measured, in words (no figures: those come from the file itself).
NOTES = {
    "eval-digits-natural-shipped.json":
        "The shipped default model (`src/iared/assets/digits_natural_pruned.pt`) against its own "
        "backbone, `iared eval` on the digits-natural test split.",
    "compare-digits-natural-probability.json":
        "IA-RED² interpreters trained with the probability reward; every method but the floors also "
        "fine-tuned (`+ft`) the same number of steps in the same run. The shipped "
        "`digits_natural_pruned.pt` is this run's IA-RED²+ft model.",
    "compare-digits-natural-finetune.json":
        "Every method on the shipped digits-natural backbone, IA-RED² with the paper's 0/1 reward, "
        "each method also fine-tuned (`+ft`); training on an H200, timing on the CPU below. IA-RED²'s "
        "scores come out nearly binary, so its kept fraction jumps between neighbouring thresholds; ATS "
        "keeps every token through the first block and then samples hard, where IA-RED²'s first "
        "interpreter decides before block 0. With almost nothing dropped (the lowest threshold) IA-RED² "
        "is slower than the unpruned model: its interpreters are not free.",
    "compare-digits-natural.json":
        "An earlier run on digits-natural: interpreters loaded from a file, no fine-tuning, no DynamicViT.",
    "compare-digits-natural-tau5-dynamicvit.json":
        "An earlier run on digits-natural with a smaller reward tau (a harsher policy), DynamicViT included.",
    "compare-digits-clutter.json":
        "Every method on the shipped `digits_vit` backbone, frozen, on digits-clutter. The background is "
        "exactly black, so the pixel floor (keep the patches with ink) is hard to beat here. DynamicViT, "
        "trained on a frozen backbone, let its training-time keep rate drift above its targets (the "
        "classification and distillation losses outweigh the keep-ratio loss); at inference it keeps its "
        "budget exactly (top-k).",
    "compare-moving-digits.json":
        "Every method on the shipped video backbone `moving_digits_tsf` (clips per second), IA-RED² with "
        "the 0/1 reward; `framediff` keeps what changed most since the previous frame.",
    "compare-moving-digits-finetune.json":
        "The same task, interpreters retrained (0/1 reward) and fine-tuned variants of IA-RED² and EViT. "
        "This policy came out much harsher than the previous run's: the 0/1 reward is not robust from "
        "one training run to the next on video.",
    "compare-moving-digits-probability.json":
        "The same task with the probability reward; these interpreters ship as "
        "`src/iared/assets/moving_digits_pruned.pt`.",
    "bench-digits-natural-2threads.json":
        "The shipped digits-natural model on its test images (`iared bench --checkpoint`).",
    "bench-deit-s-2threads.json": "DeiT-S geometry, random weights, kept fraction calibrated per stage.",
    "bench-deit-s-keep07-1thread-cpuclock.json":
        "DeiT-S geometry, random weights, one thread, CPU-time clock (robust to other jobs on the machine).",
    "bench-digits-pruned-1thread-cpuclock.json":
        "The shipped digits-clutter model (`digits_pruned.pt`), one thread, CPU-time clock.",
    "bench-h200-deit-s-bf16.json":
        "DeiT-S on a GPU, bfloat16, random weights. At small batches the GPU is launch-bound and every "
        "pruned mode pays for the interpreters' and stages' extra kernels: slower than the unpruned model. "
        "`nested` (torch's jagged nested tensors) pays Python dispatch around the fused kernel in every "
        "block; `varlen` calls the same fused kernels directly with cumulative lengths.",
    "bench-h200-deit-b-bf16.json": "DeiT-B on a GPU, bfloat16, random weights.",
    "gpu-cudagraphs-deit-s-b1.json":
        "DeiT-S on a GPU, eager against `torch.compile(mode='reduce-overhead')` (CUDA graphs). Threshold "
        "modes graph-break where a selection reads per-image counts on the host.",
    "gpu-cudagraphs-deit-s-b64.json": "The same at a larger batch.",
    "timesformer-efficiency.json":
        "TimeSformer-B geometry (space-time tokens), random weights, one clip, one thread, CPU-time clock.",
    "attention-crossover-cpu.json":
        "`scripts/attention_crossover.py`: time of attention as two batched matmuls over torch's fused CPU "
        "kernel, per geometry and key count (above 1: the fused kernel is faster).",
    "overhead-deit-s.json":
        "`iared compare --overhead`: every method keeps the same number of tokens at the same blocks, so "
        "all run the same blocks; time relative to dropping by random scores is each method's own cost.",
    "mvit-efficiency.json":
        "`iared bench-mvit`: IA-RED² on MViTv2-T, random weights, budget mode. The stride-2 blocks and the "
        "grid-wide q/k/v projections are never pruned.",
    "explain-digits-natural.json":
        "`iared explain-eval` on the shipped digits-natural model: every explainer explains the same pruned "
        "model. Higher is better except deletion AUC. `interpreter:g` is stage g alone.",
    "explain-digits-natural-01reward.json": "The same with interpreters trained by the 0/1 reward.",
}

# What a section's tables measure, in words, shown once above them.
SECTION_NOTES = {
    "Every method on one backbone (`iared compare`)":
        "One `iared compare` run per file: every method on the same backbone, test images and clock. "
        "`vs unpruned` is the difference in top-1 from the unpruned model of the same run; `+ft` is a "
        "method with its own copy of the backbone fine-tuned under it; the floors (random, pixel "
        "saliency, frame difference) learn nothing and are also run at IA-RED²'s own kept fraction.",
    "Speed (`iared bench`)":
        "Efficiency is the measured speed-up over the FLOPs-ideal one. Threshold modes keep each image's "
        "own tokens (packed: only alive rows; padded: a key mask); budget mode keeps the same top-k for "
        "every image.",
    "How far removing fixed costs can go":
        "`scripts/op_floor.py`: every ATen call of one unpruned and one pruned (packed threshold) pass "
        "replayed without Python, all of them and only the arithmetic (matrix products, convolutions, "
        "fused attention). The last row is what the pruned pass could reach if every other operation "
        "were free.",
}

METHOD_NAMES = {"iared": "IA-RED²", "tome": "ToMe", "evit": "EViT", "ats": "ATS", "dynamicvit": "DynamicViT",
                "random": "random", "pixel": "pixel saliency", "framediff": "frame difference"}


# ---------------------------------------------------------------- formatting (one place)

def pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


def pt(v) -> str:
    return "" if v is None else f"{100 * v:+.2f} pt"


def times(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def ms(v) -> str:
    if v is None:
        return ""
    return f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms" if v >= 10 else f"{v:.2f} ms"


def num(v, digits=2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def gflops(v) -> str:
    return "" if v is None else f"{v:.4f}" if v < 1 else f"{v:.2f}"


def fractions(vs) -> str:
    return " / ".join(f"{v:.2f}" for v in vs or [])


def counts(vs) -> str:
    return " / ".join(f"{v:g}" for v in vs or [])


def method_name(m: str) -> str:
    base, _, ft = m.partition("+")
    return METHOD_NAMES.get(base, base) + (f"+{ft}" if ft else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def machine_line(m: dict | None, fallback: dict | None = None) -> str:
    """The machine a file records: device, cores, threads, torch (and CUDA)."""
    m = dict(m or {})
    for k, v in (fallback or {}).items():
        m.setdefault(k, v)
    parts = []
    name = m.get("device_name") or m.get("cpu") or m.get("processor")
    if name:
        parts.append(str(name) + (f" (CUDA {m['cuda']})" if m.get("cuda") else ""))
    cores = m.get("cpu_cores") or m.get("cpu_count")
    if cores:
        parts.append(f"{cores} CPU cores")
    if m.get("threads"):
        parts.append(f"{m['threads']} thread" + ("s" if m["threads"] != 1 else ""))
    parts.append(f"torch {m['torch']}" if m.get("torch") else "torch version not recorded")
    if m.get("load_avg_1m_at_start") is not None:
        parts.append(f"load average {m['load_avg_1m_at_start']} at start")
    if not name and not m.get("torch"):
        return "machine not recorded in the file" + (f" ({', '.join(parts[:-1])})" if parts[:-1] else "")
    return ", ".join(parts)


def head(name: str, what: str, machine: str) -> list[str]:
    """A table's heading (the file's stem), what it ran on, its source file and machine, and the note."""
    return [f"### {Path(name).stem}", ""] + ([what, ""] if what else []) + source(name, machine)


def source(name: str, machine: str) -> list[str]:
    out = [f"Source: [`docs/{name}`]({name}). Machine: {machine}."]
    if name in NOTES:
        out += ["", NOTES[name]]
    return out + [""]


# ---------------------------------------------------------------- one renderer per kind of file

def render_eval(name: str, d: dict) -> list[str]:
    machine = machine_line(d.get("machine"), {k: d[k] for k in ("device", "threads") if k in d})
    out = head(name, f"`{d.get('checkpoint', '?')}` on {d.get('task', '?')}.", machine)
    rows = [["top-1, unpruned", pct(d.get("accuracy_full"))],
            ["top-1, pruned", pct(d.get("accuracy_pruned"))],
            ["difference", pt(d["accuracy_pruned"] - d["accuracy_full"])
             if "accuracy_pruned" in d and "accuracy_full" in d else ""],
            ["kept fraction after each stage", fractions(d.get("kept_fraction"))],
            ["GFLOPs per image, unpruned / pruned",
             f"{gflops(d.get('gflops_full'))} / {gflops(d.get('gflops_pruned'))}"],
            ["FLOPs-ideal speed-up", times(d.get("speedup_ideal"))],
            [f"measured speed-up, batch {d.get('throughput_batch', '?')} ({d.get('clock', '?')} clock)",
             times(d.get("speedup"))]]
    out += [f"{d.get('split', 'test')} split, {d.get('n', '?')} images, "
            f"threshold {d.get('threshold', '?')}.", ""]
    return out + table(["", "value"], rows) + [""]


def _batches(d: dict) -> list[str]:
    sizes = (d.get("config") or {}).get("batch_sizes") or []
    keys = list((d.get("unpruned") or {}).get("images_per_s", {}).keys())
    return [str(b) for b in sizes if str(b) in keys] or keys


def render_compare(name: str, d: dict) -> list[str]:
    cfg = d.get("config") or {}
    batches = _batches(d)
    unit = "clips/s" if d.get("task") == "moving-digits" else "img/s"
    out = head(name, f"{d.get('task', '?')} on {d.get('backbone', '?')}.", machine_line(d.get("machine")))
    un = d.get("unpruned") or {}
    ips = un.get("images_per_s") or {}
    facts = [f"{d.get('test_images', cfg.get('test_samples', '?'))} test images",
             f"median of {cfg.get('repeats', '?')} interleaved timed calls"]
    if cfg.get("train_steps") and not cfg.get("iared_checkpoint"):
        facts.append(f"IA-RED² trained {cfg['train_steps']} steps per stage "
                     f"at batch {cfg.get('train_batch', '?')}")
    if cfg.get("iared_checkpoint"):
        facts.append(f"IA-RED² loaded from `{cfg['iared_checkpoint']}`")
    if cfg.get("finetune_steps"):
        facts.append(f"`+ft`: {cfg['finetune_steps']} fine-tuning steps")
    speeds = ", ".join(f"{ips[b]:.0f} {unit} at batch {b}" for b in batches)
    unpruned = f"{pct(un.get('top1'))}, {gflops(un.get('gflops'))} GFLOPs, {speeds}"
    out += [f"{'; '.join(facts)}. Unpruned: {unpruned}.", ""]
    by_batch = d.get("best_speedup_at_loss_by_batch") or (
        {batches[0]: d["best_speedup_at_loss"]} if d.get("best_speedup_at_loss") and batches else {})
    for b, losses in by_batch.items():
        rows = [[f"within {loss} pt", ", ".join(f"{method_name(m)} {times(v)}" for m, v in best.items())]
                for loss, best in losses.items()]
        out += [f"Best measured speed-up at batch {b} within a loss of top-1 (as recorded in the file):", ""]
        out += table(["loss", "methods, fastest first"], rows) + [""]
    rows = []
    for c in d.get("candidates") or []:
        knob = c.get("knob")
        knob = fractions(knob) if isinstance(knob, list) else str(knob)
        if c.get("note"):
            knob += f" ({c['note']})"
        both = c.get("top1") is not None and un.get("top1") is not None
        rows.append([method_name(c["method"]), knob, pct(c.get("top1")),
                     pt(c["top1"] - un["top1"]) if both else "",
                     gflops(c.get("gflops")), fractions(c.get("kept_fraction"))]
                    + [times((c.get("speedup") or {}).get(b)) for b in batches])
    out += table(["method", "knob", "top-1", "vs unpruned", "GFLOPs", "kept per stage"]
                 + [f"speed-up, batch {b}" for b in batches], rows)
    png = DOCS / name.replace(".json", ".png")
    if png.exists():
        out += ["", f"![{d.get('task', '')}: accuracy against measured throughput]({png.name})"]
    return out + [""]


BENCH_CONFIGS = {"unpruned": "unpruned", "budget": "budget (top-k)", "threshold-padded": "threshold, padded",
                 "threshold-static": "threshold, static shapes", "threshold-packed": "threshold, packed"}


def render_bench(name: str, d: dict) -> list[str]:
    cfg = d.get("config") or {}
    what = f"`{cfg.get('checkpoint') or cfg.get('model') or '?'}`"
    if cfg.get("checkpoint") is None:
        what += f", random weights, keep {cfg.get('keep')}"
    if cfg.get("frames"):
        what += f", {cfg['frames']} frames"
    out = head(name, f"{what}.", machine_line(d.get("machine")))
    out += [f"{cfg.get('clock', 'wall')} clock, {cfg.get('warmup', '?')} warm-up calls, median of "
            f"{cfg.get('repeats', '?')} interleaved timed calls"
            + (f", `torch.compile` mode {cfg.get('compile_mode')}" if cfg.get("compile") else "") + ".", ""]
    rows = []
    for run in d.get("runs") or []:
        for r in run.get("rows") or []:
            label = BENCH_CONFIGS.get(r.get("config"), r.get("config"))
            if r.get("attention"):
                label += f" ({r['attention']})"
            if r.get("compiled"):
                label += ", compiled"
            rows.append([f"{run.get('batch')}", run.get("dtype", ""), label, ms(r.get("ms_median")),
                         times(r.get("ideal_speedup")), times(r.get("speedup")), num(r.get("efficiency")),
                         ms(r.get("latency_p50_ms")), times(r.get("compile_gain")), r.get("error") or ""])
    header = ["batch", "dtype", "mode", "per batch", "FLOPs-ideal", "measured speed-up", "efficiency",
              "p50 latency", "compile gain", "error"]
    for col in range(len(header) - 1, 2, -1):  # drop columns no row fills (compile gain, error, latency)
        if not any(row[col] for row in rows):
            header.pop(col)
            for row in rows:
                row.pop(col)
    out += table(header, rows)
    return out + [""]


def render_op_floor(name: str, d: dict) -> list[str]:
    out = head(name, "", machine_line(d.get("machine"), {"threads": d.get("threads")}))
    ideal = d.get("ideal_speedup")
    rows = []
    for key, label in (("speedup_forward", "forward pass"), ("speedup_all_ops", "all ATen ops, no Python"),
                       ("speedup_compute_only", "compute only")):
        v = d.get(key)
        rows.append([label, times(v), num(v / ideal) if v and ideal else ""])
    out += [f"Batch {d.get('batch', '?')}, FLOPs-ideal speed-up {times(ideal)}, kept tokens per stage "
            f"{counts(d.get('kept_per_stage'))}.", ""]
    out += table(["pruned pass replayed as", "speed-up", "efficiency (over FLOPs-ideal)"], rows) + [""]
    timed = d.get("ms") or {}
    out += table(["ATen time", "per pass"], [[k, ms(v)] for k, v in timed.items()])
    return out + [""]


def render_overhead(name: str, d: dict) -> list[str]:
    batches = list((d.get("batches") or {}).keys())
    out = head(name, f"{d.get('model', '?')}, random weights.", machine_line(d.get("machine")))
    out += [f"Keep {d.get('keep')} at blocks {', '.join(str(s) for s in d.get('stage_starts') or [])}.", ""]
    first = d["batches"][batches[0]]["methods"] if batches else {}
    rows = []
    for m in first:
        row = [m]
        for b in batches:
            e = d["batches"][b]["methods"].get(m, {})
            row += [num(e.get("overhead")), times(e.get("speedup"))]
        rows.append(row)
    header = ["method"]
    for b in batches:
        header += [f"time / random-drop time, batch {b}", f"speed-up over unpruned, batch {b}"]
    return out + table(header, rows) + [""]


def render_mvit(name: str, d: dict) -> list[str]:
    out = head(name, f"{d.get('model', '?')}: measured against FLOPs-ideal.", machine_line(d.get("machine")))
    out += [f"Batch {d.get('batch')}, {d.get('dtype')}, {d.get('mode')} mode, "
            f"keep {d.get('keep_ratio')} at blocks "
            f"{', '.join(str(s) for s in d.get('stage_starts') or [])}; weights: {d.get('weights')}. "
            f"GFLOPs {gflops(d.get('gflops_full'))} / {gflops(d.get('gflops_pruned'))}, FLOPs-ideal "
            f"{times(d.get('flops_speedup'))}.", ""]
    rows = [[clock, ms(c.get("full_ms")), ms(c.get("pruned_ms")), times(c.get("speedup")),
             num(c.get("efficiency"))] for clock, c in (d.get("clocks") or {}).items()]
    out += table(["clock", "unpruned", "pruned", "measured speed-up", "efficiency"], rows) + [""]
    rows = [[b.get("block"), b.get("grid"), b.get("width"), "yes" if b.get("changes_grid") else "",
             f"{b.get('alive')} / {b.get('tokens')}", num(b.get("macs_ratio")), num(b.get("time_ratio"))]
            for b in d.get("blocks") or []]
    out += table(["block", "grid", "width", "changes grid", "alive tokens", "MACs pruned / unpruned",
                  "time pruned / unpruned (wall)"], rows)
    return out + [""]


METRICS = [("pixel_accuracy", "pixel acc."), ("miou", "mIoU"), ("map", "mAP"), ("pointing", "pointing"),
           ("deletion", "deletion AUC"), ("insertion", "insertion AUC")]


def render_explain(name: str, d: dict) -> list[str]:
    out = head(name, f"Explaining `{d.get('checkpoint', '?')}`.", machine_line(d.get("environment")))
    out += [f"{d.get('data', '?')}, {d.get('n', '?')} images, threshold {d.get('threshold')}, "
            f"{d.get('steps', '?')} deletion / insertion steps, baseline {d.get('baseline')}.", ""]
    rows = [[m] + [num(v.get(k), 3) for k, _ in METRICS] for m, v in (d.get("methods") or {}).items()]
    return out + table(["method"] + [label for _, label in METRICS], rows) + [""]


def render_crossover(name: str, d: dict) -> list[str]:
    out = head(name, "", machine_line(d.get("machine")))
    rows = d.get("rows") or []
    keys = sorted({r["keys"] for r in rows})
    groups: dict[tuple, dict] = {}
    for r in rows:
        geometry = (r["batch"], r["heads"], r["head_dim"], r["masked"])
        groups.setdefault(geometry, {})[r["keys"]] = r["matmul_over_fused"]
    out += [f"Fastest of {d.get('rounds', '?')} rounds; cells: matmul time / fused time.", ""]
    body = [[f"{b}, {h}, {hd}", "yes" if m else ""] + [num(v.get(k)) for k in keys]
            for (b, h, hd, m), v in sorted(groups.items())]
    return out + table(["sequences, heads, head dim", "key mask"] + [f"{k} keys" for k in keys], body) + [""]


def _range(r: dict | None, fmt=num) -> str:
    return "" if not r else f"{fmt(r['min'])} – {fmt(r['max'])}"


def render_stream_compare(name: str, d: dict) -> list[str]:
    cfg = d.get("config") or {}
    val, test = (d.get("streams") or {}).get("val"), (d.get("streams") or {}).get("test")
    out = head(name, f"`iared stream --compare` on {d.get('task')} with `{d.get('checkpoint')}`.",
               machine_line(d.get("machine"), {"threads": d.get("threads")}))
    out += [f"Validation {val[0]} x {val[1]}, test {test[0]} x {test[1]} streams x frames, batch = every test "
            f"stream at once. Knobs chosen on validation: the fewest MACs within {cfg.get('max_loss')} pt of the "
            f"full model ({pct((d.get('validation') or {}).get('full_top1'))} on validation); floors at the "
            f"chosen reuse budget. Per-frame top-1 on test with a paired bootstrap 95 % interval over streams; "
            f"frames/s and speed-up: range over {cfg.get('repeats')} interleaved rounds, {cfg.get('clock')} "
            f"clock.", ""]
    rows = []
    for r in d.get("test") or []:
        knob = ", ".join(f"{k} {v}" for k, v in (r.get("knob") or {}).items()) or "–"
        delta = r.get("delta_pt") or {}
        rows.append([r["method"], knob, pct(r.get("top1")),
                     f"{delta.get('mean', 0):+.2f} pt [{delta.get('lo', 0):+.2f}, {delta.get('hi', 0):+.2f}]",
                     times(r.get("macs_reduction")), num(r.get("recomputed")) if r.get("recomputed") is not None
                     else "", _range(r.get("frames_per_s"), lambda v: f"{v:.0f}"),
                     f"{times(r['speedup']['median'])} ({_range(r['speedup'], times)})" if r.get("speedup") else ""])
    return out + table(["method", "knob", "top-1", "Δ top-1 [95 % CI]", "fewer MACs", "recomputed share",
                        "frames/s", "speed-up, median (range)"], rows) + [""]


def render_stream_clips(name: str, d: dict) -> list[str]:
    out = head(name, f"`scripts/stream_real_clips.py`: {d.get('model')}, first {d.get('frames_per_clip')} frames "
                     "of each real clip; random weights, so speed and recomputed share only.",
               machine_line(d.get("machine")))
    rows = []
    for c in d.get("clips") or []:
        for policy, r in (c.get("policies") or {}).items():
            rows.append([c["clip"], policy, num(r.get("frames_per_s"), 1), times(r.get("speedup_vs_all")),
                         times(r.get("macs_reduction")), num(r.get("recomputed"))])
    return out + table(["clip", "gate rule", "frames/s", "vs all gates open", "fewer MACs", "recomputed share"],
                       rows) + [""]


UNSEEN_ROWS = {  # row key: what it is
    "bundled_backbone": "backbone, bundled test photos", "bundled": "pruned, bundled test photos, stored threshold",
    "unseen_backbone": "backbone, unseen photos", "unseen": "pruned, unseen photos, stored threshold",
    "unseen_calibrated": "pruned, unseen photos, thresholds calibrated on unlabelled val renders",
    "unseen_random": "random dropping, unseen photos, the calibrated model's kept shares",
    "unseen_pixel": "pixel saliency (no learning), unseen photos, the same kept shares",
}


def render_unseen(name: str, d: dict) -> list[str]:
    out = head(name, f"`scripts/unseen_scenes.py`: the shipped models on their test split's digits rendered over "
                     f"photographs no split holds (`{d.get('photos')}`), beside the bundled test photos; one run.",
               machine_line(d.get("machine")))
    for task, t in (d.get("tasks") or {}).items():
        timing = t.get("timing") or {}
        out += [f"**{task}** (`{t.get('pruned_file')}`, {t.get('n_test')} test items, calibration on "
                f"{t.get('n_calibration_unlabelled')} unlabelled validation renders; speed-up: range over "
                f"{timing.get('runs')} interleaved runs at batch {timing.get('batch')}, {timing.get('threads')} "
                f"thread(s), {timing.get('clock', 'wall')} clock)", ""]
        rows = []
        for key, label in UNSEEN_ROWS.items():
            r = (t.get("rows") or {}).get(key)
            if not r:
                continue
            d_ = r.get("top1_minus_backbone")
            rng = r.get("speedup_measured_range")
            rows.append([label, pct(r.get("top1")),
                         f"{pt(d_['mean'])} [{pt(d_['lo'])}, {pt(d_['hi'])}]" if d_ else "",
                         fractions(r.get("kept_fraction")), times(r.get("speedup_ideal")),
                         f"{times(rng[0])} – {times(rng[1])}" if rng else ""])
        out += table(["model, data", "top-1", "vs its backbone [95 % CI]", "kept after each stage", "FLOPs-ideal",
                      "measured speed-up"], rows) + [""]
    return out


KINDS = [  # (test on the file's structure, section, renderer)
    (lambda d: "accuracy_full" in d and "accuracy_pruned" in d, "Shipped models", render_eval),
    (lambda d: "candidates" in d and "unpruned" in d, "Every method on one backbone (`iared compare`)",
     render_compare),
    (lambda d: isinstance(d.get("runs"), list) and all("rows" in r for r in d["runs"]),
     "Speed (`iared bench`)", render_bench),
    (lambda d: "speedup_compute_only" in d, "How far removing fixed costs can go", render_op_floor),
    (lambda d: "batches" in d and "keep" in d, "What each way of reducing costs", render_overhead),
    (lambda d: "clocks" in d and "blocks" in d, "MViTv2", render_mvit),
    (lambda d: isinstance(d.get("methods"), dict) and "data" in d,
     "Heatmaps against the explainers (`iared explain-eval`)", render_explain),
    (lambda d: isinstance(d.get("rows"), list) and d["rows"] and "matmul_over_fused" in d["rows"][0],
     "Attention kernels on CPU", render_crossover),
    (lambda d: d.get("task") == "digit-streams" and isinstance(d.get("test"), list),
     "Streaming reuse (`iared stream`)", render_stream_compare),
    (lambda d: isinstance(d.get("clips"), list) and "frames_per_clip" in d,
     "Streaming reuse (`iared stream`)", render_stream_clips),
    (lambda d: isinstance(d.get("tasks"), dict) and "photos" in d, "Scenes the models never saw", render_unseen),
]

ORDER = [  # files shown first in their section, in this order; the rest follow by name
    "eval-digits-natural-shipped.json", "compare-digits-natural-probability.json",
    "compare-digits-natural-finetune.json", "compare-moving-digits-probability.json",
    "bench-digits-natural-2threads.json", "bench-deit-s-2threads.json", "bench-h200-deit-s-bf16.json",
    "gpu-cudagraphs-deit-s-b1.json", "gpu-cudagraphs-deit-s-b64.json", "explain-digits-natural.json",
]


def render(docs: Path = DOCS) -> str:
    def rank(p: Path):
        return ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name

    files = sorted(docs.glob("*.json"), key=rank)
    sections: dict[str, list[str]] = {title: [] for _, title, _ in KINDS}
    unknown = []
    for path in files:
        d = json.loads(path.read_text())
        for test, title, fn in KINDS:
            if isinstance(d, dict) and test(d):
                sections[title] += fn(path.name, d)
                break
        else:
            unknown.append(path.name)
    out = ["# Measured results", "",
           "<!-- generated by scripts/results_page.py from docs/*.json: do not edit by hand -->", "",
           "Every figure on this page is read from a JSON file in this folder, written by the command or "
           "script named beside it; each table names its file and the machine recorded in it. Speed-ups are "
           "ratios measured in the same run, interleaved, through one timing function; compare figures "
           "within a table, not across machines or runs. Regenerate with "
           "`python scripts/results_page.py`.", ""]
    out += ["Contents: " + " · ".join(f"[{t}](#{_anchor(t)})" for t, body in sections.items() if body), ""]
    for title, body in sections.items():
        if body:
            out += [f"## {title}", ""] + ([SECTION_NOTES[title], ""] if title in SECTION_NOTES else []) + body
    if unknown:
        out += ["## Files not rendered", "", "Structure unknown to `scripts/results_page.py`: "
                + ", ".join(f"[`{n}`]({n})" for n in unknown) + ".", ""]
    return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    keep = [c for c in title.lower() if c.isalnum() or c in " -_"]
    return "".join(keep).replace(" ", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, default=DOCS, help="folder of the JSON files and of results.md")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if results.md differs from what the JSON gives")
    args = ap.parse_args(argv)
    page, target = render(args.docs), args.docs / "results.md"
    if args.check:
        if not target.exists() or target.read_text() != page:
            print(f"{target} is stale: run python scripts/results_page.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(page)
    print(f"wrote {target} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
