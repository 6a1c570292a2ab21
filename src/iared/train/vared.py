"""Training VA-RED²'s policies and rebuild maps on a frozen TimeSformer (:mod:`iared.reducers.vared`).

Loss = cross-entropy + ``lam * (mean expected MACs / (target * full MACs) - 1) ** 2``, the expected
MACs from the Gumbel-softmax gates (temperature annealed from ``tau_start`` to ``tau_end``). The
backbone is frozen; the policies, temporal rebuild maps and channel rebuild biases train.

Shared machinery: :class:`iared.train.common.Checkpointer` (atomic, resumable:
:func:`~iared.train.common.training_state` / :func:`~iared.train.common.resume_training_state`, RNG
included), :func:`~iared.train.common.rank_share` and :func:`~iared.train.common.average_gradients`
for DDP (the interpreter loops' pattern: a subset of parameters trains, no DDP wrapper). A small loop
of its own rather than :mod:`iared.train.interpreters`': that one trains token reducers through the
stage loop's modes (sample / threshold), which a per-clip choice of frames and widths has not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from iared.train.common import (Checkpointer, average_gradients, rank_share, resume_training_state,
                                training_state)


@dataclass
class VaRedTrainConfig:
    steps: int = 200
    batch: int = 8
    lr: float = 1e-2
    target: float = 0.5  # mean MACs / the backbone's
    lam: float = 2.0
    tau_start: float = 5.0
    tau_end: float = 0.5
    seed: int = 0
    checkpoint_every: int = 50


def train_vared(model, clips: Tensor, labels: Tensor, cfg: VaRedTrainConfig, out: str | Path | None = None,
                log=None) -> list[dict]:
    """Train ``model`` (a :class:`iared.reducers.vared.VaRedTimeSformer`) on ``clips`` ``(N, T, C, H, W)``
    / ``labels`` ``(N,)``; resumes from ``out/checkpoint.pt`` when present. Returns one record per step
    run (``[]`` when the checkpoint was already finished)."""
    model.freeze_backbone().train()
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step = 0
    ckpt = Checkpointer(out, cfg.checkpoint_every) if out is not None else None
    if ckpt is not None and ckpt.exists():
        step = resume_training_state(model, opt, ckpt.load())
    full = model.full_macs()
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(step):  # the same data order whether resumed or not
        torch.randint(len(clips), (cfg.batch,), generator=gen)
    history = []
    while step < cfg.steps:
        idx = rank_share(torch.randint(len(clips), (cfg.batch,), generator=gen))
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
        output = model(clips[idx], tau=tau)
        task = F.cross_entropy(output.logits, labels[idx])
        ratio = output.macs.mean() / full
        loss = task + cfg.lam * (ratio / cfg.target - 1) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        opt.step()
        step += 1
        record = {"step": step, "loss": float(loss.detach()), "task": float(task.detach()),
                  "macs_ratio": float(ratio.detach()), "tau": tau}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"step {step}: non-finite loss {record}")
        history.append(record)
        if log is not None:
            log(record)
        if ckpt is not None and not ckpt.maybe_save(step, lambda: training_state(model, opt, step, cfg)) \
                and step == cfg.steps:
            ckpt.save(lambda: training_state(model, opt, step, cfg), step)
    model.eval()
    return history
