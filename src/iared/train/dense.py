"""``iared train-dense``: train a DPT head (:mod:`iared.heads.dpt`) on an IA-RED² model's tokens.

The starting point is a pruned checkpoint (default: the task's shipped one, ``TASK_PRUNED``: backbone +
interpreters), a backbone file (fresh interpreters) or a dense checkpoint (its head too). The
backbone is frozen (default) or fine-tuned (``--finetune-backbone``, its learning rate scaled by
``--backbone-lr-scale``); the head phase never changes the interpreters.

``--interpreter-steps N`` adds a second phase: with backbone and head frozen, the interpreters are
trained again, stage after stage (:class:`iared.train.interpreters.InterpreterTrainer`'s curriculum,
REINFORCE with the self-critical baseline), rewarded by :func:`iared.rl.segmentation_reward`: the
accuracy term is each image's mIoU against its mask, not classification correctness, because
what pruning costs a dense model is pixels, and a digit classified right can still lose the
strokes of the tokens that left. ``--reset-interpreters`` starts them from scratch instead of
from the checkpoint's (classification) interpreters.

Per-pixel cross-entropy on the task's masks (:class:`iared.dense.SegmentationTask`). Each step runs
the unpruned model (mode ``all``), or with probability ``--pruned-fraction`` (a pure function of
``(seed, step)``) the pruned one in threshold mode, so the head also learns from restored tokens.

Same machinery as ``iared train`` (:mod:`iared.train.common`): the data of a step is a pure
function of ``(seed, step)``, warmup + cosine, :class:`StepGuard`, atomic ``checkpoint.pt`` holding
model, optimizer and RNG states, ``log.jsonl``; ``--resume`` continues bit for bit.
``DIR/dense.pt`` (:func:`iared.dense.save_dense`) is what ``iared eval-dense`` reads.

The README's figures (digits-clutter test mIoU 85.93 unpruned, 86.65 pruned) come from::

    iared train-dense --task digits-clutter --steps 1000 --batch-size 32 --lr 2e-3 --warmup 30 --pruned-fraction 0.5 \
        --neck-hidden-sizes 24 32 48 64 --pixel-refinement 8 --threads 1 --out runs/dense_b
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iared.dense import image_miou
from iared.files import check_output_dir
from iared.pruning import IARed, IARedConfig
from iared.rl import segmentation_reward
from iared.timing import use_threads
from iared.train.common import (
    CHECKPOINT_FORMAT,
    Checkpointer,
    RunLogger,
    StepBatchSampler,
    StepGuard,
    capture_rng,
    load_training_state,
    progress,
    resume_training_state,
    seed_everything,
    set_lr,
    warmup_cosine,
    write_run_config,
)
from iared.train.interpreters import InterpreterTrainConfig, InterpreterTrainer, stack_batch

__all__ = ["HELP", "DenseTrainConfig", "build_dense_model", "train_dense"]


@dataclass
class DenseTrainConfig:
    """Every option of ``iared train-dense``; the CLI maps onto it one to one."""

    checkpoint: str | None = None  # pruned checkpoint or backbone weights; None: the task's shipped pruned model
    model: str | None = None
    pretrained: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    task: str = "digits-clutter"
    depths: tuple[int, ...] | None = None  # blocks the head reads; None: iared.heads.dpt.default_depths
    neck_hidden_sizes: tuple[int, ...] = (32, 48, 64, 96)
    fusion_hidden_size: int = 32
    reassemble_factors: tuple[float, ...] = (2, 1, 0.5, 0.25)
    readout: str = "project"
    upsample: int = 2
    pixel_refinement: int = 0  # not DPT: channels of the refinement that sees the input pixels (0: off)
    finetune_backbone: bool = False
    backbone_lr_scale: float = 0.1
    pruned_fraction: float = 0.0
    threshold: float | None = None  # threshold mode's rule for pruned steps; None: the checkpoint's
    interpreter_steps: int = 0  # per stage, second phase (segmentation reward); 0: keep the interpreters
    reset_interpreters: bool = False
    tau: float = 5.0  # segmentation_reward: 1 - w f^2 - tau (1 - image mIoU)
    interpreter_lr: float = 3e-3
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup: int = 30
    clip_grad: float | None = 1.0
    train_size: int | None = None
    val_size: int = 500
    seed: int = 0
    out: str = "runs/dense"
    save_every: int = 100
    log_every: int = 10
    device: str = "cpu"
    threads: int | None = None
    resume: bool = False
    stop_at: int | None = None
    progress: bool = True
    max_bad_steps: int = 0


OPERATIONAL = {"out", "save_every", "log_every", "device", "threads", "resume", "stop_at", "progress",
               "max_bad_steps", "val_size"}

HELP = {
    "checkpoint": "IA-RED² checkpoint (backbone + interpreters) or backbone weights (fresh interpreters); "
                  "default: the task's shipped pruned model (digits_natural_pruned.pt, digits_pruned.pt)",
    "model": "backbone name, with --checkpoint (how to build it) or --pretrained",
    "pretrained": "with --model: timm's download, or the shipped digits_vit",
    "model_overrides": "change a ViTConfig field of --model, e.g. depth=4 (repeatable)",
    "task": "task with masks (digits-clutter)",
    "depths": "backbone blocks the head reads (4); default: evenly spaced, ending with the last",
    "neck_hidden_sizes": "channels of the 4 reassembled maps",
    "fusion_hidden_size": "channels of the fusion blocks and the head",
    "reassemble_factors": "resampling of each reassembled map (DPT: 4 2 1 0.5)",
    "readout": "class token readout: project | add | ignore",
    "upsample": "final bilinear upsampling of the logits",
    "pixel_refinement": "not part of DPT: channels of two 3x3 convs that refine the logits at the input size "
                        "from [logits, pixels] (0: off)",
    "finetune_backbone": "train the backbone too (default: frozen)",
    "backbone_lr_scale": "backbone learning rate / head learning rate when fine-tuning",
    "pruned_fraction": "fraction of steps run through the pruned model (threshold mode)",
    "threshold": "interpreter threshold of pruned steps (default: the checkpoint's)",
    "interpreter_steps": "then train the interpreters N steps per stage with the segmentation reward (0: off)",
    "reset_interpreters": "that phase starts from fresh interpreters (default: the checkpoint's)",
    "tau": "segmentation reward: 1 - f^2 - tau * (1 - image mIoU)",
    "interpreter_lr": "learning rate of the interpreter phase (Adam)",
    "steps": "head optimizer steps (0: keep a dense checkpoint's head)", "batch_size": "images per step", "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine", "weight_decay": "AdamW weight decay",
    "warmup": "linear warmup steps", "clip_grad": "gradient norm clip (None: off)",
    "train_size": "number of distinct training samples (default: the task's)",
    "val_size": "validation images evaluated at the end", "seed": "seed of the head and of the data order",
    "out": "output folder DIR", "save_every": "write DIR/checkpoint.pt every N steps",
    "log_every": "log the loss every N steps", "device": "cpu | cuda", "threads": "torch threads",
    "resume": "continue the run in DIR", "stop_at": "stop after this step, as if preempted",
    "progress": "show a progress bar",
    "max_bad_steps": "skip up to N steps whose loss or gradient is NaN / inf",
}


def _dpt_config(cfg: DenseTrainConfig, num_classes: int, in_chans: int):
    from iared.heads.dpt import DPTConfig

    return DPTConfig(num_classes=num_classes, depths=cfg.depths, neck_hidden_sizes=cfg.neck_hidden_sizes,
                     fusion_hidden_size=cfg.fusion_hidden_size, reassemble_factors=cfg.reassemble_factors,
                     readout=cfg.readout, upsample=cfg.upsample, pixel_refinement=cfg.pixel_refinement,
                     in_chans=in_chans)


def build_dense_model(cfg: DenseTrainConfig, num_classes: int):
    """A dense checkpoint whole, or the IA-RED² model the config names (:func:`iared.loading.load_iared`)
    with a fresh DPT head."""
    from importlib import resources

    from iared.checkpoint import read_checkpoint
    from iared.dense import DENSE_FORMAT, DenseModel, load_dense
    from iared.loading import load_iared

    if cfg.checkpoint is not None and cfg.model is None and read_checkpoint(cfg.checkpoint).get("format") == DENSE_FORMAT:
        model = load_dense(cfg.checkpoint)
        if model.dpt_cfg.num_classes != num_classes:
            raise ValueError(f"{cfg.checkpoint}: its head predicts {model.dpt_cfg.num_classes} classes, "
                             f"--task {cfg.task} has {num_classes}")
        return model
    from iared.models import TASK_PRUNED

    default = str(resources.files("iared") / "assets" / TASK_PRUNED.get(cfg.task, TASK_PRUNED["digits-clutter"]))
    reduced = load_iared(cfg.checkpoint, cfg.model, cfg.pretrained, cfg.model_overrides, default=default)
    return DenseModel(reduced, _dpt_config(cfg, num_classes, reduced.backbone.cfg.in_chans))


def _is_pruned_step(cfg: DenseTrainConfig, step: int) -> bool:
    return cfg.pruned_fraction > 0 and random.Random(cfg.seed * 1_000_003 + step).random() < cfg.pruned_fraction


def _check_resumable(cfg: DenseTrainConfig, saved: dict, path) -> None:
    mine = {k: v for k, v in _train_dict(cfg).items() if k not in OPERATIONAL}
    theirs = {k: v for k, v in saved.items() if k not in OPERATIONAL}
    diff = sorted(k for k in mine if mine[k] != theirs.get(k))
    if diff:
        raise ValueError(f"--resume: {path} was written with other settings ({', '.join(diff)}); "
                         "use the same options or a new --out")


def _train_dict(cfg: DenseTrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("depths", "neck_hidden_sizes", "reassemble_factors"):
        d[k] = None if d[k] is None else list(d[k])
    return d


def _model_config(model) -> dict:
    """The model config a training state records: everything :func:`iared.dense.load_dense` needs."""
    return {"model": model.backbone.cfg.to_dict(), "iared": model.config_dict(), "dpt": model.dpt_cfg.to_dict()}


def train_dense(cfg: DenseTrainConfig) -> dict[str, Any]:
    """Run (or resume) a head training run; returns ``{"step", "checkpoint", "seconds"}`` and, when the run
    reached ``cfg.steps``, ``"val"`` scores of the unpruned and pruned model and ``"dense"`` (the file)."""
    from iared.dense import SegmentationTask, save_dense
    from iared.loading import task_dataset

    use_threads(cfg.threads)
    if not 0 <= cfg.pruned_fraction <= 1:
        raise ValueError(f"--pruned-fraction must lie in [0, 1], got {cfg.pruned_fraction}")
    out = check_output_dir(cfg.out, "--out folder")
    device = torch.device(cfg.device)
    ckpt = Checkpointer(out, cfg.save_every)
    log = RunLogger(out / "log.jsonl")
    state = None
    if cfg.resume and ckpt.exists():
        state = load_training_state(ckpt.path)
        _check_resumable(cfg, state["config"]["train"], ckpt.path)

    kw = {"length": cfg.train_size} if cfg.train_size else {}
    seed_everything(cfg.seed)
    probe = task_dataset(cfg.task, "val", None, length=1)
    if not hasattr(probe, "num_classes") or len(probe[0]) < 3:
        raise ValueError(f"--task {cfg.task}: a dense task needs items (image, label, mask)")
    model = build_dense_model(cfg, 1 + probe.num_classes)
    model.eval()
    train_set = SegmentationTask(task_dataset(cfg.task, "train", model.backbone.cfg, seed=cfg.seed, **kw))
    val_set = SegmentationTask(task_dataset(cfg.task, "val", model.backbone.cfg, length=cfg.val_size))
    model.to(device)
    model.backbone.requires_grad_(cfg.finetune_backbone)
    model.interpreters.requires_grad_(False)
    groups = [{"params": list(model.dpt.parameters()), "weight_decay": cfg.weight_decay}]
    if cfg.finetune_backbone:
        groups.append({"params": list(model.backbone.parameters()), "weight_decay": 0.0,
                       "lr_scale": cfg.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    step = resume_training_state(model, optimizer, state) if state is not None else 0
    threshold = cfg.threshold if cfg.threshold is not None else model.reduced.inference.threshold
    guard = StepGuard(cfg.max_bad_steps, ckpt, device=device)
    if state is not None:
        guard.bad_steps = int(state.get("bad_steps", 0))
    write_run_config(out, {**_model_config(model), "train": _train_dict(cfg)})
    log.log(event="start", step=step, resumed=state is not None)

    def state_fn():  # the layout of iared.train.common.training_state, with the dense model's config
        return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "rng": capture_rng(), "bad_steps": guard.bad_steps,
                "config": {"model": _model_config(model), "train": _train_dict(cfg),
                           "inference": {"threshold": threshold}}}

    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, cfg.steps, start_step=step)
    stop = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trained = list(params.values())
    bar = progress(total=stop, initial=step, desc="train-dense", disable=not cfg.progress)
    start, loss_sum, n_sum = time.time(), 0.0, 0
    # batches straight from the sampler: a DataLoader iterator would draw from the global RNG when
    # created, so a resumed run's dropout would no longer follow the uninterrupted one's
    for indices in sampler:
        if step >= stop:
            break
        images, targets = (t.to(device) for t in stack_batch(train_set, torch.as_tensor(indices)))
        lr = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
        set_lr(optimizer, lr)
        model.dpt.train()
        pruned = _is_pruned_step(cfg, step)
        with torch.set_grad_enabled(True):
            result = model(images, "threshold" if pruned else "all", threshold=threshold, layout="padded")
            loss = F.cross_entropy(result.logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        good = guard.check(step + 1, loss, params, optimizer)
        if good:
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
            optimizer.step()
            loss_sum, n_sum = loss_sum + float(loss.detach()), n_sum + 1
        step += 1
        bar.update(1)
        if (step % cfg.log_every == 0 or step == stop) and n_sum:
            log.log(event="train", step=step, loss=loss_sum / n_sum, lr=lr)
            bar.set_postfix(loss=f"{loss_sum / n_sum:.4f}")
            loss_sum, n_sum = 0.0, 0
        if step < stop:
            ckpt.maybe_save(step, state_fn)
    bar.close()
    model.eval()
    result: dict[str, Any] = {"step": step, "checkpoint": str(ckpt.path), "seconds": round(time.time() - start, 1)}
    if step < cfg.steps:
        ckpt.save(state_fn)
        log.log(event="stopped", step=step)
        return result
    ckpt.save(state_fn)
    if cfg.interpreter_steps > 0:
        result["interpreters"] = _train_interpreters(model, train_set, cfg, threshold, device)
    from iared.evaluate_dense import segmentation_scores

    result["val"] = segmentation_scores(model, val_set, threshold=threshold, device=device)
    log.log(event="eval", split="val", step=step, **result["val"])
    result["dense"] = str(save_dense(model, out / "dense.pt", extra={"train": _train_dict(cfg)}, threshold=threshold))
    log.log(event="done", step=step, seconds=result["seconds"])
    return result


class DenseInterpreterTrainer(InterpreterTrainer):
    """The interpreter curriculum on a :class:`iared.dense.DenseModel`, rewarded per image by its mIoU
    (:func:`iared.rl.segmentation_reward`); compute fractions count the head (it runs in full)."""

    def __init__(self, model, dataset, cfg, **kw):
        super().__init__(model, dataset, cfg, **kw)
        self.full_macs = model.full_macs()

    def reward(self, logits, macs, targets, stage):
        quality = image_miou(logits.argmax(1), targets, logits.shape[1])
        return segmentation_reward(quality, macs / self.full_macs, self.cfg.tau, self.cfg.stage_weights[stage])

    def accuracy(self, logits, targets):
        return float(image_miou(logits.argmax(1), targets, logits.shape[1]).mean())


def _train_interpreters(model, train_set, cfg: DenseTrainConfig, threshold, device) -> list[dict]:
    """Second phase (module docstring); resumes from ``DIR/train_state.pt`` when ``cfg.resume``."""
    icfg = InterpreterTrainConfig(task=cfg.task, out=cfg.out, steps_per_stage=cfg.interpreter_steps,
                                  batch_size=cfg.batch_size, lr=cfg.interpreter_lr, tau=cfg.tau,
                                  threshold=threshold if isinstance(threshold, float) else 0.5,
                                  num_stages=model.num_stages, seed=cfg.seed, device=str(device),
                                  save_every=cfg.save_every, eval_every=cfg.log_every,
                                  max_bad_steps=cfg.max_bad_steps)
    icfg.stage_weights = tuple([icfg.stage_weights[0]] * model.num_stages)
    # trained interpreters are retrained as they are; fresh ones start from "keep ~all"
    icfg.initial_score = 0.9 if cfg.reset_interpreters else None
    if cfg.reset_interpreters:
        torch.manual_seed(cfg.seed)
        model.reduced.reducers = IARed(model.backbone, IARedConfig(**model.config_dict())).reducers.to(device)
    model.dpt.requires_grad_(False)
    model.backbone.requires_grad_(False)
    model.interpreters.requires_grad_(True)
    trainer = DenseInterpreterTrainer(model, train_set, icfg, progress=cfg.progress)
    if cfg.resume and trainer.state_path().is_file():
        trainer.load_state(trainer.state_path())
    history = trainer.run()
    model.interpreters.requires_grad_(False)
    return history
