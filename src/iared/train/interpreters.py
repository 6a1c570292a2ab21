"""``iared train-interpreters``: learn where to drop tokens, one stage after another, by reward.

Curriculum (IA-RED² Sec. 3.3): the backbone is frozen; stage d's interpreter is trained while
the stages before it run their (already trained) interpreters in threshold mode and the stages
after it keep every token. Each step samples keep decisions from
Bernoulli(eps + (1 - 2 eps) * score), eps = ``exploration``, runs the pruned model, and scores
it with :func:`iared.rl.blockdrop_reward`; REINFORCE with a baseline updates the interpreter
(see :mod:`iared.rl` for the reward and baseline choices).

Optional ``--finetune-steps``: afterwards the backbone is fine-tuned under the learned policy
(threshold mode, tokens really dropped) with distillation from the unpruned backbone.

The data order is a pure function of (seed, stage, step), so ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from iared.checkpoint import CheckpointError, read_checkpoint
from iared.files import check_output_dir
from iared.pruning import IARed, IARedConfig, InferenceSettings, save_pruned
from iared.rl import Baseline, RewardKind, RunningMean, blockdrop_reward, policy_gradient_loss, probability_reward
from iared.train.common import (
    Checkpointer,
    RunLogger,
    StepGuard,
    all_reduce_sums,
    autocast,
    average_gradients,
    cleanup,
    init_distributed,
    is_main,
    rank_share,
    write_run_config,
)

TRAIN_STATE_FORMAT = "iared-interp-train/1"


@dataclass
class InterpreterTrainConfig:
    """Every option of ``iared train-interpreters``; saved next to the checkpoints."""

    task: str = "digits-clutter"
    backbone: str | None = None  # weights file of the backbone (any format, iared.loading); None: see model
    model: str | None = None  # backbone name (with backbone: how to build it; alone: its pretrained weights)
    pretrained: bool = False  # with model and no backbone file: timm's download / the shipped digits_vit
    out: str = "runs/interpreters"
    steps_per_stage: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    tau: float = 5.0  # reward of a wrong prediction is -tau (README: 1 drops too much, 20 keeps all)
    stage_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # weight of the compute term, per stage
    baseline: Baseline = "self-critical"
    reward: RewardKind = "correct"  # correct: 1 - w f^2 or -tau (BlockDrop, the paper); probability: continuous in p(true)
    exploration: float = 0.05  # sample from eps + (1 - 2 eps) * score
    initial_score: float | None = 0.9  # each stage starts from "keep ~all" (MultiHeadInterpreter.set_initial_score);
    # None: each stage starts from the interpreter as it is (retraining trained interpreters for another reward)
    threshold: float = 0.5
    num_stages: int = 3
    interpreter_heads: int = 6
    eval_every: int = 100
    eval_samples: int = 500
    save_every: int = 50
    finetune_steps: int = 0
    finetune_lr: float = 5e-5
    distill_weight: float = 0.5  # loss = (1 - w) * CE(label) + w * KL(teacher || student)
    seed: int = 0
    device: str = "cpu"
    max_bad_steps: int = 0  # steps with a non-finite loss / gradient skipped before the run stops
    prerender: int = 0  # render the embedded task's train split up front in N processes (fast accelerators)
    history: list = field(default_factory=list, repr=False)


# tau for the embedded tasks where the dataclass default does not fit; demo, compare and
# train-interpreters use it when no --tau is given. digits-natural: on the 96.6 % backbone tau 5 learned to
# keep 14 / 14 / 6 % of the patches and lost 2.6 pt at threshold 0.5; tau 10, with the same 900 steps,
# 0.9 pt at threshold 0.4 (README, digits-natural).
TASK_TAU = {"digits-natural": 10.0}
# moving-digits: with the paper's 0/1 reward two trainings with the same settings learned policies
# 11 pt apart at threshold 0.5 (README, runs F and the one before it); with the probability reward
# (tau 5, 300 steps per stage) it kept 20 % of the tokens for -0.2 pt (run G).
TASK_REWARD = {"moving-digits": "probability"}


def default_tau(task: str) -> float:
    return TASK_TAU.get(task, InterpreterTrainConfig.tau)


def default_reward(task: str) -> str:
    return TASK_REWARD.get(task, InterpreterTrainConfig.reward)


def batch_indices(n: int, batch_size: int, seed: int, stage: int, step: int) -> Tensor:
    """Which samples form the batch at (stage, step): deterministic, so resuming is exact."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + (stage + 2) * 1_000_000_007 + step) % 2**63)
    return torch.randint(0, n, (batch_size,), generator=generator)


