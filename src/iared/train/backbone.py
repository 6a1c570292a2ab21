"""``iared train``: train a backbone classifier (from scratch or from a checkpoint).

One loop, no framework: AdamW with warmup + cosine, label smoothing, gradient clipping,
periodic evaluation on ``val``, a final one on ``test``. Distributed data parallel when
launched with ``torchrun`` (``--batch-size`` is the global batch, split evenly over ranks).

Outputs in ``--out DIR``: ``checkpoint.pt`` (full training state, see
:mod:`iared.train.common`), ``config.json`` (model + training config) and ``log.jsonl``;
``--export PATH`` additionally writes the weights alone (float16 safetensors) for shipping.

``--resume`` continues the run in ``DIR`` where it stopped: the data of each step is a pure
function of ``(seed, step)``, so a resumed run ends with exactly the weights of an
uninterrupted one (same world size and thread count; for image folders, random augmentation
in workers is not replayed).

The shipped embedded backbone (``src/iared/assets/digits_vit.safetensors``, test top-1 96.25 %)
was trained in three phases on 2 CPU cores (about 72 minutes together)::

    iared train --steps 2400 --batch-size 128 --lr 1e-3 --warmup 150 --out runs/digits_a
    iared train --checkpoint runs/digits_a/checkpoint.pt --steps 1600 --lr 4e-4 --warmup 50 \
        --seed 1 --out runs/digits_b
    iared train --checkpoint runs/digits_b/checkpoint.pt --steps 1600 --lr 4e-4 --warmup 50 \
        --seed 2 --token-drop 0.5 --out runs/digits_c --export src/iared/assets/digits_vit.safetensors

(test top-1 after each phase: 92.40 %, 94.45 %, 96.25 %; the last phase also makes the model
tolerate dropped tokens, see the README).

The shipped ``digits-natural`` backbone (``src/iared/assets/digits_natural_vit.safetensors``, a hybrid
ViT with a conv stem, test top-1 96.60 %) was distilled from a small CNN (:mod:`iared.train.distill`) on
one H200 GPU (``scripts/gpu_session.sh``, about 5 minutes of the session: three runs one after the other,
each rendering its 60,000 training images up front)::

    iared train --task digits-natural --model digits_natural_cnn --steps 3000 --stop-at 2500 --batch-size 256 \
        --lr 2e-3 --warmup 100 --train-size 60000 --prerender 7 --out runs/nat_teacher      # val 98.35 % at 2000
    iared train --task digits-natural --model digits_natural_vit --teacher runs/nat_teacher/checkpoint.pt \
        --steps 2500 --stop-at 2000 --batch-size 256 --lr 1e-3 --warmup 100 --train-size 60000 --prerender 7 \
        --out runs/nat_a                                                                  # val 96.45 % at 1250
    iared train --task digits-natural --model digits_natural_vit --checkpoint runs/nat_a/checkpoint.pt \
        --teacher runs/nat_teacher/checkpoint.pt --hint 0 --hint-class 0 --token-drop 0.5 --steps 1500 \
        --batch-size 256 --lr 5e-4 --warmup 50 --seed 1 --train-size 60000 --prerender 7 --out runs/nat_b \
        --export src/iared/assets/digits_natural_vit.safetensors                         # test 96.60 %

(the script's time limits stopped the first two runs; ``--stop-at`` repeats where: the checkpoints the
next run read were those of steps 2500 and 2000). The student's stem starts from the teacher's first
stages. The earlier recipe on 2 CPU cores (49 minutes: teacher 900 steps, student 500 + 800 steps at
batch 128, 50,000 rendered on demand) reached 93.90 %.

The shipped ``moving-digits`` backbone (``src/iared/assets/moving_digits_tsf.safetensors``, a TimeSformer
with the same conv stem per frame, test top-1 96.40 % on the 1000 test clips) starts from that image model
(:func:`iared.models.timesformer.inflate_image_weights`: 89.1 % of the test clips before any step), was
trained dense, then with dropped tokens, on one H200 (``scripts/gpu_varlen_video.sh``, 67 s of training)::

    iared train --task moving-digits --model moving_digits_tsf --init-image digits_natural_vit --steps 1000 \
        --batch-size 64 --lr 5e-4 --warmup 50 --train-size 30000 --prerender 15 --out runs/video_a  # test 97.00 %
    iared train --task moving-digits --model moving_digits_tsf --checkpoint runs/video_a/checkpoint.pt \
        --steps 300 --batch-size 64 --lr 2e-4 --warmup 20 --seed 1 --token-drop 0.5 --train-size 30000 \
        --prerender 15 --out runs/video_b --export src/iared/assets/moving_digits_tsf.safetensors  # test 96.40 %

(it was inflated from the previous ``digits_natural_vit``, the 93.90 % CPU one, which the GPU session
replaced afterwards: ``git show 3724c63:src/iared/assets/digits_natural_vit.safetensors > old.safetensors``
and ``--init-image old.safetensors`` repeats it). On 2 CPU cores these steps run at 12 (dense) and 16
(tokens dropped) clips per second, about 100 minutes together; ``--prerender`` only pays on a GPU.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iared.files import check_output_dir, check_output_file
from iared.timing import use_threads
from iared.train.common import (
    Checkpointer,
    RunLogger,
    StepBatchSampler,
    StepGuard,
    all_reduce_sums,
    cleanup,
    init_distributed,
    is_main,
    load_training_state,
    param_groups,
    progress,
    resume_training_state,
    save_atomic,
    seed_everything,
    set_lr,
    training_state,
    unwrap,
    warmup_cosine,
    write_run_config,
)

__all__ = ["HELP", "BackboneTrainConfig", "classification_loss", "export_weights", "resolve_config", "train"]


@dataclass
class BackboneTrainConfig:
    """Everything a backbone run depends on; the CLI maps onto it one to one
    (``--batch-size`` -> ``batch_size``, ``--model-override K=V`` -> ``model_overrides``)."""

    model: str = "digits_vit"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    task: str = "digits-clutter"
    checkpoint: str | None = None  # initial weights (fine-tuning); ignored on resume
    pretrained: bool = False  # initial weights from timm's download (or the shipped digits_vit); ignored on resume
    steps: int = 3000
    batch_size: int = 128  # global, all ranks together
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup: int = 100
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    token_drop: float = 0.0  # each image keeps a random U(1 - token_drop, 1) fraction of its patches
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 10
    train_size: int | None = None  # virtual tasks: number of distinct training samples
    val_size: int | None = None  # virtual tasks: evaluate on the first N val samples
    seed: int = 0
    out: str = "runs/backbone"
    workers: int = 0
    device: str = "auto"
    threads: int | None = None  # torch.set_num_threads in each process
    resume: bool = False
    stop_at: int | None = None  # stop after this step and save, as if preempted
    export: str | None = None  # float16 safetensors of the final weights
    progress: bool = True
    max_bad_steps: int = 0  # steps with a non-finite loss / gradient skipped before the run stops
    teacher: str | None = None  # a trained ConvNet to distil from (iared.train.distill)
    kd: float = 1.0  # with a teacher: weight of KL(teacher || student) on the logits
    hint: float = 1.0  # with a teacher: weight of the per-token feature hints
    hint_class: float = 1.0  # with a teacher: weight of the class-token hints
    init_image: str | None = None  # a video model's initial weights: an image ViT's, inflated; ignored on resume
    prerender: int = 0  # render the embedded task's samples up front in N processes (fast accelerators)


# Fields that may differ between a run and its resumption without changing the result.
OPERATIONAL = {"eval_every", "save_every", "log_every", "out", "workers", "device", "threads", "resume", "stop_at",
               "export", "progress", "checkpoint", "pretrained", "max_bad_steps", "init_image", "prerender"}

HELP = {
    "model": "backbone name (see iared.models.list_models)",
    "model_overrides": "change a ViTConfig field, e.g. depth=3 (repeatable)",
    "task": "task name (digits-clutter) or an image folder root/<class>/<image>",
    "checkpoint": "initial weights (any format create_model reads)",
    "pretrained": "initial weights of --model from timm's download (network needed), or the shipped digits_vit",
    "steps": "optimizer steps",
    "batch_size": "global batch size (split over torchrun ranks)",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine",
    "weight_decay": "AdamW weight decay (not on biases, norms, tokens)",
    "warmup": "linear warmup steps",
    "label_smoothing": "cross-entropy label smoothing",
    "clip_grad": "gradient norm clip (None: off)",
    "token_drop": "drop up to this fraction of each image's patch tokens at random while training, so the "
                  "backbone tolerates pruning",
    "eval_every": "evaluate on val every N steps (0: only at the end)",
    "save_every": "write DIR/checkpoint.pt every N steps (0: only at the end)",
    "log_every": "log the training loss every N steps",
    "train_size": "virtual tasks: number of distinct training samples",
    "val_size": "virtual tasks: size of the val subset used during training",
    "seed": "seed of the weights and of the data order",
    "out": "output directory DIR",
    "workers": "data loader worker processes",
    "device": "auto | cpu | cuda",
    "threads": "torch threads per process",
    "resume": "continue the run in DIR from DIR/checkpoint.pt",
    "stop_at": "stop after this step (saving a checkpoint), as if the job were preempted",
    "export": "also write the final weights as float16 safetensors to PATH",
    "progress": "show a progress bar",
    "teacher": "distil from this trained CNN (iared train --model digits_natural_cnn): its logits and, token by "
               "token, its feature maps (see iared.train.distill); a student conv stem of the same widths starts "
               "from its first stages",
    "kd": "with --teacher: weight of the logit distillation (KL divergence)",
    "hint": "with --teacher: weight of the per-token feature hints (0: off)",
    "hint_class": "with --teacher: weight of the class-token hints (0: off)",
    "init_image": "start a TimeSformer (--model moving_digits_tsf) from an image ViT: a weights file or a shipped "
                  "backbone's name (digits_natural_vit); spatial parts copied, temporal attention starting as the "
                  "identity (iared.models.timesformer.inflate_image_weights)",
    "prerender": "render the embedded task's train / val / test samples once, in N processes, before training "
                 "(a GPU would otherwise wait on rendering; keeps them in memory; use with --workers 0)",
    "max_bad_steps": "skip up to N steps whose loss or gradient is NaN / inf (0: the first one stops the run, "
                     "keeping the last good checkpoint)",
}


# -- the loop -----------------------------------------------------------------------------------


def train(cfg: BackboneTrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns ``{"step", "checkpoint", "seconds"}`` and, when the run
    reached ``cfg.steps``, ``"val"`` / ``"test"`` metrics (and ``"export"``), on every rank."""
    rank, world, device = init_distributed(cfg.device)
    try:
        return _train(cfg, rank, world, device)
    finally:
        cleanup()


