"""``iared train``: bit-exact resume, checkpoints that evaluation reads, DDP equal to one process.

A tiny backbone (1 block, width 32) on digits-clutter, batch 8, 6 steps: seconds per run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from iared.cli import main as cli_main
from iared.models import ViTConfig, create_model, load_model

TINY = ["--model", "digits_vit", "--model-override", "depth=1", "--model-override", "embed_dim=32",
        "--model-override", "num_heads=2"]
RUN = [*TINY, "--batch-size", "8", "--steps", "6", "--val-size", "16", "--warmup", "2", "--lr", "2e-3",
       "--no-progress"]


def train(out: Path, *extra: str) -> None:
    assert cli_main(["train", *RUN, "--out", str(out), *extra]) == 0


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run, shared by the tests below."""
    out = tmp_path_factory.mktemp("full")
    train(out, "--export", str(out / "weights.safetensors"))
    return out


def test_resume_is_bit_exact(full_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    train(out, "--stop-at", "3")
    stopped = checkpoint(out)
    assert stopped["step"] == 3 and "metrics" not in stopped
    assert not any(torch.equal(stopped["model"][k], v) for k, v in checkpoint(full_run)["model"].items()
                   if v.numel() > 1 and k.startswith("blocks"))  # really stopped half way
    # Resume with --resume and --out only: everything else (but --stop-at) comes from the checkpoint.
    assert cli_main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    a, b = checkpoint(full_run), checkpoint(out)
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], b["optimizer"]["state"][i][name])
    assert a["metrics"] == b["metrics"]
    events = [(e["event"], e["step"]) for e in log(out)]
    assert events[:3] == [("start", 0), ("train", 3), ("stopped", 3)]
    assert ("start", 3) in events and events[-1] == ("done", 6)
    assert log(out)[3]["resumed"] is True


def test_resume_with_a_different_config_is_refused(full_run, tmp_path, capsys):
    out = tmp_path / "changed"
    train(out, "--stop-at", "2")
    capsys.readouterr()
    assert cli_main(["train", "--out", str(out), "--resume", "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out / "checkpoint.pt") in err and "lr: saved 0.002, now 0.5" in err


def test_checkpoint_carries_config_and_evaluates(full_run, tmp_path, capsys):
    state = checkpoint(full_run)
    assert state["format"] == "iared-train/1"
    assert state["config"]["model"]["depth"] == 1 and state["config"]["model"]["embed_dim"] == 32
    assert state["config"]["train"]["steps"] == 6 and state["config"]["train"]["batch_size"] == 8
    config = json.loads((full_run / "config.json").read_text())
    assert config["world_size"] == 1
    assert ViTConfig(**config["model"]) == ViTConfig(**state["config"]["model"])
    metrics = state["metrics"]
    assert metrics["test"]["n"] == 2000 and metrics["val"]["n"] == 16

    model = load_model(full_run / "checkpoint.pt")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    # The float16 export loads as the same model (rounded to half precision).
    exported = create_model("digits_vit", checkpoint=full_run / "weights.safetensors", depth=1, embed_dim=32,
                            num_heads=2)
    assert all(torch.equal(v, state["model"][k].half().float()) for k, v in exported.state_dict().items())

    # `iared eval --checkpoint` on the whole test split reproduces the run's own final test figures.
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(full_run / "checkpoint.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2000
    assert result["top1"] == metrics["test"]["top1"]
    assert result["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def test_training_reduces_the_loss(tmp_path):
    out = tmp_path / "fit"
    assert cli_main(["train", *TINY, "--train-size", "16", "--batch-size", "16", "--steps", "30", "--lr", "1e-2",
                     "--warmup", "3", "--label-smoothing", "0", "--log-every", "5", "--val-size", "16",
                     "--no-progress", "--out", str(out)]) == 0
    losses = [e["loss"] for e in log(out) if e["event"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3  # 16 distinct samples: the model starts to memorise them


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed/gloo missing")
def test_ddp_two_processes_equal_one(full_run, tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 8 = 4 per rank: gradients are averaged over
    ranks, so the weights equal the single-process run's up to float rounding."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "iared.cli", "train", *RUN, "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir() if p.name != "tensorboard")  # TensorBoard: when installed
    assert files == ["checkpoint.pt", "config.json", "config.yaml", "log.csv", "log.jsonl"]
    assert proc.stdout.count("step 6: val top-1") == 1  # rank 0 reports, rank 1 stays quiet

    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    events = log(out)
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2
    assert sum(e["event"] == "start" for e in events) == 1  # one writer

    single, ddp = checkpoint(full_run), checkpoint(out)
    assert ddp["step"] == 6 and ddp["config"]["train"]["batch_size"] == 8
    for k, v in single["model"].items():
        assert torch.allclose(ddp["model"][k], v, rtol=0, atol=1e-5), (k, float((ddp["model"][k] - v).abs().max()))
    # Sharded evaluation, summed over ranks, covers the whole split once.
    assert ddp["metrics"]["test"]["n"] == 2000
    assert ddp["metrics"]["test"]["loss"] == pytest.approx(single["metrics"]["test"]["loss"], abs=1e-4)
