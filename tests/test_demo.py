"""``iared demo`` end to end, shortened: the files it promises and their consistency."""

import json

import pytest

from iared.cli import main


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_writes_results_table_and_pictures(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--steps-per-stage", "2", "--finetune-steps", "2", "--test-samples", "64",
                 "--eval-samples", "32", "--val-samples", "64", "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("accuracy_full", "accuracy_pruned", "kept_fraction", "gflops_full", "gflops_pruned",
                "throughput_full", "throughput_pruned", "speedup"):
        assert key in results, key
    # the shipped backbone: a trained model, far above chance even on 64 images
    assert results["accuracy_full"] >= 0.85
    assert len(results["kept_fraction"]) == 3
    # a token dropped at one stage stays dropped: kept fractions never increase
    kept = results["kept_fraction"]
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    # two training steps leave the interpreters near their initial "keep ~all" (score 0.9): below 0.9
    # the pruned model costs the backbone plus the interpreters (on validation, where all were tried)
    at = {p["threshold"]: p for p in results["operating_point"]["points"]}
    assert results["gflops_full"] < at[0.5]["gflops"] < 1.1 * results["gflops_full"]
    assert 0 < results["gflops_pruned"] < 1.1 * results["gflops_full"]
    assert results["flops_reduction"] == pytest.approx(1 - results["gflops_pruned"] / results["gflops_full"])
    assert results["speedup"] == pytest.approx(results["throughput_pruned"] / results["throughput_full"])
    assert results["speed_probe_ms"] > 0  # how fast the machine ran while the demo timed
    pictures = sorted(p.name for p in out.glob("test_*.png"))
    assert pictures == [f"test_{i:02d}.png" for i in range(16)] == sorted(results["pictures"])
    assert (out / "interpreters" / "pruned.pt").is_file()
    # the accuracy-against-throughput curve: one point per threshold, all on the same images and clock
    # the operating threshold: the cheapest within 0.5 pt on the 64 validation images, recorded in the file
    op = results["operating_point"]
    assert op["n"] == 64 and op["max_loss"] == 0.5 and results["threshold"] == op["threshold"]
    within = [p for p in op["points"] if p["loss_pt"] <= 0.5 + 1e-9]
    assert within and op["threshold"] == min(within, key=lambda p: p["gflops"])["threshold"]
    from iared.pruning import load_pruned

    assert load_pruned(out / "interpreters" / "pruned.pt").inference.threshold == op["threshold"]
    curve = results["curve"]
    assert [p["threshold"] for p in curve["points"]] == sorted({0.1, 0.3, 0.5, 0.7, 0.9, op["threshold"]})
    assert curve["unpruned"]["top1"] == results["accuracy_full"]
    point = next(p for p in curve["points"] if p["threshold"] == op["threshold"])
    assert point["top1"] == results["accuracy_pruned"] and point["gflops"] == pytest.approx(results["gflops_pruned"])
    assert all(p["speedup"] == pytest.approx(p["images_per_s"] / curve["unpruned"]["images_per_s"])
               for p in curve["points"])
    assert (out / "accuracy_vs_throughput.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "top-1 accuracy" in table and "speed-up" in table
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind


def test_video_demo_draws_a_strip_and_a_gif_per_clip_and_reads_masks_frame_major(tmp_path):
    """``demo --task moving-digits``'s own parts, on a tiny random TimeSformer: one PNG strip and one GIF
    per clip; the mask contrast pairs each clip mask's patches with the space-time tokens in frame-major
    order (a patch of frame 1 is token S + p, not token p)."""
    import torch

    from iared.demo import mask_score_contrast, save_clip_pictures
    from iared.models.timesformer import TimeSformer, TimeSformerConfig
    from iared.pruning import IARed

    torch.manual_seed(0)
    backbone = TimeSformer(TimeSformerConfig(img_size=16, patch_size=8, num_frames=2, num_classes=3, embed_dim=16,
                                             depth=3, num_heads=2, mean=(0.0,) * 3, std=(1.0,) * 3))
    model = IARed(backbone, num_stages=3).eval()
    for interp in model.interpreters:
        torch.nn.init.normal_(interp.qk.weight, std=2.0)
    clips, labels = torch.rand(2, 2, 3, 16, 16), torch.tensor([0, 2])
    names = save_clip_pictures(model, clips, labels, tmp_path, 0.5)
    assert names == ["test_00.png", "test_00.gif", "test_01.png", "test_01.gif"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
    masks = torch.zeros(2, 2, 16, 16, dtype=torch.bool)
    masks[:, 1, 8:, 8:] = True  # frame 1, last patch: token 2 * 2 + 3 = 7 of 8
    result = mask_score_contrast(model, clips, masks, 0.5)
    with torch.no_grad():
        scores = model(clips, threshold=0.5).scores[0][:, 1:]
    assert result["score_inside_mask"] == pytest.approx(float(scores[:, 7].mean()), abs=1e-6)
    assert result["score_outside_mask"] == pytest.approx(float(scores[:, :7].mean()), abs=1e-6)


def test_tau_per_task_reaches_the_commands(tmp_path, monkeypatch):
    """``TASK_TAU``: digits-natural trains with tau 10 unless --tau says otherwise, other tasks with the
    dataclass default; ``train-interpreters`` without --tau takes the task's value."""
    import iared.commands.train_interpreters as command
    from iared.train.interpreters import InterpreterTrainConfig, default_tau

    assert default_tau("digits-natural") == 10.0 and default_tau("digits-clutter") == InterpreterTrainConfig.tau
    seen = []
    monkeypatch.setattr(command, "train_from_config", lambda cfg, **kw: seen.append(cfg.tau) or (None, []))
    for extra in ([], ["--tau", "3"]):
        assert main(["train-interpreters", "--task", "digits-natural", "--out", str(tmp_path / "x"), *extra]) == 0
    assert seen == [10.0, 3.0]


def test_reward_per_task_reaches_the_commands(tmp_path, monkeypatch):
    """``TASK_REWARD``: moving-digits trains with the probability reward unless --reward says otherwise,
    other tasks with the paper's 0/1 reward; ``train-interpreters`` without --reward takes the task's."""
    import iared.commands.train_interpreters as command
    from iared.train.interpreters import InterpreterTrainConfig, default_reward

    assert default_reward("moving-digits") == "probability"
    assert default_reward("digits-natural") == InterpreterTrainConfig.reward == "correct"
    seen = []
    monkeypatch.setattr(command, "train_from_config", lambda cfg, **kw: seen.append(cfg.reward) or (None, []))
    for task, extra in (("moving-digits", []), ("moving-digits", ["--reward", "correct"]), ("digits-natural", [])):
        assert main(["train-interpreters", "--task", task, "--out", str(tmp_path / "x"), *extra]) == 0
    assert seen == ["probability", "correct", "correct"]


def test_resuming_keeps_the_runs_own_reward_and_tau(tmp_path, monkeypatch):
    """``--resume`` without --reward / --tau continues with what the run was started with (its
    config.json), not with a task default that may have changed since; given flags still win."""
    import json

    import iared.commands.train_interpreters as command

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"task": "moving-digits", "reward": "correct", "tau": 7.0}))
    seen = []
    monkeypatch.setattr(command, "train_from_config", lambda cfg, **kw: seen.append((cfg.reward, cfg.tau)) or (None, []))
    for extra in ([], ["--reward", "probability"]):
        assert main(["train-interpreters", "--task", "moving-digits", "--out", str(out), "--resume", *extra]) == 0
    assert seen == [("correct", 7.0), ("probability", 7.0)]
    (out / "config.json").write_text("{not json")
    assert main(["train-interpreters", "--task", "moving-digits", "--out", str(out), "--resume"]) == 2
