"""The interpreter trainer on the shared training machinery: exact resume across a process-count
change is not promised, but torchrun on 2 processes must follow the 1-process run."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from iared.train.interpreters import sample_noise

ARGS = ["train-interpreters", "--task", "digits-clutter", "--steps-per-stage", "2", "--batch-size", "8",
        "--eval-every", "100", "--eval-samples", "8", "--save-every", "100", "--device", "cpu", "--quiet"]


def run(tmp_path, name, nproc):
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "iared", *ARGS, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "iared", *ARGS, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, torch.load(out / "pruned.pt", weights_only=True)


def test_sample_noise_is_a_pure_function_of_the_step():
    a, b = sample_noise(8, 65, 0, 1, 5), sample_noise(8, 65, 0, 1, 5)
    assert torch.equal(a, b) and not torch.equal(a, sample_noise(8, 65, 0, 1, 6))
    assert not torch.equal(a, sample_noise(8, 65, 0, 2, 5))


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed/gloo missing")
def test_interpreter_training_on_two_processes_equals_one(tmp_path):
    _, single = run(tmp_path, "one", 1)
    proc, ddp = run(tmp_path, "two", 2)
    assert proc.stdout.count("{") == 1  # rank 0 reports, rank 1 stays quiet
    keys = [k for k in single["model"] if k.startswith("reducers.")]
    assert keys
    # Adam turns float-rounding differences of the averaged gradients into steps of up to ~lr (3e-3):
    # a different draw or batch split would move the weights by that much, rounding moves them 1e-5.
    for k in keys:
        diff = float((ddp["model"][k] - single["model"][k]).abs().max())
        assert diff <= 2e-4, (k, diff)


def test_compare_refuses_to_resume_another_runs_interpreters(tmp_path):
    """train_on_backbone shares its backbone with every compared method: a state from other settings
    must not be loaded into it."""
    from iared.loading import load_backbone, task_dataset
    from iared.train.interpreters import InterpreterTrainConfig, train_on_backbone

    backbone = load_backbone(None, default="digits_vit").eval()
    train_set = task_dataset("digits-clutter", "train", backbone.cfg)
    cfg = InterpreterTrainConfig(out=str(tmp_path), steps_per_stage=1, batch_size=4, eval_every=100, eval_samples=4)
    train_on_backbone(backbone, train_set, cfg, progress=False)
    train_on_backbone(backbone, train_set, cfg, progress=False)  # same settings: resumes (nothing left to do)
    cfg.steps_per_stage = 2
    with pytest.raises(ValueError, match="another backbone, task, --train-steps or reward"):
        train_on_backbone(backbone, train_set, cfg, progress=False)
    cfg.steps_per_stage = 1
    for field, value in (("reward", "probability"), ("tau", cfg.tau + 1)):  # a changed default must not slip in
        other = dataclasses.replace(cfg, **{field: value})
        with pytest.raises(ValueError, match="another backbone, task, --train-steps or reward"):
            train_on_backbone(backbone, train_set, other, progress=False)


def test_probability_reward_by_hand_and_in_the_trainer():
    """--reward probability: (1 + tau) p - tau - w f^2, so p = 1 gives the 0/1 reward of a correct
    prediction and p = 0 that of a wrong one; the trainer prices a lost margin that 0/1 ignores."""
    from types import SimpleNamespace

    from iared.rl import blockdrop_reward, probability_reward
    from iared.train.interpreters import InterpreterTrainer

    f = torch.tensor([0.5, 0.5, 1.0])
    p = torch.tensor([1.0, 0.0, 0.8])
    got = probability_reward(p, f, tau=10.0, weight=2.0)
    assert torch.allclose(got, torch.tensor([1 - 2 * 0.25, -10 - 0.5, 11 * 0.8 - 10 - 2.0]))
    assert torch.allclose(got[:2], blockdrop_reward(torch.tensor([True, False]), f[:2], 10.0, 2.0) - torch.tensor([0, 0.5]))

    # both images right (argmax = label): 0/1 pays them alike; probability pays the confident one more
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    labels, macs = torch.tensor([0, 0]), torch.tensor([50.0, 50.0])
    trainer = SimpleNamespace(full_macs=100.0, cfg=SimpleNamespace(tau=10.0, stage_weights=(1.0,), reward="correct"))
    flat = InterpreterTrainer.reward(trainer, logits, macs, labels, 0)
    assert flat[0] == flat[1]
    trainer.cfg.reward = "probability"
    shaped = InterpreterTrainer.reward(trainer, logits, macs, labels, 0)
    p0 = torch.softmax(logits, -1)[:, 0]
    assert torch.allclose(shaped, 11 * p0 - 10 - 0.25) and shaped[0] > shaped[1]
    trainer.cfg.reward = "nonsense"
    with pytest.raises(ValueError, match="unknown reward"):
        InterpreterTrainer.reward(trainer, logits, macs, labels, 0)