def sample_noise(batch_size: int, num_tokens: int, seed: int, stage: int, step: int) -> Tensor:
    """The uniform draws ``(batch, N0)`` of sample mode at (stage, step), for the whole global batch:
    a pure function of the step, so resuming and splitting a batch over processes change nothing."""
    generator = torch.Generator().manual_seed((seed * 7_919 + (stage + 2) * 1_000_003 + step * 31 + 17) % 2**63)
    return torch.rand(batch_size, num_tokens, generator=generator)


def stack_batch(dataset, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Images and targets of ``indices``: class labels ``(B,)``, or stacked tensor targets (dense masks)."""
    items = [dataset[int(i)] for i in indices]
    if items and isinstance(items[0][1], Tensor):
        return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


def stage_modes(stage: int, num_stages: int, current: str) -> list[str]:
    """Curriculum modes: earlier stages thresholded, this one ``current``, later ones keep all."""
    return ["threshold"] * stage + [current] + ["all"] * (num_stages - stage - 1)


class InterpreterTrainer:
    """Trains ``model.interpreters`` on ``dataset`` (map-style, items ``(image, label, ...)``)."""

    def __init__(self, model: IARed, dataset, cfg: InterpreterTrainConfig, val_data: tuple[Tensor, Tensor] | None = None,
                 progress: bool = True):
        self.model, self.dataset, self.cfg, self.val_data = model, dataset, cfg, val_data
        self.progress = progress
        self.device = torch.device(cfg.device)
        self.full_macs = model.full_macs()
        self.stage, self.step = 0, 0
        self.running = RunningMean()
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict] = []
        self.out = Path(cfg.out)
        self.checkpointer = Checkpointer(self.out, filename="train_state.pt")
        self.guard = StepGuard(cfg.max_bad_steps, self.checkpointer, device=self.device)
        self.logger = RunLogger(self.out / "log.jsonl")

    # -- state ------------------------------------------------------------------------------

    def _new_optimizer(self, stage: int) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.interpreters[stage].parameters(), lr=self.cfg.lr)

    def state_path(self) -> Path:
        return self.checkpointer.path

    def save_state(self) -> None:
        """Write the training state (refused, keeping the previous one, if it holds NaN / inf)."""
        self.checkpointer.save({
            "format": TRAIN_STATE_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
            "stage": self.stage, "step": self.step,
            "running_mean": -1e9 if self.running.value is None else self.running.value,
            "history": json.dumps(self.history),
            "config": {"model": self.model.backbone.cfg.to_dict(), "iared": self.model.config_dict(),
                       "train": _config_dict(self.cfg)},
        }, step=f"stage {self.stage + 1} step {self.step}")

    def load_state(self, path: Path) -> None:
        state = read_checkpoint(path)
        if state.get("format") != TRAIN_STATE_FORMAT:
            raise CheckpointError(f"bad checkpoint {path}: not an interpreter training state")
        self.model.load_state_dict(state["model"])
        self.stage, self.step = int(state["stage"]), int(state["step"])
        self.running.value = None if state["running_mean"] == -1e9 else float(state["running_mean"])
        self.history = json.loads(state["history"])
        if self.stage < self.model.num_stages:
            self.optimizer = self._new_optimizer(self.stage)
            if state["optimizer"]:
                self.optimizer.load_state_dict(state["optimizer"])

    # -- one step -----------------------------------------------------------------------------

    def reward(self, logits: Tensor, macs: Tensor, labels: Tensor, stage: int) -> Tensor:
        weight = self.cfg.stage_weights[stage]
        if self.cfg.reward == "probability":
            true_prob = logits.float().softmax(-1).gather(-1, labels[:, None])[:, 0]
            return probability_reward(true_prob, macs / self.full_macs, self.cfg.tau, weight)
        if self.cfg.reward != "correct":
            raise ValueError(f"unknown reward {self.cfg.reward!r}; expected correct or probability")
        correct = logits.argmax(-1) == labels
        return blockdrop_reward(correct, macs / self.full_macs, self.cfg.tau, weight)

    def accuracy(self, logits: Tensor, labels: Tensor) -> float:
        """The batch's accuracy term for the logs (top-1 here; a dense trainer reports its own)."""
        return float((logits.argmax(-1) == labels).float().mean())

    def train_step(self, images: Tensor, labels: Tensor) -> dict:
        cfg, model, stage = self.cfg, self.model, self.stage
        # Training runs padded + masked: exact like packed, and one batched attention call per block
        # is the cheapest way to run ragged batches whose shapes change every step.
        noise = rank_share(sample_noise(cfg.batch_size, model.backbone.num_tokens, cfg.seed, stage, self.step))
        with autocast(self.device):
            out = model(images, stage_modes(stage, model.num_stages, "sample"), threshold=cfg.threshold,
                        exploration=cfg.exploration, layout="padded", noise=noise.to(self.device))
        reward = self.reward(out.logits, out.macs, labels, stage)
        if cfg.baseline == "self-critical":
            with torch.no_grad(), autocast(self.device):
                greedy = model(images, stage_modes(stage, model.num_stages, "threshold"), threshold=cfg.threshold,
                               layout="padded")
            baseline = self.reward(greedy.logits, greedy.macs, labels, stage)
        else:
            # the running mean follows the global batch's mean reward, identical on every rank
            sums = all_reduce_sums({"r": float(reward.sum()), "n": float(len(reward))}, self.device)
            baseline = torch.tensor(self.running.update(torch.tensor(sums["r"] / sums["n"])))
        loss = policy_gradient_loss(out.log_prob, reward, baseline)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model.interpreters[stage].parameters())
        self.guard.what = f"stage {stage + 1} step"
        params = {f"interpreters.{stage}.{n}": p for n, p in model.interpreters[stage].named_parameters()}
        if self.guard.check(self.step + 1, loss, params, self.optimizer):
            self.optimizer.step()
        return {"reward": float(reward.mean()), "kept": float(out.kept_fraction()[:, stage].mean()),
                "accuracy": self.accuracy(out.logits, labels),
                "gflops": float(out.gflops.mean())}

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        cfg, model = self.cfg, self.model
        model.to(self.device)
        model.backbone.requires_grad_(False)
        model.eval()  # no dropout anywhere; interpreters learn through log-probabilities only
        if self.optimizer is None and self.stage < model.num_stages:
            self.optimizer = self._new_optimizer(self.stage)
        while self.stage < model.num_stages:
            if self.step == 0 and cfg.initial_score is not None:  # a fresh stage (idempotent on resume)
                model.interpreters[self.stage].set_initial_score(cfg.initial_score)
            bar = tqdm(total=cfg.steps_per_stage, initial=self.step, desc=f"stage {self.stage + 1}/{model.num_stages}",
                       disable=not (self.progress and is_main()), file=sys.stderr, dynamic_ncols=True)
            while self.step < cfg.steps_per_stage:
                idx = rank_share(batch_indices(len(self.dataset), cfg.batch_size, cfg.seed, self.stage, self.step))
                images, labels = stack_batch(self.dataset, idx)
                stats = self.train_step(images.to(self.device), labels.to(self.device))
                self.step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward']:.3f}", kept=f"{stats['kept']:.2f}",
                                acc=f"{stats['accuracy']:.2f}")
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps_per_stage:
                    self._log(stats)
                if self.step % cfg.save_every == 0:
                    self.save_state()
            bar.close()
            self.stage, self.step = self.stage + 1, 0
            self.optimizer = self._new_optimizer(self.stage) if self.stage < model.num_stages else None
            self.save_state()
        return self.history

    def _log(self, stats: dict) -> None:
        entry = {"stage": self.stage, "step": self.step, **{k: round(v, 4) for k, v in stats.items()}}
        if self.val_data is not None and is_main():  # validation on rank 0 only; the others go on
            from iared.measure import accuracy_and_compute

            images, labels = self.val_data
            # the stages not trained yet keep everything, as in training
            ev = accuracy_and_compute(self.model, images, labels, threshold=self.cfg.threshold,
                                      device=self.device, include_full=False,
                                      mode=stage_modes(self.stage, self.model.num_stages, "threshold"))
            entry.update(val_accuracy=ev["accuracy_pruned"], val_kept=ev["kept_fraction"],
                         val_gflops=round(ev["gflops_pruned"], 5))
        self.history.append(entry)
        self.logger.log(**entry)