def _build_data(cfg: BackboneTrainConfig, model_cfg, rank: int, world: int):
    from iared.data import TASKS
    from iared.loading import task_dataset

    if cfg.task in TASKS:
        kw = {"length": cfg.train_size} if cfg.train_size else {}
        train_set = task_dataset(cfg.task, "train", model_cfg, seed=cfg.seed, **kw)
        # val/test always use the canonical samples (seed 0) so numbers compare across runs
        val_set = task_dataset(cfg.task, "val", model_cfg, **({"length": cfg.val_size} if cfg.val_size else {}))
        test_set = task_dataset(cfg.task, "test", model_cfg)
        if cfg.prerender:
            from iared.data.samples import prerender_task

            for ds in (train_set, val_set, test_set):
                prerender_task(ds, cfg.prerender, show_progress=cfg.progress and rank == 0)
    else:  # folders: images adapted to the model's size, normalisation and input channels
        train_set = task_dataset(cfg.task, "train", model_cfg, augment=True)
        val_set = task_dataset(cfg.task, "val", model_cfg)
        test_set = task_dataset(cfg.task, "test", model_cfg)

    def eval_loader(ds):  # rank r evaluates samples r, r+world, ...; results are summed over ranks
        shard = torch.utils.data.Subset(ds, range(rank, len(ds), world))
        return torch.utils.data.DataLoader(shard, batch_size=256, num_workers=cfg.workers)

    return train_set, eval_loader(val_set), eval_loader(test_set)


