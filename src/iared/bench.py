"""``iared bench``: how fast is a pruned ViT (or TimeSformer) really, next to what its FLOPs promise?

For each dtype and batch size it times, in one run and on the same images:

``unpruned``          the backbone alone (no interpreters).
``threshold-packed``  threshold mode, kept tokens of all images packed into one ``(T, C)`` batch;
                      one row per packed-attention strategy (``loop`` / ``bucket`` / ``nested``).
``threshold-padded``  threshold mode, padded to the longest image + attention mask (the reference
                      that ATS / A-ViT style methods use).
``threshold-static``  threshold mode with static shapes: each stage padded to a fixed capacity, the
                      largest per-image count on the timed batch (:func:`iared.calibration.capacity_from_outputs`;
                      no image overflows), so no host synchronisation; compiled with ``fullgraph=True``
                      and fixed shapes.
``budget``            budget mode (top-k, dense) keeping, per stage, the mean count that threshold
                      mode kept, so both do the same FLOPs on average.

Every row carries the FLOPs-ideal speed-up (unpruned MACs / pruned MACs, from
:attr:`PrunedOutput.macs`), the measured speed-up (unpruned time / its time, same run) and their
ratio, the *efficiency*; plus the interpreters' MACs as a share of the backbone's.

Video: ``--model timesformer_base_patch16_224 --frames 8`` times a TimeSformer on random clips
``(B, T, 3, H, W)`` (``--frames`` sets ``num_frames`` of a random-weight model); the same loop, the
same rows (batch = clips).

Speed needs no trained weights. With random weights every interpreter scores about 0.5, so the
bench re-initialises the interpreters' weights with a larger std (``--interpreter-std``; this is
done in the bench only, never to a model you load from ``--checkpoint``) so that scores spread, then
calibrates one threshold per stage to the ``--keep`` quantile of that stage's scores on the batch:
the mean kept fraction per stage is ``--keep`` while the count still varies from image to image.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from iared import flops
from iared.calibration import DEFAULT_SAMPLES, capacity_from_outputs, check_calibration
from iared.files import check_output_file, json_safe, write_json
from iared.models.families import input_shape
from iared.pruning import IARed, PrunedOutput
from iared.timing import (  # noqa: F401  (CLOCKS, synchronize: re-exported)
    CLOCKS,
    LATENCY_CALLS,
    REPEATS,
    WARMUP,
    latency_percentiles,
    machine_info,
    median_ms,
    speed_probe_ms,
    synchronize,
    time_interleaved,
    use_threads,
)
from iared.tokens import default_packed_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRATEGIES = ("loop", "bucket", "nested", "varlen")
MODEL_ALIASES = {"digits": "digits_vit", "deit-s": "deit_small_patch16_224", "deit-t": "deit_tiny_patch16_224",
                 "deit-b": "deit_base_patch16_224"}
# --quick: a tiny geometry and one timed call, so the whole command runs in seconds (smoke tests)
QUICK_GEOMETRY = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=48, depth=3, num_heads=3)
# --quick on a TimeSformer name: 4 frames of 4x4 patches of 8
QUICK_VIDEO_GEOMETRY = dict(img_size=32, patch_size=8, num_frames=4, num_classes=10, embed_dim=48, depth=3, num_heads=3)


@dataclass
class BenchConfig:
    """What ``iared bench`` measures; the command line maps onto it one to one."""

    model: str = "deit_small_patch16_224"
    model_given: bool = False  # --model was on the command line (with --checkpoint: how to build its weights)
    checkpoint: str | None = None
    threshold: float | None = None  # with --checkpoint: its threshold (default 0.5)
    # with a pruned --checkpoint: thresholds calibrated instead on the first calibration_samples images timed
    # (--task's, else the Gaussian noise), to keep this fraction of patch tokens (iared.calibration)
    target_kept: float | list[float] | None = None
    calibration_samples: int = DEFAULT_SAMPLES
    save_calibrated: str | None = None  # a copy of the checkpoint with the calibrated thresholds
    keep: float = 0.7
    frames: int | None = None  # video models with random weights: num_frames (default: the model's)
    task: str | None = None  # images from this task's test split (e.g. digits-clutter); None: Gaussian noise
    device: str = "auto"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    strategies: tuple[str, ...] | None = None  # None: loop,bucket on CPU (nested is slow there), all on CUDA
    compile: bool = False
    # torch.compile's mode: "default", or "reduce-overhead" (CUDA graphs: one replay per call instead
    # of a launch per kernel, what small batches on a GPU are bound by), "max-autotune", ...
    compile_mode: str = "default"
    warmup: int = WARMUP
    repeats: int = REPEATS
    threads: int | None = None
    clock: str = "wall"  # or "cpu": process CPU time (CPU device; meaningful with --threads 1 on a shared machine)
    interpreter_std: float | None = None  # None: sqrt(3 / embed_dim), interpreter logits of std ~3
    seed: int = 0
    quick: bool = False
    json: str | None = None


# -- model preparation ----------------------------------------------------------------------------


def spread_interpreters(model: IARed, std: float | None = None, seed: int = 0) -> None:
    """Re-initialise the interpreters' weights with ``std`` so random-weight scores are not all 0.5.

    Bench only: it gives the score distribution a spread, so per-image kept counts vary as they do
    with a trained interpreter. Never applied to a loaded checkpoint. With LayerNorm'd tokens of
    width C, a head's logit ``q.k / sqrt(d)`` has std about ``std**2 * C``; the default
    ``sqrt(3 / C)`` makes that ~3: scores spread over (0, 1) without saturating into a few tied values
    (ties would make the quantile-calibrated thresholds keep far fewer tokens than asked).
    """
    if std is None:
        std = (3.0 / model.backbone.cfg.embed_dim) ** 0.5
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for interp in model.interpreters:
            w = interp.qk.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


def calibrate_thresholds(model: IARed, images: Tensor, keep: float) -> list[float]:
    """Per-stage thresholds such that each stage keeps ``keep`` of its alive patch tokens on ``images``
    (pooled over the batch, so counts still differ per image): :func:`iared.calibration.calibrate_thresholds`
    with the uniform per-stage rule, ``keep ** stages`` kept in the end."""
    from iared.calibration import calibrate_thresholds as calibrate

    staged = sum(model.reducer(g) is not None for g in range(model.num_stages))
    return calibrate(model, images, keep ** staged, batch_size=len(images), warn=False)


def budget_ratios(out: PrunedOutput, n_patches: int) -> list[float]:
    """Per-stage keep ratios that make budget mode keep threshold mode's mean count per stage."""
    p = out.num_prefix
    alive = float(n_patches)
    ratios = []
    for keep in out.keep:
        mean = float(keep[:, p:].float().sum(1).mean())
        k = max(1, round(mean))
        ratios.append(min(1.0, k / alive))
        alive = k
    return ratios


