"""Train DynamicViT's predictors (Rao et al., NeurIPS 2021) end to end, as the paper does.

Every step runs the stage loop in ``sample`` mode: each predictor draws a hard Gumbel-softmax keep
/ drop per token (straight-through gradient) and gates it through masked attention, so nothing
leaves the batch and the gradients of all the losses reach every predictor
(:mod:`iared.reducers.dynamicvit`). The loss, with the paper's DeiT weights as defaults::

    loss = CE(logits, label)                                         classification
         + ratio_weight / S * sum_s mean_b (kept_s,b - keep_ratio^(s+1))^2     keep ratio
         + distill_weight * KL(teacher logits || logits)                        logit distillation
         + token_distill_weight * MSE(final features of the tokens alive at the end,
                                      the teacher's features of the same tokens)

``kept_s,b``: fraction of image b's patch tokens whose cumulative gate is 1 after predictor s (a
token dropped earlier stays dropped), so the targets are cumulative: ``r, r^2, r^3``. The
teacher is a frozen copy of the unpruned backbone taken before training; features are the
backbone's final LayerNorm of the last block's tokens (the paper's ``mse_token`` variant used
for DeiT). The backbone is frozen by default (``backbone_lr=0``) or fine-tuned with its own
learning rate (the paper fine-tunes it, 30 epochs on ImageNet).

The data of step s is a pure function of (seed, s) (:class:`iared.train.common.StepBatchSampler`:
one permutation per epoch), the Gumbel noise comes from the global generator seeded with ``seed``:
two runs with the same arguments on the same machine give the same predictors.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from iared.reducers.dynamicvit import build_dynamicvit, dynamicvit_predictors
from iared.stages import ReducedModel
from iared.train.common import StepBatchSampler
from iared.train.interpreters import stack_batch


@dataclass
class DynamicViTTrainConfig:
    """Every option of :func:`train_dynamicvit` (defaults: the paper's DeiT recipe where it has one)."""

    keep_ratio: float = 0.7  # per predictor; the paper's DeiT-S / 0.7 keeps 0.7, 0.49, 0.343
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3  # predictors (AdamW)
    backbone_lr: float = 0.0  # 0: backbone frozen; > 0: fine-tuned with this learning rate
    weight_decay: float = 0.0
    ratio_weight: float = 2.0
    distill_weight: float = 0.5  # KL between the logits of the teacher and of the pruned model
    token_distill_weight: float = 0.5  # MSE of the surviving tokens' final features; 0 turns it off
    tau: float = 1.0  # Gumbel-softmax temperature
    locations: tuple[int, ...] | None = None  # blocks before which predictors sit; None: depth/4, /2, 3/4
    seed: int = 0
    device: str = "cpu"


def train_dynamicvit(backbone, dataset, *, keep_ratio: float, steps: int, batch_size: int, lr: float,
                     seed: int = 0, device: str = "cpu", progress: bool = True, history: list | None = None,
                     **options) -> ReducedModel:
    """Train fresh DynamicViT predictors on ``backbone`` (a :class:`iared.models.VisionTransformer`)
    over ``dataset`` (map-style, items ``(image, label, ...)``); returns the model in eval mode.

    ``options``: the other fields of :class:`DynamicViTTrainConfig` (``backbone_lr``,
    ``ratio_weight``, ``distill_weight``, ``token_distill_weight``, ``tau``, ``locations``, ...).
    ``history``: a list that receives one dict of statistics per step (loss terms, kept fractions).
    The backbone is trained in place when ``backbone_lr > 0``; the teacher is a copy taken first.
    """
    cfg = DynamicViTTrainConfig(keep_ratio=keep_ratio, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                device=device, **options)
    if cfg.token_distill_weight > 0 and not hasattr(backbone, "norm"):
        raise ValueError(f"token distillation needs the backbone's final norm; {type(backbone).__name__} "
                         "has no `norm` (pass token_distill_weight=0)")
    if len(dataset) < 1:
        raise ValueError("train_dynamicvit: the dataset is empty")
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    backbone.to(dev)
    teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
    model = build_dynamicvit(backbone, cfg.keep_ratio, cfg.locations, cfg.tau).to(dev)
    stages = [g for g, _ in dynamicvit_predictors(model)]
    targets = [cfg.keep_ratio ** (i + 1) for i in range(len(stages))]

    groups = [{"params": list(model.reducers.parameters()), "lr": cfg.lr}]
    backbone.requires_grad_(cfg.backbone_lr > 0)
    if cfg.backbone_lr > 0:
        groups.append({"params": list(backbone.parameters()), "lr": cfg.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, cfg.steps)
    unpruned = ReducedModel(teacher, [None], [0])
    model.train()
    # The backbone's normalisation statistics stay as trained (a hybrid stem's BatchNorm would
    # otherwise drift towards the pruned batches, in the backbone every other method shares too).
    backbone.eval()
    bar = tqdm(range(cfg.steps), desc="dynamicvit", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        batch = stack_batch(dataset, torch.as_tensor(sampler.global_batch(step)))
        images, labels = (t.to(dev) for t in batch)
        out, last = _forward_keeping_last(model, images, "sample")
        gates = [out.scores[g][:, out.num_prefix:] for g in stages]  # (B, N) cumulative gates, original order
        with torch.no_grad():
            t_out, t_last = _forward_keeping_last(unpruned, images, "all")
        terms = _losses(cfg, out.logits, labels, gates, targets, t_out.logits)
        if cfg.token_distill_weight > 0:
            terms["token"] = _token_distillation(last, t_last, gates[-1], backbone.norm, teacher.norm)
            terms["loss"] = terms["loss"] + cfg.token_distill_weight * terms["token"]
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        stats = {"step": step + 1, **{k: float(v.detach()) for k, v in terms.items()},
                 "accuracy": float((out.logits.argmax(-1) == labels).float().mean()),
                 "kept": [round(float(g.detach().mean()), 4) for g in gates]}
        if history is not None:
            history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", kept="/".join(f"{k:.2f}" for k in stats["kept"]))
    bar.close()
    backbone.requires_grad_(False)
    return model.eval()


def _forward_keeping_last(model: ReducedModel, images: Tensor, mode: str):
    """The stage loop's output and the last block's output tokens (what token distillation reads)."""
    kept: list = []
    hook = model.backbone.blocks[-1].register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        out = model(images, mode, layout="padded")
    finally:
        hook.remove()
    return out, kept[-1]


def ratio_loss(gates: list[Tensor], targets: list[float]) -> Tensor:
    """Mean over predictors of the batch-mean squared gap between each image's kept fraction
    (``gates[s]``: ``(B, N)`` cumulative gates of the patch tokens) and the target ``targets[s]``."""
    return torch.stack([((g.mean(1) - t) ** 2).mean() for g, t in zip(gates, targets)]).mean()


def _losses(cfg: DynamicViTTrainConfig, logits: Tensor, labels: Tensor, gates: list[Tensor],
            targets: list[float], teacher_logits: Tensor) -> dict[str, Tensor]:
    """Classification, keep-ratio and logit-distillation terms and their weighted sum ``loss``."""
    ce = F.cross_entropy(logits, labels)
    ratio = ratio_loss(gates, targets)
    kl = F.kl_div(logits.log_softmax(-1), teacher_logits.log_softmax(-1), reduction="batchmean",
                  log_target=True)
    loss = ce + cfg.ratio_weight * ratio + cfg.distill_weight * kl
    return {"loss": loss, "ce": ce, "ratio": ratio, "kl": kl}


def _token_distillation(student, teacher, gate: Tensor, student_norm, teacher_norm) -> Tensor:
    """MSE between the final normalised features of the patch tokens alive at the end (gate 1) and
    the teacher's features of the same tokens. Training gates tokens instead of removing them, so
    both batches are dense and in the original token order."""
    if student.uniform_length() is None or student.data.shape[1] != teacher.data.shape[1]:
        raise ValueError("token distillation needs a dense student batch: every stage must gate, not drop")
    P = student.num_prefix
    alive = gate.detach() > 0.5
    if not bool(alive.any()):
        return student.data.sum() * 0.0
    diff = student_norm(student.data[:, P:]) - teacher_norm(teacher.data[:, P:])
    return (diff ** 2)[alive].mean()
