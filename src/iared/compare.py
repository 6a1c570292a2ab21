"""``iared compare``: every token reducer on the same backbone, the same images and the same clock.

For each method (IA-RED² and the peers of :mod:`iared.reducers.registry`) and each value of its
knob, on the test images of a task:

- top-1, mean GFLOPs per image and the kept fraction of patch tokens after each stage;
- measured images/s at batch 64 and at batch 1, every candidate and the unpruned backbone timed
  interleaved in one run (:func:`iared.timing.time_interleaved`, median of repeats);
- the floors (random dropping, pixel saliency) also at exactly IA-RED²'s mean kept fraction per
  stage, so a learned method always stands next to what no learning gives at the same budget.

Methods that learn (IA-RED²'s interpreters, DynamicViT's predictors) are trained here on the
same training images with the same number of optimiser steps, on the same frozen backbone; the
result says which were trained and for how long.

``finetune_steps`` N > 0 adds a fine-tuned variant of every method but the floors (``iared+ft``,
``evit+ft``, ``tome+ft``, ``ats+ft``, ``dynamicvit+ft``): a copy of the backbone trained N steps under
the method, its reducers frozen and set to the middle of its knob sweep (IA-RED²: threshold 0.5,
EViT and ATS 0.6; DynamicViT: each trained keep ratio), with distillation from the unpruned backbone
(:func:`iared.train.finetune.finetune_reduced`); then the method's whole sweep runs on that backbone.
Every variant gets the same steps, batch, learning rate and data. Fine-tuned backbones are rounded to
float16, as the shipped backbones are, so a run that reloads them measures exactly what was trained.

Everything trained is kept under ``out`` (``iared/``: the interpreter trainer's checkpoints;
``dynamicvit/`` and ``finetune/``: safetensors with their settings), and a rerun with the same
settings and backbone loads it instead of training again: train on an accelerator (``device``,
``batch_sizes=()`` for no timing), then time the same ``out`` on the CPU.

Outputs: ``compare.json`` (figures, machine, the ``best_speedup_at_loss`` summary), ``compare.md``
(a Markdown table) and ``compare.png`` (accuracy against measured throughput, Pareto front marked).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from iared.files import save_figure, write_json, write_text
from iared.reducers import registry as _registry
from iared.stages import ReducedModel, ReducedOutput
from iared.timing import REPEATS, machine_info, median_ms, time_interleaved

DEFAULT_METHODS = ("iared", "dynamicvit", "tome", "evit", "ats", "random", "pixel")
LOSS_LEVELS = (0.5, 1.0)  # points of top-1 lost, for the best_speedup_at_loss summary
FLOOR_METHODS = tuple(n for n, m in _registry.METHODS.items() if m.floor)  # ("random", "pixel", "framediff")
FT = "+ft"  # suffix of a method's fine-tuned variant (CompareConfig.finetune_steps)
DYNAMICVIT_LR = 1e-3  # the predictors' learning rate (Adam-style; the paper's 1e-3 scaled for batch 512)


@dataclass
class CompareConfig:
    """Everything ``iared compare`` does; the command line maps onto it one to one."""

    task: str = "digits-clutter"
    backbone: str | None = None  # weights file; None: the task's shipped backbone
    model: str | None = None  # backbone name (with or without a weights file)
    # None: these, plus the frame-difference floor on a video backbone (registry.default_methods)
    methods: tuple[str, ...] | None = None
    train_steps: int = 300  # optimiser steps per IA-RED² stage; DynamicViT gets as many in total
    train_batch: int = 64
    iared_checkpoint: str | None = None  # trained interpreters on this same backbone: skip training them
    dynamicvit_ratios: tuple[float, ...] = (0.7, 0.5)  # one DynamicViT trained per keep ratio (it learns one budget)
    finetune_steps: int = 0  # > 0: a fine-tuned variant of every method but the floors, this many steps each
    finetune_lr: float = 5e-5
    finetune_methods: tuple[str, ...] | None = None  # which get a fine-tuned variant; None: every one but the floors
    device: str = "cpu"  # where everything runs: training, evaluation and timing
    prerender: int = 0  # render the embedded task's training split up front in N processes (fast accelerators)
    test_samples: int = 1000
    batch_sizes: tuple[int, ...] = (64, 1)
    repeats: int = REPEATS
    seed: int = 0
    out: str = "compare-out"
    quick: bool = False  # CI smoke run: few images, few steps, one knob value per method, 1 repeat

    def __post_init__(self):
        self.methods = None if self.methods is None else tuple(self.methods)
        self.finetune_methods = None if self.finetune_methods is None else tuple(self.finetune_methods)
        self.dynamicvit_ratios = tuple(float(r) for r in self.dynamicvit_ratios)
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if self.quick:
            self.test_samples = min(self.test_samples, 64)
            self.train_steps = min(self.train_steps, 4)
            self.train_batch = min(self.train_batch, 16)
            self.finetune_steps = min(self.finetune_steps, 2)
            self.batch_sizes = tuple(min(b, 8) for b in self.batch_sizes)
            self.repeats = 1


@dataclass
class Candidate:
    """One method at one knob value: how to run it, and what it measured."""

    method: str
    knob: object
    run: Callable[[Tensor], ReducedOutput] = field(repr=False)
    note: str = ""
    top1: float | None = None
    gflops: float | None = None
    kept: list[float] = field(default_factory=list)
    images_per_s: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method}({_fmt_knob(self.knob)}){' ' + self.note if self.note else ''}"

    def to_dict(self) -> dict:
        return {"method": self.method, "knob": self.knob, "note": self.note, "top1": self.top1,
                "gflops": self.gflops, "kept_fraction": self.kept, "images_per_s": self.images_per_s,
                "speedup": self.speedup}


def _fmt_knob(knob) -> str:
    if isinstance(knob, (list, tuple)):
        return "/".join(f"{k:.2f}" for k in knob)
    return f"{knob:g}" if isinstance(knob, float) else str(knob)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- measuring --------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(run: Callable[[Tensor], ReducedOutput], images: Tensor, labels: Tensor,
             batch_size: int = 128) -> tuple[float, float, list[float]]:
    """Top-1, mean GFLOPs per image and mean kept fraction per stage of ``run`` on the images."""
    correct, macs, kept = 0, [], []
    for start in range(0, len(images), batch_size):
        out = run(images[start: start + batch_size])
        correct += int((out.logits.argmax(-1) == labels[start: start + batch_size]).sum())
        macs.append(out.macs.double().cpu().reshape(-1).expand(out.logits.shape[0]))
        if out.keep:
            kept.append(out.kept_fraction().cpu())
    mean_kept = [round(float(v), 4) for v in torch.cat(kept).mean(0)] if kept else []
    return correct / len(images), float(torch.cat(macs).mean()) / 1e9, mean_kept


@torch.inference_mode()
def time_candidates(candidates: Sequence[Candidate], unpruned: Callable[[Tensor], object], images: Tensor,
                    batch_sizes: Sequence[int], repeats: int, progress: Callable[[str], None] = _log) -> dict:
    """images/s of every candidate and of the unpruned model, interleaved per batch size."""
    result = {}
    for batch in batch_sizes:
        # Every call of every candidate sees the same sequence of batches: consecutive slices of the
        # test images, so per-image token counts (threshold mode, ATS) vary as in use (batch 1 too).
        n_batches = max(1, min(16, len(images) // batch))
        batches = [images[i * batch:(i + 1) * batch] for i in range(n_batches)]
        if len(batches[0]) < batch:  # fewer test images than the batch: repeat them
            batches = [images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]]
        x = batches[0]

        def cycling(fn, batches=batches):
            state = {"i": 0}

            def call():
                out = fn(batches[state["i"] % len(batches)])
                state["i"] += 1
                return out
            return call

        fns = {"unpruned": cycling(unpruned)}
        for i, c in enumerate(candidates):
            fns[str(i)] = cycling(c.run)
        progress(f"timing {len(fns)} models at batch {batch}, {repeats} interleaved repeats")
        times = time_interleaved(fns, x.device, repeats=repeats)
        base = batch * 1e3 / median_ms(times["unpruned"])
        result[str(batch)] = base
        for i, c in enumerate(candidates):
            ips = batch * 1e3 / median_ms(times[str(i)])
            c.images_per_s[str(batch)] = ips
            c.speedup[str(batch)] = ips / base
    return result


def best_speedup_at_loss(candidates: Sequence[Candidate], full_top1: float, batch: str,
                         levels: Sequence[float] = LOSS_LEVELS) -> dict:
    """For each loss level (points of top-1), the best measured speed-up of each method within it."""
    out = {}
    for level in levels:
        best: dict[str, float] = {}
        for c in candidates:
            if c.top1 is None or batch not in c.speedup:
                continue
            if (full_top1 - c.top1) * 100 <= level + 1e-9:
                best[c.method] = max(best.get(c.method, 0.0), round(c.speedup[batch], 4))
        out[str(float(level))] = dict(sorted(best.items(), key=lambda kv: -kv[1]))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (throughput, accuracy) that no other point beats on both axes."""
    front = []
    for i, (t, a) in enumerate(points):
        dominated = any((t2 >= t and a2 >= a) and (t2 > t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# -- building the candidates -------------------------------------------------------------------------


def _floor_ratios(kept: Sequence[float]) -> list[float]:
    """Per-stage keep ratios (of the tokens alive before each stage) from cumulative kept fractions."""
    ratios, before = [], 1.0
    for k in kept:
        ratios.append(min(1.0, max(k / before, 1e-3)) if before > 0 else 1.0)
        before = k
    return ratios


def build_candidates(cfg: CompareConfig, backbone, train_set, progress: Callable[[str], None] = _log
                     ) -> tuple[list[Candidate], dict, ReducedModel | None]:
    """Every (method, knob) to measure, training the methods that learn (and, with
    ``cfg.finetune_steps``, fine-tuning a backbone per method). Returns the candidates, what was
    trained (method -> steps, batch, seconds) and the IA-RED² model (None if not compared)."""
    from iared.reducers import registry

    check_methods(cfg, backbone)
    candidates: list[Candidate] = []
    trained: dict[str, dict] = {}
    iared_model = None
    for method in cfg.methods:
        knobs = registry.default_knobs(method, quick=cfg.quick, backbone=backbone)
        m = registry.method(method)
        if m.train is not None and not m.knob_in_weights:  # trained once, swept at run time (IA-RED²)
            trained_model, trained[method] = m.train(cfg, backbone, train_set, None, progress)
            if iared_model is None:
                iared_model = trained_model
            variants = [(method, trained_model)]
            if finetunes(cfg, method):
                ft_knob = registry.default_knobs(method, quick=True)[0]
                tuned, trained[method + FT] = _finetuned(cfg, method, copy.deepcopy(trained_model), ft_knob,
                                                         train_set, progress)
                variants.append((method + FT, tuned))
            for name, model in variants:
                candidates += [Candidate(name, t, registry.runner(method, model, t)) for t in knobs]
        elif m.train is not None:  # trained once per knob (DynamicViT)
            for ratio in (knobs if cfg.quick else cfg.dynamicvit_ratios):
                model, info = m.train(cfg, backbone, train_set, ratio, progress)
                trained.setdefault(method, {"runs": []})["runs"].append(info)
                candidates.append(Candidate(method, ratio, registry.runner(method, model, ratio)))
                if finetunes(cfg, method):
                    tuned, info = _finetuned(cfg, method, _with_backbone(model, copy.deepcopy(backbone)), ratio,
                                             train_set, progress)
                    trained.setdefault(method + FT, {"runs": []})["runs"].append(info)
                    candidates.append(Candidate(method + FT, ratio, registry.runner(method, tuned, ratio)))
        else:
            backbones = [(method, backbone)]
            if finetunes(cfg, method):
                ft_knob = registry.default_knobs(method, quick=True, backbone=backbone)[0]
                model = registry.build_reduced(method, copy.deepcopy(backbone), ft_knob)
                tuned, trained[method + FT] = _finetuned(cfg, method, model, ft_knob, train_set, progress)
                backbones.append((method + FT, tuned.backbone))
            for name, bb in backbones:
                for knob in knobs:
                    model = registry.build_reduced(method, bb, knob)
                    candidates.append(Candidate(name, knob, registry.runner(method, model, knob)))
    return candidates, trained, iared_model


def finetunes(cfg: CompareConfig, method: str) -> bool:
    """Whether ``method`` gets a fine-tuned variant (never the floors: they stand for no learning)."""
    if cfg.finetune_steps <= 0 or method in FLOOR_METHODS:
        return False
    return cfg.finetune_methods is None or method in cfg.finetune_methods


def check_methods(cfg: CompareConfig, backbone) -> None:
    """Resolve the default method list for ``backbone`` and refuse unknown methods and methods that do
    not apply to it (one line each, before any work)."""
    from iared.reducers import registry

    if cfg.methods is None:
        cfg.methods = registry.default_methods(backbone, DEFAULT_METHODS)
    unknown = [m for m in cfg.methods if m not in registry.METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(registry.METHODS)}")
    for m in cfg.methods:
        registry.check_applies(m, backbone)
    for m in cfg.finetune_methods or ():
        if m not in cfg.methods or m in FLOOR_METHODS:
            raise ValueError(f"--finetune-methods {m}: not one of the compared methods that can be fine-tuned "
                             f"({', '.join(x for x in cfg.methods if x not in FLOOR_METHODS)})")


def _runner(model: ReducedModel, **kw) -> Callable[[Tensor], ReducedOutput]:
    model.eval()
    return lambda x: model(x, **kw)


def _with_backbone(model: ReducedModel, backbone) -> ReducedModel:
    """A copy of ``model``'s reducers and stages around another backbone (for fine-tuning a copy)."""
    return ReducedModel(backbone, [copy.deepcopy(model.reducer(g)) for g in range(model.num_stages)],
                        model.stage_starts)


def _finetuned(cfg: CompareConfig, method: str, model: ReducedModel, knob, train_set, progress):
    """``model`` (reducers of ``method`` around a copy of the backbone) with its backbone fine-tuned
    under ``knob`` for ``cfg.finetune_steps`` steps, or loaded from ``out/finetune`` when an earlier
    run with the same settings left it. The backbone is rounded to float16 either way."""
    import time

    from iared.reducers import registry
    from iared.train.finetune import FinetuneConfig, finetune_reduced

    ft = FinetuneConfig(steps=cfg.finetune_steps, batch_size=cfg.train_batch, lr=cfg.finetune_lr, seed=cfg.seed,
                        device=cfg.device)
    settings = {"method": method, "knob": knob, "steps": ft.steps, "batch": ft.batch_size, "lr": ft.lr,
                "distill_weight": ft.distill_weight, "seed": ft.seed, "task": cfg.task,
                "backbone_sha1": weights_sha1(model.backbone),
                # the reducers it ran under (IA-RED²'s interpreters, DynamicViT's predictors) are part of it
                "reducers_sha1": weights_sha1(model.reducers)}
    path = Path(cfg.out) / "finetune" / f"{method}-{_fmt_knob(knob)}.safetensors"
    info = {"knob": knob, "steps": ft.steps, "batch": ft.batch_size, "lr": ft.lr, "backbone": "fine-tuned"}
    saved = load_cached(path, settings)
    if saved is not None:
        progress(f"{method}{FT} ({_fmt_knob(knob)}): fine-tuned backbone loaded from {path}")
        model.backbone.load_state_dict(saved)
        return model.eval(), {**info, "loaded": True, "seconds": float(settings_of(path).get("seconds", 0))}
    progress(f"fine-tuning the backbone under {method} ({_fmt_knob(knob)}): {ft.steps} steps, batch {ft.batch_size}")
    t0 = time.perf_counter()
    finetune_reduced(model, train_set, registry.forward_kwargs(method, knob), ft, desc=f"{method}{FT}")
    with torch.no_grad():  # as shipped backbones are: what a reloading run measures is what ran here
        for t in model.backbone.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half())
    info["seconds"] = round(time.perf_counter() - t0, 1)
    save_cached(path, {k: v.half() if v.is_floating_point() else v for k, v in model.backbone.state_dict().items()},
                {**settings, "seconds": info["seconds"]})
    return model.eval(), info


# -- what training left in ``out`` -------------------------------------------------------------------


def weights_sha1(module: torch.nn.Module) -> str:
    """A fingerprint of ``module``'s weights (names, dtypes, values): cached training results are
    reused only on the weights they were trained from."""
    import hashlib

    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_cached(path: Path, tensors: dict[str, Tensor], settings: dict) -> None:
    """Tensors and the settings that made them, in one safetensors file (written atomically)."""
    import json

    from safetensors.torch import save

    from iared.files import write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(path, save(tensors, metadata={"iared_settings": json.dumps(settings, sort_keys=True)}))


def settings_of(path: Path) -> dict:
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("iared_settings", "{}"))