def interpreter_share(model: IARed, out: PrunedOutput) -> float:
    """Interpreter MACs / backbone MACs (mean over the batch; backbone = everything else)."""
    cfg = model.backbone.cfg
    n0 = cfg.num_patches + cfg.num_prefix_tokens
    seen = [torch.full_like(out.macs, n0)] + [k.sum(1).to(out.macs) for k in out.keep[:-1]]
    interp = sum(flops.interpreter_macs(n, cfg.embed_dim) for n, s in zip(seen, out.scores) if s is not None)
    return float((interp / (out.macs - interp)).mean())


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    dtype: str
    batch: int
    attention: str | None = None
    compiled: bool = False  # torch.compile'd (threshold modes with dynamic shapes: counts vary per batch)
    ms_median: float | None = None
    ms_all: list[float] = field(default_factory=list)
    images_per_s: float | None = None
    gmacs_per_image: float | None = None
    mean_kept: list[float] = field(default_factory=list)  # mean patch tokens alive after each stage
    kept_std: list[float] = field(default_factory=list)  # spread of that count over images
    ideal_speedup: float | None = None
    speedup: float | None = None  # against the unpruned backbone run the same way (eager or compiled)
    efficiency: float | None = None
    interpreter_pct: float | None = None  # interpreter MACs as % of backbone MACs
    vs_budget: float | None = None  # this row's throughput / budget mode's
    error: str | None = None
    ms_min: float | None = None
    latency_p50_ms: float | None = None  # batch 1 only: single calls
    latency_p90_ms: float | None = None
    compile_gain: float | None = None  # compiled rows: eager ms / compiled ms of the same configuration
    capacity: list[int | None] = field(default_factory=list)  # threshold-static: patch tokens per stage

    @property
    def label(self) -> str:
        return self.config + (f"/{self.attention}" if self.attention else "") + ("+compile" if self.compiled else "")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(model: IARed, images: Tensor, *, thresholds: Sequence[float], strategies: Sequence[str] = STRATEGIES,
                compile: bool = False, compile_mode: str = "default", warmup: int = WARMUP, repeats: int = REPEATS,
                dtype_name: str = "float32",
                clock: str = "wall", latency_calls: int = LATENCY_CALLS,
                progress: Callable[[str], None] = _log) -> list[Row]:
    """Time every configuration on ``images`` (already on the model's device and dtype).

    ``compile``: every configuration is timed twice, eager and ``torch.compile``'d (``compile_mode``),
    in the same interleaved rounds. At batch 1 the rows also get p50 / p90 latency of ``latency_calls`` single calls."""
    device = images.device
    batch = images.shape[0]
    cfg = model.backbone.cfg
    full = model.full_macs()

    with torch.inference_mode():
        ref = model(images, "threshold", threshold=list(thresholds))
    ratios = budget_ratios(ref, cfg.num_patches)
    capacity = capacity_from_outputs(model, [ref])  # the batch's largest count per stage

    def runner(kind: str, attention: str, compiled: bool) -> Callable[[], object]:
        if kind == "unpruned":
            return _wrap(model.backbone, compiled, lambda f: f(images), mode=compile_mode)
        if kind == "budget":
            return _wrap(model, compiled, lambda f: f(images, "budget", keep_ratio=ratios), mode=compile_mode)
        if kind == "threshold-static":  # fixed shapes: one graph, no recompiles
            return _wrap(model, compiled, lambda f: f(images, "threshold", threshold=list(thresholds), layout="static",
                                                      capacity=capacity), dynamic=False, fullgraph=True,
                         mode=compile_mode)
        layout = "padded" if kind == "threshold-padded" else "packed"
        # dynamic: the per-image counts change with every batch; without it each new count recompiles
        return _wrap(model, compiled, lambda f: f(images, "threshold", threshold=list(thresholds), layout=layout,
                                                  attention=attention), dynamic=True, mode=compile_mode)

    plan = [("unpruned", None), ("budget", None), ("threshold-padded", None), ("threshold-static", None)]
    plan += [("threshold-packed", s) for s in strategies]
    rows: list[Row] = []
    fns: dict[str, Callable[[], object]] = {}
    for compiled in (False, True) if compile else (False,):
        for kind, attention in plan:
            row = Row(kind, dtype_name, batch, attention, compiled)
            rows.append(row)
            try:
                fn = runner(kind, attention or "auto", compiled)
                if compiled:
                    progress(f"  compiling {row.label}")
                with torch.inference_mode():
                    out = fn()
            except Exception as e:  # noqa: BLE001 -- one failing configuration must not end the run
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                progress(f"  {row.label}: failed: {row.error}")
                continue
            fns[row.label] = fn
            if kind == "unpruned":
                macs = full
                row.interpreter_pct = 0.0
            else:
                macs = float(out.macs.mean())
                row.interpreter_pct = 100 * interpreter_share(model, out)
                kept = torch.stack([k[:, out.num_prefix:].float().sum(1) for k in out.keep], 1)
                row.mean_kept = [round(float(x), 2) for x in kept.mean(0)]
                row.kept_std = [round(float(x), 2) for x in kept.std(0, correction=0)]
            if kind == "threshold-static":
                row.capacity = capacity
            row.gmacs_per_image = macs / 1e9
            row.ideal_speedup = full / macs

    def report_round(i: int, times: dict[str, list[float]]) -> None:
        progress(f"  round {i}/{repeats}: " + ", ".join(f"{name} {t[-1]:.1f}" for name, t in times.items()))

    # Interleaved (iared.timing): every round times each configuration once, so a burst of load from
    # other processes on a shared machine lands on all of them rather than on one.
    with torch.inference_mode():
        times = time_interleaved(fns, device, warmup=warmup, repeats=repeats, clock=clock, on_round=report_round)
        latency = latency_percentiles(fns, device, calls=latency_calls, warmup=0, clock=clock) \
            if batch == 1 and latency_calls > 0 else {}
    by_label = {r.label: r for r in rows}
    for label, ms in times.items():
        row = by_label[label]
        row.ms_all = ms
        row.ms_median = median_ms(ms)
        row.ms_min = min(ms)
        row.images_per_s = batch / row.ms_median * 1e3
        if label in latency:
            row.latency_p50_ms, row.latency_p90_ms = latency[label]["p50_ms"], latency[label]["p90_ms"]

    for compiled in (False, True):
        group = [r for r in rows if r.compiled == compiled and r.ms_median]
        base = next((r for r in group if r.config == "unpruned"), None)
        budget = next((r for r in group if r.config == "budget"), None)
        for r in group:
            if base is not None:
                r.speedup = base.ms_median / r.ms_median
                r.efficiency = r.speedup / r.ideal_speedup
            if budget is not None and r.config != "unpruned":
                r.vs_budget = budget.ms_median / r.ms_median
            if compiled:
                eager = by_label.get(r.label.removesuffix("+compile"))
                if eager is not None and eager.ms_median:
                    r.compile_gain = eager.ms_median / r.ms_median
    return rows


