"""Fine-tune a backbone under any token reducer, distilling from the unpruned backbone.

One loop for every method that the comparison fine-tunes (IA-RED² under its learned policy, EViT,
ToMe, ATS, DynamicViT under their knobs): the reducers are frozen and run as at inference (the
stage settings of their knob, tokens really removed), only the backbone learns, and the loss is

    loss = (1 - w) * CE(logits, label) + w * KL(unpruned teacher || pruned student)

with the teacher a frozen copy of the backbone taken before the first step. The batch of step s is
a pure function of (seed, s) (:func:`iared.train.interpreters.batch_indices`), each process of a
``torchrun`` job takes its share and gradients are averaged, as in the interpreter trainer.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from iared.stages import ReducedModel
from iared.train.common import StepGuard, autocast, average_gradients, is_main, rank_share


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-5
    distill_weight: float = 0.5  # w above
    seed: int = 0
    device: str = "cpu"
    max_bad_steps: int = 0


def finetune_reduced(model: ReducedModel, dataset, settings: dict, cfg: FinetuneConfig, progress: bool = True,
                     guard: StepGuard | None = None, desc: str = "fine-tune") -> ReducedModel:
    """Train ``model.backbone`` in place for ``cfg.steps`` AdamW steps with ``model``'s reducers frozen
    and run with ``settings`` (the stage-loop keyword arguments of the knob, e.g. ``{"mode":
    "threshold", "threshold": 0.5}``). Returns ``model`` in eval mode with nothing requiring grad.

    The model stays in eval mode throughout: the reducers act exactly as they will at inference (no
    Gumbel noise, no sampling), and the backbones here have no dropout or batch norm to switch.
    Ragged batches are padded (``layout="padded"``): every layout gives the same gradients, padded
    ones on every device.
    """
    from iared.train.interpreters import batch_indices, stack_batch

    if cfg.steps <= 0:
        return model.eval()
    device = torch.device(cfg.device)
    model.to(device).eval()
    teacher = copy.deepcopy(model.backbone).eval().requires_grad_(False)
    model.requires_grad_(False)
    model.backbone.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.backbone.parameters(), lr=cfg.lr, weight_decay=0.0)
    guard = guard or StepGuard(cfg.max_bad_steps, device=device)
    guard.what = f"{desc} step"
    params = {f"backbone.{n}": p for n, p in model.backbone.named_parameters()}
    w = cfg.distill_weight
    for step in tqdm(range(cfg.steps), desc=desc, disable=not (progress and is_main()), file=sys.stderr,
                     dynamic_ncols=True):
        # stage -1: fine-tuning's batches never coincide with the interpreter curriculum's
        idx = rank_share(batch_indices(len(dataset), cfg.batch_size, cfg.seed, -1, step))
        images, labels = (t.to(device) for t in stack_batch(dataset, idx))
        with torch.no_grad(), autocast(device):
            soft = teacher(images).float().softmax(-1)
        with autocast(device):
            logits = model(images, **{"layout": "padded", **settings}).logits.float()
        loss = (1 - w) * F.cross_entropy(logits, labels) + w * F.kl_div(logits.log_softmax(-1), soft,
                                                                        reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model.backbone.parameters())
        if guard.check(step + 1, loss, params, optimizer):
            optimizer.step()
    model.requires_grad_(False)
    return model.eval()