def finetune_backbone(model: IARed, dataset, cfg: InterpreterTrainConfig, progress: bool = True,
                      guard: StepGuard | None = None) -> None:
    """Fine-tune the backbone under the learned policy (threshold mode at ``cfg.threshold``),
    distilling from the unpruned backbone (:func:`iared.train.finetune.finetune_reduced`).
    ``guard`` (default: ``cfg.max_bad_steps``, nothing written) vets every step."""
    from iared.train.finetune import FinetuneConfig, finetune_reduced

    ft = FinetuneConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size, lr=cfg.finetune_lr,
                        distill_weight=cfg.distill_weight, seed=cfg.seed, device=cfg.device,
                        max_bad_steps=cfg.max_bad_steps)
    finetune_reduced(model, dataset, {"mode": "threshold", "threshold": cfg.threshold}, ft, progress=progress,
                     guard=guard)


def _config_dict(cfg: InterpreterTrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("history", None)
    d["stage_weights"] = list(d["stage_weights"])
    return d


# -- command line ----------------------------------------------------------------------------------

def build_model(cfg: InterpreterTrainConfig) -> IARed:
    """The backbone the config names (:func:`iared.loading.load_backbone`; default: the task's shipped
    backbone, ``TASK_BACKBONES``) with fresh interpreters."""
    from iared.loading import load_backbone
    from iared.models import TASK_BACKBONES

    backbone = load_backbone(cfg.backbone, cfg.model, cfg.pretrained, default=TASK_BACKBONES.get(cfg.task, "digits_vit"))
    return IARed(backbone, IARedConfig(num_stages=cfg.num_stages, interpreter_heads=cfg.interpreter_heads))


def load_split(task: str, split: str, n: int, seed: int = 0, model_cfg=None) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of a split as tensors (evaluation sets), matched to ``model_cfg``
    for image folders."""
    from iared.loading import task_dataset

    ds = task_dataset(task, split, model_cfg)
    return stack_batch(ds, torch.arange(min(n, len(ds))))


def train_from_config(cfg: InterpreterTrainConfig, resume: bool = False, progress: bool = True) -> tuple[IARed, list]:
    from iared.loading import check_labels_fit, task_dataset
    from iared.reducers.base import check_threshold

    out = check_output_dir(cfg.out, "--out folder")
    check_threshold(cfg.threshold)
    if cfg.max_bad_steps < 0:
        raise ValueError(f"--max-bad-steps must be >= 0, got {cfg.max_bad_steps}")
    if len(cfg.stage_weights) != cfg.num_stages:
        cfg.stage_weights = tuple([cfg.stage_weights[0]] * cfg.num_stages)
    # torchrun: every rank takes its share of each global batch and gradients are averaged, so a
    # run on N processes follows the single-process run (tests/test_train.py checks 2 = 1)
    _, _, device = init_distributed(cfg.device)
    cfg.device = str(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    # interpreters learn on the evaluation view of the images: the data of a step stays a pure
    # function of (seed, stage, step), so --resume is exact on folders too
    train_set = task_dataset(cfg.task, "train", model.backbone.cfg)
    check_labels_fit(train_set, model.backbone.cfg.num_classes, cfg.task, cfg.backbone or "the backbone")
    if cfg.prerender:
        from iared.data.samples import prerender_task

        prerender_task(train_set, cfg.prerender, show_progress=progress and is_main())
    val = load_split(cfg.task, "val", cfg.eval_samples, model_cfg=model.backbone.cfg)
    trainer = InterpreterTrainer(model, train_set, cfg, val_data=val, progress=progress)
    if resume:
        if not trainer.state_path().is_file():
            raise FileNotFoundError(f"nothing to resume: {trainer.state_path()} does not exist")
        trainer.load_state(trainer.state_path())
    write_run_config(out, _config_dict(cfg))
    history = trainer.run()
    finetune_backbone(model, train_set, cfg, progress=progress, guard=trainer.guard)
    if is_main():
        save_pruned(model, out / "pruned.pt", extra={"train": _config_dict(cfg)},
                    inference=InferenceSettings(threshold=cfg.threshold))
    cleanup()
    return model, history


def _check_same_run(path: Path, model: IARed, cfg: InterpreterTrainConfig) -> None:
    """Resuming into a shared, in-memory backbone: the saved state must come from this backbone and
    these settings, or it would silently replace the backbone every compared method runs on."""
    state = read_checkpoint(path)
    saved = state.get("model", {})
    mine = model.backbone.state_dict()
    same_backbone = all(k in saved and saved[k].shape == v.shape and torch.equal(saved[k].to(v), v)
                        for k, v in ((f"backbone.{k}", v) for k, v in mine.items()))
    train = (state.get("config") or {}).get("train") or {}
    same_reward = train.get("reward", "correct") == cfg.reward and train.get("tau", cfg.tau) == cfg.tau
    if (not same_backbone or train.get("steps_per_stage") != cfg.steps_per_stage or train.get("task") != cfg.task
            or not same_reward):
        raise ValueError(f"{path} holds an interpreter run for another backbone, task, --train-steps or reward; "
                         "use a new --out folder (or delete it) to train from scratch")


def train_on_backbone(backbone, train_set, cfg: InterpreterTrainConfig, resume: bool = True,
                      progress: bool = True) -> IARed:
    """Interpreters for a backbone already in memory (``iared compare``), with the same trainer as
    :func:`train_from_config`; resumes from ``cfg.out`` when a training state is there."""
    from iared.loading import task_dataset

    out = check_output_dir(cfg.out, "--out folder")
    torch.manual_seed(cfg.seed)
    model = IARed(backbone, IARedConfig(num_stages=cfg.num_stages, interpreter_heads=cfg.interpreter_heads))
    val_set = task_dataset(cfg.task, "val", backbone.cfg)
    val = stack_batch(val_set, torch.arange(min(cfg.eval_samples, len(val_set))))
    trainer = InterpreterTrainer(model, train_set, cfg, val_data=val, progress=progress)
    if resume and trainer.state_path().is_file():
        _check_same_run(trainer.state_path(), model, cfg)
        trainer.load_state(trainer.state_path())
    write_run_config(out, _config_dict(cfg))
    trainer.run()
    save_pruned(model, out / "pruned.pt", extra={"train": _config_dict(cfg)},
                    inference=InferenceSettings(threshold=cfg.threshold))
    return model