def load_cached(path: Path, settings: dict) -> dict[str, Tensor] | None:
    """The tensors saved at ``path`` if they were made with exactly ``settings`` (the time they took
    aside); None when there is no such file. A file made with other settings is refused in one line:
    overwriting another run's training silently would lose it."""
    from iared.checkpoint import read_checkpoint

    if not path.is_file():
        return None
    saved = {k: v for k, v in settings_of(path).items() if k != "seconds"}
    want = json_roundtrip(settings)
    if saved != want:
        differ = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise ValueError(f"{path} was trained with other settings ({', '.join(differ)} differ); "
                         "use a new --out folder (or delete the file) to train again")
    return read_checkpoint(path)


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj, sort_keys=True))


# -- the whole comparison ---------------------------------------------------------------------------


def _public_config(cfg: CompareConfig) -> dict:
    """The settings as the report keeps them: where the outputs went is not how they were measured, and
    input files by name only (as ``iared bench``: a shared report does not name the machine's folders)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "json")}
    for key in ("backbone", "iared_checkpoint"):
        if config[key]:
            config[key] = Path(config[key]).name
    return config


def run_compare(cfg: CompareConfig, progress: Callable[[str], None] = _log) -> dict:
    """Run the comparison and write ``compare.json``, ``compare.md`` and ``compare.png`` under ``cfg.out``."""
    from iared.loading import load_backbone, task_dataset
    from iared.models import TASK_BACKBONES
    from iared.reducers import registry
    from iared.train.interpreters import stack_batch

    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    default = TASK_BACKBONES.get(cfg.task, "digits_vit")
    device = torch.device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.model, pretrained=cfg.backbone is None, default=default,
                             pruned_note=cfg.iared_checkpoint != cfg.backbone).eval()
    backbone.requires_grad_(False).to(device)
    check_methods(cfg, backbone)
    test_set = task_dataset(cfg.task, "test", backbone.cfg)
    train_set = task_dataset(cfg.task, "train", backbone.cfg)
    if cfg.prerender:
        from iared.data.samples import prerender_task

        prerender_task(train_set, cfg.prerender)
    images, labels = (t.to(device) for t in stack_batch(test_set, torch.arange(min(cfg.test_samples, len(test_set)))))

    candidates, trained, iared_model = build_candidates(cfg, backbone, train_set, progress)

    # The floors at exactly IA-RED²'s budget: its mean kept fraction per stage at the trained threshold.
    full = ReducedModel(backbone, [None], [0]).eval()  # the stage loop with nothing to reduce
    full_top1, full_gflops, _ = evaluate(full, images, labels)
    if iared_model is not None:
        t = iared_model.inference.threshold
        _, _, iared_kept = evaluate(_runner(iared_model, mode="threshold", threshold=t), images, labels)
        ratios = _floor_ratios(iared_kept)
        for method in [m for m in FLOOR_METHODS if m in cfg.methods]:
            model = registry.build_reduced(method, backbone, ratios, iared_model.stage_starts)
            candidates.append(Candidate(method, ratios, registry.runner(method, model, ratios),
                                        note="at IA-RED²'s kept fraction"))

    for c in candidates:
        progress(f"evaluating {c.label} on {len(images)} test images")
        c.top1, c.gflops, c.kept = evaluate(c.run, images, labels)
    # no batch sizes: accuracy and FLOPs only (e.g. a training run on an accelerator, timed later on the CPU)
    baseline_ips = time_candidates(candidates, backbone, images, cfg.batch_sizes, cfg.repeats, progress)

    result = {
        "task": cfg.task,
        "backbone": Path(cfg.backbone).name if cfg.backbone else f"{default} (shipped)",
        "test_images": len(images),
        "config": _public_config(cfg),
        "machine": machine_info(images.device),
        "unpruned": {"top1": full_top1, "gflops": full_gflops, "images_per_s": baseline_ips},
        "trained": trained,
        "candidates": [c.to_dict() for c in candidates],
        "best_speedup_at_loss": (best_speedup_at_loss(candidates, full_top1, str(cfg.batch_sizes[0]))
                                 if cfg.batch_sizes else {}),
    }
    if len(cfg.batch_sizes) > 1:
        result["best_speedup_at_loss_by_batch"] = {
            str(b): best_speedup_at_loss(candidates, full_top1, str(b)) for b in cfg.batch_sizes}
    write_json(out_dir / "compare.json", result)
    write_text(out_dir / "compare.md", format_markdown(result))
    if cfg.batch_sizes:
        plot(result, out_dir / "compare.png")
    return result


def format_markdown(result: dict) -> str:
    """The comparison as a Markdown table (one row per method and knob), unpruned first."""
    batches = list(result["unpruned"]["images_per_s"])
    head = ["method", "knob", "top-1 %", "GFLOPs", "kept / stage"]
    head += [f"img/s b{b}" for b in batches] + [f"speed-up b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    u = result["unpruned"]
    def row(cells):
        return "| " + " | ".join(cells) + " |"

    lines.append(row(["unpruned", "-", f"{100 * u['top1']:.2f}", f"{u['gflops']:.4f}", "-"]
                     + [f"{u['images_per_s'][b]:.0f}" for b in batches] + ["1.00x" for _ in batches]))
    for c in result["candidates"]:
        knob = _fmt_knob(c["knob"]) + (f" ({c['note']})" if c["note"] else "")
        kept = "/".join(f"{k:.2f}" for k in c["kept_fraction"]) or "-"
        lines.append(row([c["method"], knob, f"{100 * c['top1']:.2f}", f"{c['gflops']:.4f}", kept]
                         + [f"{c['images_per_s'][b]:.0f}" for b in batches]
                         + [f"{c['speedup'][b]:.2f}x" for b in batches]))
    lines.append("")
    for level, best in result["best_speedup_at_loss"].items():
        ranked = ", ".join(f"{m} {s:.2f}x" for m, s in best.items()) or "none"
        lines.append(f"- best measured speed-up at batch {batches[0]} within {level} pt of the unpruned top-1: "
                     f"{ranked}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Accuracy against measured throughput at the first batch size; the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = list(result["unpruned"]["images_per_s"])[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points, names = [], []
    u = result["unpruned"]
    points.append((u["images_per_s"][batch], 100 * u["top1"]))
    names.append("unpruned")
    for c in result["candidates"]:
        points.append((c["images_per_s"][batch], 100 * c["top1"]))
        names.append(c["method"] + ("*" if c["note"] else ""))
    markers = "osD^vP*Xhd<>"
    for k, name in enumerate(dict.fromkeys(names)):
        xs = [p[0] for p, n in zip(points, names) if n == name]
        ys = [p[1] for p, n in zip(points, names) if n == name]
        ax.plot(xs, ys, markers[k % len(markers)], label=name, alpha=0.85)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel(f"measured images/s at batch {batch}")
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{result['task']}: accuracy against measured throughput (* = at IA-RED²'s kept fraction)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# -- overhead at equal kept-token counts ------------------------------------------------------------


@torch.inference_mode()
def measure_overhead(backbone, keep: float = 0.7, batch_sizes: Sequence[int] = (64, 1), repeats: int = REPEATS,
                     seed: int = 0, progress: Callable[[str], None] = _log) -> dict:
    """What each way of reducing costs beyond the blocks it saves: every method at the same stages
    (``quarter_locations``: DeiT's 3, 6, 9) keeping ``keep`` of the alive patches at each, so the
    blocks see the same token counts (EViT: plus its one fused token; ATS: at most as many, duplicates
    collapse), timed interleaved on random inputs with random weights.

    Dropping (random scores: the cheapest possible selection), dropping after scoring (IA-RED²'s
    interpreter, DynamicViT's predictor, pixel saliency), fusing (EViT), merging (ToMe with r chosen
    per stage to leave the same count) and sampling (ATS). ``overhead`` = time / random-drop time.
    """
    from iared.interpreter import MultiHeadInterpreter, default_interpreter_heads
    from iared.reducers import registry
    from iared.reducers.base import quarter_locations
    from iared.reducers.dynamicvit import build_dynamicvit
    from iared.reducers.policy import budget_counts
    from iared.reducers.tome import ToMe

    torch.manual_seed(seed)
    depth, dim = len(backbone.blocks), backbone.token_dim
    locs = quarter_locations(depth)
    n = backbone.num_tokens - backbone.num_prefix_tokens
    alive = [n] + budget_counts(n, [keep] * len(locs))
    tome_rs = [alive[g] - alive[g + 1] for g in range(len(locs))]
    heads = default_interpreter_heads(dim)
    interpreters = [MultiHeadInterpreter(dim, heads) for _ in locs]
    for interp in interpreters:  # spread the random scores (as iared bench does)
        interp.qk.weight.normal_(0, (3.0 / dim) ** 0.5)
    models = {
        "drop (random scores)": (registry.build_reduced("random", backbone, keep, locs), {"mode": "budget", "keep_ratio": keep}),
        "drop (pixel saliency)": (registry.build_reduced("pixel", backbone, keep, locs), {"mode": "budget", "keep_ratio": keep}),
        "drop (IA-RED² interpreter, budget)": (ReducedModel(backbone, [None, *interpreters], (0, *locs)),
                                               {"mode": "budget", "keep_ratio": keep}),
        "drop (DynamicViT predictor)": (build_dynamicvit(backbone, keep, locations=locs), {}),
        "fuse (EViT)": (registry.build_reduced("evit", backbone, keep, locs), {}),
        "merge (ToMe)": (ReducedModel(backbone, [None] + [ToMe(r, dim) for r in tome_rs], (0, *locs)), {}),
        "sample (ATS)": (registry.build_reduced("ats", backbone, keep, locs), {}),
    }
    cfg = backbone.cfg
    result = {"keep": keep, "stage_starts": list(locs), "patch_tokens_per_stage": alive[1:], "batches": {}}
    for batch in batch_sizes:
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
        fns = {"unpruned": lambda x=x: backbone(x)}
        rows = {}
        for name, (model, kw) in models.items():
            model.eval()
            out = model(x, **kw)
            rows[name] = {"tokens_per_block": [round(float(t.float().mean()), 1) for t in out.tokens_per_block],
                          "gmacs": round(float(out.macs.float().mean()) / 1e9, 4)}
            fns[name] = lambda model=model, kw=kw, x=x: model(x, **kw)
        progress(f"overhead: timing {len(fns)} models at batch {batch}, {repeats} interleaved repeats")
        times = time_interleaved(fns, x.device, repeats=repeats)
        drop = median_ms(times["drop (random scores)"])
        for name in models:
            ms = median_ms(times[name])
            rows[name].update(ms=round(ms, 3), overhead=round(ms / drop, 3),
                              speedup=round(median_ms(times["unpruned"]) / ms, 3))
        result["batches"][str(batch)] = {"unpruned_ms": round(median_ms(times["unpruned"]), 3), "methods": rows}
    result["machine"] = machine_info(x.device)
    return result


def format_overhead(result: dict) -> str:
    lines = []
    for batch, r in result["batches"].items():
        lines.append(f"batch {batch} (keep {result['keep']} at blocks {result['stage_starts']}; "
                     f"unpruned {r['unpruned_ms']:.1f} ms)")
        lines.append("| method | ms | vs drop | speed-up | GMACs | tokens per block |")
        lines.append("|---|---|---|---|---|---|")
        for name, row in r["methods"].items():
            tpb = "/".join(f"{t:g}" for t in row["tokens_per_block"])
            lines.append(f"| {name} | {row['ms']:.1f} | {row['overhead']:.2f} | {row['speedup']:.2f}x | "
                         f"{row['gmacs']:.3f} | {tpb} |")
        lines.append("")
    return "\n".join(lines)