def _wrap(module, compile: bool, call: Callable, dynamic: bool | None = None, mode: str = "default",
          fullgraph: bool = False):
    if not compile:
        return lambda: call(module)
    compiled = torch.compile(module, dynamic=dynamic, mode=mode, fullgraph=fullgraph)
    return lambda: call(compiled)


# -- running the whole grid -------------------------------------------------------------------------


def load_task_images(task: str, n: int, mcfg) -> Tensor:
    """``n`` inputs of ``task``'s test split (repeated if the split is smaller), matched to and checked
    against the model (:func:`iared.loading.task_dataset`: a task, an image folder or a video folder)."""
    from iared.loading import task_dataset
    from iared.train.interpreters import stack_batch

    ds = task_dataset(task, "test", mcfg)
    if len(ds) == 0:
        raise ValueError(f"--task {task}: empty test split")
    images, _ = stack_batch(ds, torch.arange(n) % len(ds))
    return images


def _is_pruned_file(path) -> bool:
    from iared.checkpoint import read_checkpoint
    from iared.loading import is_pruned

    return is_pruned(read_checkpoint(path))


def build_model(cfg: BenchConfig, device: torch.device) -> tuple[IARed, list[float] | None]:
    """The model to time, and a fixed threshold when it comes with trained interpreters (else None).

    ``--checkpoint``: a pruned checkpoint is used whole, at ``--threshold`` or the threshold it
    records; any backbone file (official DeiT ``.pth``, state dict, safetensors; ``--model`` says how
    to build it where the file cannot) gets fresh interpreters, spread and calibrated like the
    random-weight geometries (:mod:`iared.loading`'s rules, shared by every command).
    """
    from iared.reducers.base import check_threshold

    check_threshold(cfg.threshold)
    if cfg.target_kept is not None and not (cfg.checkpoint and _is_pruned_file(cfg.checkpoint)):
        raise ValueError(f"--target-kept calibrates a pruned model's interpreter thresholds; "
                         f"{cfg.checkpoint or 'a random-weight model'} has no trained interpreters (give a pruned "
                         "--checkpoint; --keep sets a random-weight model's kept fraction)")
    if cfg.checkpoint and cfg.frames is not None:
        raise ValueError("--frames applies to random-weight video models (--model NAME); a --checkpoint carries "
                         "its own frame count")
    if cfg.checkpoint:
        from iared.checkpoint import read_checkpoint
        from iared.loading import is_pruned, load_iared

        pruned = is_pruned(read_checkpoint(cfg.checkpoint))
        name = MODEL_ALIASES.get(cfg.model, cfg.model) if cfg.model_given else None
        model = load_iared(cfg.checkpoint, None if pruned else name).to(device).eval()
        if pruned:
            t = cfg.threshold if cfg.threshold is not None else model.inference.threshold
            return model, list(t) if isinstance(t, (list, tuple)) else [t] * model.num_stages
        spread_interpreters(model, cfg.interpreter_std, cfg.seed)
        return model, None
    from iared.models import create_model
    from iared.models.timesformer import TIMESFORMER_CONFIGS

    torch.manual_seed(cfg.seed)
    name = MODEL_ALIASES.get(cfg.model, cfg.model)
    video = name in TIMESFORMER_CONFIGS
    if cfg.frames is not None and not video:
        raise ValueError(f"--frames {cfg.frames}: {name} is an image model (frames apply to TimeSformer names: "
                         f"{', '.join(sorted(TIMESFORMER_CONFIGS)[:3])}, ...)")
    overrides = dict((QUICK_VIDEO_GEOMETRY if video else QUICK_GEOMETRY) if cfg.quick else {})
    if cfg.frames is not None:
        overrides["num_frames"] = cfg.frames
    backbone = create_model(name, **overrides)
    model = IARed(backbone).eval()
    spread_interpreters(model, cfg.interpreter_std, cfg.seed)
    return model.to(device), None