def _evaluate(model: nn.Module, loader, device, cache: list | None = None) -> dict[str, float]:
    from iared.evaluate import evaluate_classifier

    if cache is not None and not cache:  # materialise once: virtual datasets regenerate on every pass
        cache.extend((b[0], torch.as_tensor(b[1])) for b in loader)
    m = evaluate_classifier(unwrap(model), cache if cache is not None else loader, device)
    s = all_reduce_sums({"correct": m["correct"], "loss_sum": m["loss_sum"], "n": m["n"]}, device)
    return {"top1": s["correct"] / s["n"], "loss": s["loss_sum"] / s["n"], "n": int(s["n"])}


def _model_config(name: str, overrides: dict[str, Any]):
    """The config of a trainable backbone name (a ViT, a TimeSformer, or a CNN teacher), overrides applied."""
    from iared.models import MODEL_CONFIGS, ViTConfig, split_model_name_tag
    from iared.models.convnet import CONVNET_CONFIGS, ConvNetConfig
    from iared.models.timesformer import TIMESFORMER_CONFIGS, TimeSformerConfig

    name = split_model_name_tag(name)[0]  # a timm tag (.fb_in1k) names pretrained weights, not a geometry
    if name in MODEL_CONFIGS:
        return ViTConfig(**{**MODEL_CONFIGS[name], **overrides})
    if name in CONVNET_CONFIGS:
        return ConvNetConfig(**{**CONVNET_CONFIGS[name], **overrides})
    if name in TIMESFORMER_CONFIGS:
        return TimeSformerConfig(**{**TIMESFORMER_CONFIGS[name], **overrides})
    raise ValueError(f"unknown model {name!r} for iared train; known: "
                     f"{', '.join(sorted([*MODEL_CONFIGS, *CONVNET_CONFIGS, *TIMESFORMER_CONFIGS]))}")


