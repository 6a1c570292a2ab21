"""Reward and policy-gradient loss for training interpreters (the part IA-RED² did not publish).

Our choice, documented in the README ("Reward"):

* BlockDrop-style reward per image (Wu et al., CVPR 2018): ``1 - w_d * f**2`` when the pruned
  model's prediction is correct, ``-tau`` when it is wrong, where ``f`` is the image's compute
  fraction (pruned MACs / unpruned MACs, interpreters included) and ``w_d`` a per-stage weight.
  Squaring ``f`` makes the last tokens the cheapest to keep: the policy is pushed hard away from
  "keep everything" and gently near the point where accuracy starts to break.
* Dense models (``iared train-dense``): the accuracy term is the image's segmentation quality
  (:func:`segmentation_reward`).
* REINFORCE with a baseline ``b``: loss = -mean((R - b) * log pi(keep decisions)). Two
  baselines, both measured (README): *self-critical* (b = reward of the same image under the
  greedy threshold policy, one extra forward without gradient) and a *running mean* of R.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Baseline = Literal["self-critical", "mean"]
RewardKind = Literal["correct", "probability"]  # blockdrop_reward / probability_reward


def blockdrop_reward(correct: Tensor, compute_fraction: Tensor, tau: float, weight: float = 1.0) -> Tensor:
    """``(B,)`` rewards: ``1 - weight * f^2`` if correct else ``-tau``."""
    return torch.where(correct, 1.0 - weight * compute_fraction.float() ** 2, torch.full_like(compute_fraction.float(), -tau))


def probability_reward(true_prob: Tensor, compute_fraction: Tensor, tau: float, weight: float = 1.0) -> Tensor:
    """``(B,)`` rewards ``(1 + tau) * p - tau - weight * f^2``, ``p`` the pruned model's probability of
    the true class: :func:`blockdrop_reward` with correctness made continuous (p = 1: the reward of a
    correct prediction; p = 0: -tau, minus the compute term).

    Why: at 96 % accuracy a drop that costs an image its correct answer is rare, so the 0/1 reward
    sees almost no price for tokens that only carry confidence; the class probability falls before the
    answer flips, and the policy pays for that margin in every image (``--reward probability``).
    """
    return (1.0 + tau) * true_prob.float() - tau - weight * compute_fraction.float() ** 2


def segmentation_reward(quality: Tensor, compute_fraction: Tensor, tau: float, weight: float = 1.0) -> Tensor:
    """``(B,)`` rewards of a dense model: ``1 - weight * f^2 - tau * (1 - q)``, ``q`` in [0, 1] the image's
    segmentation quality (its mIoU against the ground truth, :func:`iared.dense.image_miou`).

    The continuous form of :func:`blockdrop_reward`: a perfect image (q = 1) earns the "correct"
    reward, an image with nothing right (q = 0) about ``-tau``. Classification correctness would
    say nothing about the pixels of a dense model, and a 0/1 cut of q would discard how much of
    the mask a dropped token cost; the per-image mIoU prices exactly what pruning takes away.
    """
    f = compute_fraction.float()
    return 1.0 - weight * f**2 - tau * (1.0 - quality.float())


def policy_gradient_loss(log_prob: Tensor, reward: Tensor, baseline: Tensor | float) -> Tensor:
    """REINFORCE: minimise ``-(R - b) * log pi``; the advantage carries no gradient."""
    advantage = (reward - baseline).detach()
    return -(advantage * log_prob).mean()


@dataclass
class RunningMean:
    """Exponential running mean of the reward, the cheap baseline."""

    momentum: float = 0.9
    value: float | None = None

    def update(self, reward: Tensor) -> float:
        """Return the baseline to use for this batch (the mean before seeing it), then update."""
        batch = float(reward.mean())
        current = batch if self.value is None else self.value
        self.value = batch if self.value is None else self.momentum * self.value + (1 - self.momentum) * batch
        return current