def run(cfg: BenchConfig, progress: Callable[[str], None] = _log) -> dict:
    """Measure the grid in ``cfg``; returns the JSON-able report (also written to ``cfg.json``)."""
    if not 0 < cfg.keep <= 1:
        raise ValueError(f"--keep must be in (0, 1], got {cfg.keep}")
    check_calibration(cfg.target_kept, cfg.threshold, cfg.calibration_samples)  # the CLI checked the rest
    if cfg.target_kept is not None and cfg.save_calibrated:
        check_output_file(cfg.save_calibrated, "--save-calibrated file")
    if cfg.json and cfg.json != "-":
        check_output_file(cfg.json, "--json file")
    for d in cfg.dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtype {d!r}: expected one of {', '.join(DTYPES)}")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    if cfg.strategies is None:
        # the fused varlen kernels (varlen, and nested through torch's jagged SDPA) are CUDA's; elsewhere
        # nested is a slow per-image math path (and crashes on CPU-only machines unless its inputs are
        # contiguous) and varlen does not run
        cfg.strategies = STRATEGIES if device.type == "cuda" else ("loop", "bucket")
    for s in cfg.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"--strategies {s!r}: expected some of {', '.join(STRATEGIES)}")
    if "varlen" in cfg.strategies and device.type != "cuda":
        raise ValueError(f"--strategies varlen: the fused varlen kernels are CUDA's; on {device.type} time "
                         "loop and bucket")
    if cfg.clock not in CLOCKS:
        raise ValueError(f"--clock {cfg.clock!r}: expected one of {', '.join(CLOCKS)}")
    if cfg.clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu measures host CPU time: only meaningful with --device cpu")
    if cfg.warmup < 0 or cfg.repeats < 1:
        raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {cfg.warmup} and {cfg.repeats}")
    if cfg.quick:
        cfg.warmup, cfg.repeats = min(cfg.warmup, 1), min(cfg.repeats, 2)
    use_threads(cfg.threads)
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ValueError(f"--compile-mode {cfg.compile_mode} needs --compile")
    if cfg.compile:
        # every configuration (and batch size) is a new specialisation of the same forward code
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    model, fixed = build_model(cfg, device)
    stored = fixed
    mcfg = model.backbone.cfg
    # the output path is where the report lies, not how it was measured (and names the machine's folders)
    config = {k: v for k, v in asdict(cfg).items() if k != "json"}
    report = {"machine": machine_info(device), "config": config, "model": mcfg.to_dict(),
              "default_attention": default_packed_attention(device), "runs": []}
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = load_task_images(cfg.task, max(cfg.batch_sizes), mcfg) if cfg.task else None
    if cfg.target_kept is not None:
        n = cfg.calibration_samples
        sample = (load_task_images(cfg.task, n, mcfg) if cfg.task else
                  torch.randn(n, *input_shape(mcfg), generator=torch.Generator().manual_seed(cfg.seed + 1)))
        fixed = model.calibrate(sample.to(device), cfg.target_kept).threshold
        report["calibration"] = {"target_kept": cfg.target_kept, "samples": n, "thresholds": fixed,
                                 "threshold_stored": stored}
        progress(f"thresholds {','.join(f'{t:.4g}' for t in fixed)} calibrated on {n} "
                 f"{'--task' if cfg.task else 'Gaussian-noise'} inputs for --target-kept {cfg.target_kept}")
        if cfg.save_calibrated:
            from iared.pruning import save_calibrated

            save_calibrated(model, cfg.checkpoint, cfg.save_calibrated)
            progress(f"wrote {cfg.save_calibrated}")
    for dtype_name in cfg.dtypes:
        dtype = DTYPES[dtype_name]
        model = model.to(dtype)
        for batch in cfg.batch_sizes:
            progress(f"[{dtype_name} batch {batch}]")
            if pool is not None:
                images = pool[:batch]
            else:
                images = torch.randn(batch, *input_shape(mcfg), generator=gen)
            images = images.to(device, dtype)
            try:
                thresholds = fixed or calibrate_thresholds(model, images, cfg.keep)
                rows = bench_model(model, images, thresholds=thresholds, strategies=cfg.strategies,
                                   compile=cfg.compile, compile_mode=cfg.compile_mode, warmup=cfg.warmup, repeats=cfg.repeats,
                                   dtype_name=dtype_name, clock=cfg.clock, progress=progress,
                                   latency_calls=5 if cfg.quick else LATENCY_CALLS)
            except torch.OutOfMemoryError as e:
                progress(f"  out of memory at batch {batch}: skipped")
                report["runs"].append({"dtype": dtype_name, "batch": batch, "error": f"out of memory: {e}"[:300]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            report["runs"].append({"dtype": dtype_name, "batch": batch, "thresholds": thresholds,
                                   "rows": [asdict(r) for r in rows]})
    model.float()
    if hasattr(os, "getloadavg"):
        report["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["machine"]["speed_probe_ms_at_end"] = round(speed_probe_ms(device), 4)
    if cfg.json == "-":
        print(json.dumps(json_safe(report), indent=2))
    elif cfg.json:
        write_json(cfg.json, report)
    return report


def format_table(report: dict) -> str:
    """The human-readable table of a :func:`run` report."""
    m = report["machine"]
    lines = [f"{report['config']['model'] if not report['config'].get('checkpoint') else report['config']['checkpoint']}"
             f" | keep {report['config']['keep']} | {m['device_name']} ({m['cpu_cores']} cores, {m['threads']} threads)"
             f" | torch {m['torch']} | {report['config'].get('clock', 'wall')} clock"
             + (f" | load avg {m['load_avg_1m_at_start']} at start" if "load_avg_1m_at_start" in m else "")
             + (f" | speed probe {m['speed_probe_ms_at_start']:.3f} ms at start, {m['speed_probe_ms_at_end']:.3f} at end"
                if "speed_probe_ms_at_end" in m else "")]
    head = (f"{'dtype':9} {'batch':>5} {'config':30} {'ms/batch':>9} {'min ms':>9} {'img/s':>8} {'GMACs':>6} {'ideal':>6} "
            f"{'speedup':>7} {'eff':>5} {'vs bud':>6} {'interp%':>7} {'compile':>7}  kept/stage (±std)")
    lines += [head, "-" * len(head)]

    def f(x, spec):
        return format(x, spec) if x is not None else "-"

    for run_ in report["runs"]:
        if "rows" not in run_:
            lines.append(f"{run_['dtype']:9} {run_['batch']:>5} {run_.get('error', '')}")
            continue
        for r in run_["rows"]:
            name = _label(r)
            if r["error"]:
                lines.append(f"{r['dtype']:9} {r['batch']:>5} {name:30} error: {r['error'][:70]}")
                continue
            kept = " ".join(f"{k:.1f}±{s:.1f}" for k, s in zip(r["mean_kept"], r["kept_std"]))
            lines.append(
                f"{r['dtype']:9} {r['batch']:>5} {name:30} {f(r['ms_median'], '9.1f')} {f(r.get('ms_min'), '9.1f')} {f(r['images_per_s'], '8.1f')} "
                f"{f(r['gmacs_per_image'], '6.2f')} {f(r['ideal_speedup'], '6.2f')} {f(r['speedup'], '7.2f')} "
                f"{f(r['efficiency'], '5.2f')} {f(r['vs_budget'], '6.2f')} {f(r['interpreter_pct'], '7.2f')} "
                f"{f(r.get('compile_gain'), '6.2f') + 'x' if r.get('compile_gain') else '      -'}  {kept}"
            )
    latency = latency_table(report)
    if latency:
        lines.append("")
        lines += latency
    summary = summarize(report)
    if summary:
        lines.append("")
        lines += summary
    return "\n".join(lines)


def _label(row: dict) -> str:
    return row["config"] + (f"/{row['attention']}" if row["attention"] else "") + ("+compile" if row.get("compiled") else "")


def latency_table(report: dict) -> list[str]:
    """Batch-1 latency, single calls: p50 / p90 ms per configuration and dtype."""
    lines = []
    for run_ in report["runs"]:
        rows = [r for r in run_.get("rows", []) if r.get("latency_p50_ms") is not None]
        if not rows:
            continue
        if not lines:
            lines = [f"latency at batch 1 (single calls): {'config':30} {'p50 ms':>8} {'p90 ms':>8} {'vs unpruned p50':>15}"]
        base = next((r for r in rows if r["config"] == "unpruned" and not r.get("compiled")), None)
        for r in rows:
            ratio = base["latency_p50_ms"] / r["latency_p50_ms"] if base else None
            lines.append(f"  {run_['dtype']:9} {'':22} {_label(r):30} {r['latency_p50_ms']:8.2f} {r['latency_p90_ms']:8.2f} "
                         f"{format(ratio, '14.2f') + 'x' if ratio else '-':>15}")
    return lines


def summarize(report: dict) -> list[str]:
    """One line per (dtype, batch): the default packed strategy's efficiency, packed vs budget, interpreter share."""
    default = report.get("default_attention")
    lines = []
    for run_ in report["runs"]:
        rows = [r for r in run_.get("rows", []) if r["config"] == "threshold-packed" and r["efficiency"] is not None
                and not r.get("compiled")]
        if not rows:
            continue
        row = next((r for r in rows if r["attention"] == default), None) or max(rows, key=lambda r: r["efficiency"])
        lines.append(f"{run_['dtype']} batch {run_['batch']}: threshold-packed/{row['attention']} efficiency "
                     f"{row['efficiency']:.2f} (measured {row['speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x), "
                     f"vs budget {row['vs_budget'] if row['vs_budget'] is None else format(row['vs_budget'], '.2f')}, "
                     f"interpreter FLOPs {row['interpreter_pct']:.2f}% of backbone")
        gains = {r["config"] + (f"/{r['attention']}" if r["attention"] else ""): r["compile_gain"]
                 for r in run_.get("rows", []) if r.get("compile_gain")}
        if gains:
            lines.append(f"{run_['dtype']} batch {run_['batch']}: torch.compile buys "
                         + ", ".join(f"{k} {v:.2f}x" for k, v in gains.items()) + " (eager ms / compiled ms)")
    if default:
        lines.append(f"default packed attention on {report['machine']['device']}: {default}")
    return lines