def _train(cfg: BackboneTrainConfig, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    from iared.models import create_model

    use_threads(cfg.threads)
    if cfg.teacher and world > 1:
        raise ValueError("--teacher: distillation runs in one process (not under torchrun)")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} torchrun processes")
    if cfg.max_bad_steps < 0:
        raise ValueError(f"--max-bad-steps must be >= 0, got {cfg.max_bad_steps}")
    if cfg.init_image and (cfg.checkpoint or cfg.pretrained):
        raise ValueError("--init-image excludes --checkpoint and --pretrained: which initial weights should be used?")
    if cfg.prerender and cfg.workers:
        raise ValueError("--prerender keeps the samples in this process: use it with --workers 0")
    out = check_output_dir(cfg.out, "--out folder")
    if cfg.export:
        check_output_file(cfg.export, "--export file")
    ckpt = Checkpointer(out, cfg.save_every)
    log = RunLogger(out / "log.jsonl")
    state = None
    if cfg.resume and ckpt.exists():
        state = ckpt.load()
        _check_resumable(cfg, state["config"]["train"], ckpt.path)
    elif cfg.resume and is_main():
        print(f"iared train: no checkpoint in {out}; starting a new run")

    overrides = dict(cfg.model_overrides)
    model_cfg = _model_config(cfg.model, overrides)
    train_set, val_loader, test_loader = _build_data(cfg, model_cfg, rank, world)
    num_classes = getattr(train_set, "num_classes", None)
    if num_classes and num_classes != model_cfg.num_classes and "num_classes" not in overrides:
        overrides["num_classes"] = num_classes  # image folders: the head follows the folder's classes

    seed_everything(cfg.seed)
    if cfg.pretrained and cfg.checkpoint:
        raise ValueError("--pretrained and --checkpoint exclude each other: which initial weights should be used?")
    model = create_model(cfg.model, checkpoint=None if state else cfg.checkpoint,
                         pretrained=cfg.pretrained and state is None, **overrides).to(device)
    if cfg.init_image and state is None:
        from iared.loading import inflate_from_image

        fresh = inflate_from_image(model, cfg.init_image)
        if is_main():
            print(f"iared train: started from the image model {cfg.init_image}"
                  + (f" (left at initialisation: {', '.join(fresh)})" if fresh else ""))
    distiller = None
    if cfg.teacher:
        from iared.train.distill import Distiller, init_stem_from_teacher, load_teacher

        distiller = Distiller(load_teacher(cfg.teacher, device), model, cfg.kd, cfg.hint, cfg.hint_class,
                              path=cfg.teacher)
        if distiller.pairs and cfg.token_drop > 0:
            raise ValueError("--teacher with --token-drop: token hints need every token; add --hint 0 --hint-class 0")
        if state is not None:
            distiller.adapters.load_state_dict(state["distill"])
        elif not cfg.checkpoint and init_stem_from_teacher(model, distiller.teacher) and is_main():
            print(f"iared train: the conv stem starts from the first {len(model.cfg.conv_stem)} stages of {cfg.teacher}")
    groups = param_groups(model, cfg.weight_decay)
    if distiller is not None:  # the adapters learn with the student (last group, so resumed optimizers line up)
        groups.append({"params": list(distiller.adapters.parameters()), "weight_decay": cfg.weight_decay})
    if cfg.token_drop > 0 and not hasattr(model.cfg, "num_patches"):
        raise ValueError(f"--token-drop: {cfg.model} has no tokens to drop")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    step = resume_training_state(model, optimizer, state) if state is not None else 0
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    guard = StepGuard(cfg.max_bad_steps, ckpt, device=device)
    if state is not None:
        guard.bad_steps = int(state.get("bad_steps", 0))
    if is_main():
        write_run_config(out, {"model": unwrap(model).cfg.to_dict(), "train": dataclasses.asdict(cfg),
                               "world_size": world})
        log.log(event="start", step=step, world_size=world, device=str(device), resumed=state is not None)

    def state_fn():
        extra = {"distill": distiller.adapters.state_dict()} if distiller is not None else {}
        return training_state(model, optimizer, step, cfg, world_size=world, bad_steps=guard.bad_steps, **extra)

    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, cfg.steps, start_step=step,
                               rank=rank, world=world)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    stop = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    val_cache: list = []
    loss_acc, n_acc, t_window, start = torch.zeros((), device=device), 0, time.time(), time.time()
    part_acc: dict[str, float] = {}  # distillation: the loss's parts, summed since the last log line
    bar = progress(total=stop, initial=step, desc="train", disable=not cfg.progress)
    params = dict(model.named_parameters())
    for batch in loader:
        if step >= stop:
            break
        images, labels = batch[0].to(device, non_blocking=True), torch.as_tensor(batch[1]).to(device)
        lr = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
        set_lr(optimizer, lr)
        model.train()
        keep = random_patch_keep(len(images), unwrap(model).cfg.num_patches, cfg.token_drop, device) \
            if cfg.token_drop > 0 else None
        parts: dict[str, float] = {}
        if distiller is not None:
            loss, parts = distiller.loss(model, images, labels, cfg.label_smoothing, keep)
        else:
            loss = classification_loss(model(images, keep=keep), labels, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        good = guard.check(step + 1, loss, params, optimizer)
        if good:
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
        step += 1
        if good:
            loss_acc += loss.detach()
            n_acc += 1
            for k, v in parts.items():  # averaged over the same good steps as the loss
                part_acc[k] = part_acc.get(k, 0.0) + v
        else:
            log.log(event="bad_step", step=step, loss=float(loss.detach()), bad_steps=guard.bad_steps)
        bar.update(1)
        if (step % cfg.log_every == 0 or step == stop) and n_acc:
            mean_loss = all_reduce_sums({"loss": float(loss_acc) / n_acc}, device)["loss"] / world
            rate = n_acc * cfg.batch_size / max(time.time() - t_window, 1e-9)
            mean_parts = {k: round(v / n_acc, 5) for k, v in part_acc.items()}
            log.log(event="train", step=step, loss=mean_loss, lr=lr, images_per_s=round(rate, 1), **mean_parts)
            part_acc.clear()
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            loss_acc.zero_()
            n_acc, t_window = 0, time.time()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            val = _evaluate(model, val_loader, device, val_cache)
            log.log(event="eval", split="val", step=step, **val)
            if is_main():
                bar.write(f"step {step}: val top-1 {100 * val['top1']:.2f}%  loss {val['loss']:.4f}")
        if step < stop:
            ckpt.maybe_save(step, state_fn)
    bar.close()

    result: dict[str, Any] = {"step": step, "checkpoint": str(ckpt.path), "seconds": round(time.time() - start, 1)}
    if step < cfg.steps:  # stopped early (--stop-at): save and leave the rest for --resume
        ckpt.save(state_fn)
        log.log(event="stopped", step=step)
        return result
    result["val"] = _evaluate(model, val_loader, device, val_cache)
    result["test"] = _evaluate(model, test_loader, device)
    log.log(event="eval", split="val", step=step, **result["val"])
    log.log(event="eval", split="test", step=step, **result["test"])
    ckpt.save(lambda: {**state_fn(), "metrics": {"val": result["val"], "test": result["test"]}})
    if cfg.export and is_main():
        result["export"] = str(export_weights(unwrap(model), cfg.export, cfg))
    log.log(event="done", step=step, seconds=result["seconds"])
    return result


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The training loss (a function of its own so a test can make it return NaN at step k)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def random_patch_keep(batch: int, num_patches: int, max_drop: float, device) -> torch.Tensor:
    """``(batch, num_patches)`` bool: image i keeps a random subset of ``round(r_i * N)`` patches
    (at least one), ``r_i ~ U(1 - max_drop, 1)``. Drawn from the global RNG (saved on resume)."""
    if not 0 <= max_drop < 1:
        raise ValueError(f"token_drop must be in [0, 1), got {max_drop}")
    ratio = 1 - max_drop * torch.rand(batch, 1)
    count = (ratio * num_patches).round().clamp(min=1)
    rank = torch.rand(batch, num_patches).argsort(dim=1).argsort(dim=1)
    return (rank < count).to(device)


def _check_resumable(cfg: BackboneTrainConfig, saved: dict, path: Path) -> None:
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in dataclasses.asdict(cfg).items()
             if k not in OPERATIONAL and saved.get(k) != v]
    if diffs:
        raise ValueError(f"cannot resume {path} with a different configuration ({'; '.join(diffs)})")


def export_weights(model: nn.Module, path: str | Path, cfg: BackboneTrainConfig | None = None) -> Path:
    """The weights alone, float16: safetensors for ``.safetensors`` paths, else a torch file
    ``{"model": sd, "config": {"model": ...}}`` that :func:`iared.models.load_model` reads."""
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in unwrap(model).state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_atomic(sd, path)
    config = {"model": unwrap(model).cfg.to_dict()}
    if cfg is not None:
        config["train"] = dataclasses.asdict(cfg)
    return save_atomic({"format": "iared-weights/1", "model": sd, "config": config}, path)


def resolve_config(given: dict[str, Any]) -> BackboneTrainConfig:
    """The run's config: dataclass defaults, or the saved run's config when resuming (less
    ``stop_at``), updated with the options ``given`` (field name -> value)."""
    names = {f.name for f in dataclasses.fields(BackboneTrainConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown training options {unknown}")
    base = BackboneTrainConfig()
    if given.get("resume"):
        path = Path(given.get("out", base.out)) / "checkpoint.pt"
        if path.is_file():
            saved = load_training_state(path)["config"]["train"]
            # --stop-at describes one invocation (a simulated preemption), not the run: inheriting
            # it would make every resumption stop again at once at the same step.
            base = BackboneTrainConfig(**{k: v for k, v in saved.items() if k in names - {"stop_at"}})
    return dataclasses.replace(base, **given)
