"""The command line: ``iared eval`` (backbone and pruned checkpoints), help, and one-line errors naming the input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from iared.cli import main as cli_main
from iared.data import build_dataset
from iared.measure import accuracy_and_compute
from iared.models import create_model
from iared.pruning import IARed, InferenceSettings, load_pruned, save_pruned

SMALL = dict(depth=2, embed_dim=32, num_heads=2)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_json(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def assert_one_line_error(code: int, err: str, *needles) -> None:
    assert code == 2
    err = err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_model("digits_vit", **SMALL).eval()


@pytest.fixture(scope="module")
def files(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ckpt = root / "backbone.pt"
    torch.save({"model": backbone.state_dict(), "config": {"model": backbone.cfg.to_dict()}}, ckpt)
    torch.manual_seed(1)
    pruned = IARed(backbone, num_stages=2, interpreter_heads=2).eval()
    with torch.no_grad():  # interpreter scores spread around 0.5, so threshold 0.5 drops some tokens
        for p in pruned.interpreters.parameters():
            p.normal_(0, 0.5)
    save_pruned(pruned, root / "pruned.pt")
    save_pruned(pruned, root / "pruned_t0.pt", extra={"train": {"threshold": 0.0}},
                inference=InferenceSettings(threshold=0.0))
    return {"backbone": ckpt, "pruned": root / "pruned.pt", "pruned_t0": root / "pruned_t0.pt", "root": root}


def test_help(capsys):
    for command, options in [("train", ["--resume", "--stop-at", "--model-override", "--batch-size"]),
                             ("eval", ["--checkpoint", "--threshold", "--limit", "--json"])]:
        with pytest.raises(SystemExit) as exc:
            cli_main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: iared {command}")
        for option in options:
            assert option in out


# -- iared eval --checkpoint ---------------------------------------------------------------------


def test_eval_checkpoint_json(files, backbone, capsys):
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["backbone"], "--task", "digits-clutter",
                             "--limit", 40, "--batch-size", 16, "--json")
    assert code == 0
    result = one_json(out)
    assert result["n"] == 40 and result["split"] == "test" and result["checkpoint"] == str(files["backbone"])
    # the same figures computed by hand on the same 40 samples
    ds = build_dataset("digits-clutter", "test", length=40)
    images = torch.stack([ds[i][0] for i in range(40)])
    labels = torch.tensor([int(ds[i][1]) for i in range(40)])
    with torch.no_grad():
        logits = backbone(images)
    assert result["top1"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)

    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["backbone"], "--limit", 40)
    assert code == 0 and "top-1" in out and "n=40" in out


def test_eval_official_layout_infers_the_geometry_or_takes_a_model_name(files, backbone, capsys, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"model": backbone.state_dict()}, plain)
    # no config inside: width, depth, patch, image size, channels, classes come from the weights
    code, out, err = run_cli(capsys, "eval", "--checkpoint", plain, "--limit", 8, "--json")
    assert code == 0 and one_json(out)["n"] == 8, err
    torch.save({"model": {"not_a_vit.weight": torch.zeros(2)}}, plain)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", plain, "--limit", 8)
    assert_one_line_error(code, err, plain, "not a ViT / DeiT state dict", "--model")
    torch.save({"model": backbone.state_dict()}, plain)
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", plain, "--model", "digits_vit", "--model-override",
                           "depth=2", "--model-override", "embed_dim=32", "--model-override", "num_heads=2",
                           "--limit", 8, "--json")
    assert code == 0 and one_json(out)["n"] == 8


# -- iared eval --pruned ------------------------------------------------------------------------

PRUNED_KEYS = {"accuracy_full", "accuracy_pruned", "kept_fraction", "gflops_full", "gflops_pruned", "speedup_ideal",
               "throughput_full", "throughput_pruned", "speedup", "n", "threshold", "throughput_batch", "device"}


def test_eval_pruned_json(files, backbone, capsys):
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["pruned"], "--limit", 24, "--batch-size", 10,
                           "--threshold", 0.5, "--repeats", 1, "--json")
    assert code == 0
    r = one_json(out)
    assert PRUNED_KEYS <= r.keys()
    assert r["n"] == 24 and r["threshold"] == 0.5 and r["throughput_batch"] == 64 and r["device"] == "cpu"
    assert 0 <= r["accuracy_pruned"] <= 1 and 0 <= r["accuracy_full"] <= 1
    assert len(r["kept_fraction"]) == 2
    assert 0 < r["kept_fraction"][1] <= r["kept_fraction"][0] < 1  # some tokens dropped, none come back
    assert 0 < r["gflops_pruned"] < r["gflops_full"]
    assert r["speedup_ideal"] == pytest.approx(r["gflops_full"] / r["gflops_pruned"]) and r["speedup_ideal"] > 1
    assert r["throughput_full"] > 0 and r["throughput_pruned"] > 0
    assert r["speedup"] == pytest.approx(r["throughput_pruned"] / r["throughput_full"])

    # Batches of 10 (10 + 10 + 4) combine to what one accuracy_and_compute call on all 24 images gives.
    ds = build_dataset("digits-clutter", "test", length=24)
    images, labels = torch.stack([ds[i][0] for i in range(24)]), torch.tensor([int(ds[i][1]) for i in range(24)])
    whole = accuracy_and_compute(load_pruned(files["pruned"]), images, labels, threshold=0.5)
    for key in ("accuracy_full", "accuracy_pruned", "gflops_full", "gflops_pruned", "speedup_ideal"):
        assert r[key] == pytest.approx(whole[key], rel=1e-9), key
    assert r["kept_fraction"] == pytest.approx(whole["kept_fraction"], abs=1e-4)

    # Same data as `eval --checkpoint` of the backbone: the unpruned accuracy agrees.
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["backbone"], "--limit", 24, "--json")
    assert one_json(out)["top1"] == pytest.approx(r["accuracy_full"])


def test_eval_pruned_threshold_zero_is_the_backbone(files, capsys):
    # threshold 0 keeps every token (scores are sigmoids > 0): same accuracy, no FLOP savings but the interpreters'
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["pruned"], "--limit", 24, "--threshold", "0,0",
                           "--throughput-batch", 8, "--repeats", 1, "--json")
    assert code == 0
    r = one_json(out)
    assert r["threshold"] == [0.0, 0.0] and r["throughput_batch"] == 8
    assert r["accuracy_pruned"] == r["accuracy_full"]
    assert r["kept_fraction"] == [1.0, 1.0]
    assert r["gflops_pruned"] > r["gflops_full"] and r["speedup_ideal"] < 1

    # the threshold the checkpoint records (training writes its --threshold there) is the default
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["pruned_t0"], "--limit", 8, "--throughput-batch", 4,
                           "--repeats", 1, "--json")
    assert one_json(out)["threshold"] == 0.0 and one_json(out)["kept_fraction"] == [1.0, 1.0]


def test_eval_pruned_text_report_and_bad_options(files, capsys):
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", files["pruned"], "--limit", 8, "--throughput-batch", 4,
                           "--repeats", 1)
    assert code == 0 and "GFLOPs" in out and "speed-up" in out and "FLOPs-ideal" in out
    code, _, err = run_cli(capsys, "eval", "--checkpoint", files["pruned"], "--threshold", "0.1,0.2,0.3")
    assert_one_line_error(code, err, "--threshold", "2")
    with pytest.raises(SystemExit) as exc:  # the old and the new spelling of one option: which file?
        run_cli(capsys, "eval", "--pruned", files["pruned"], "--checkpoint", files["backbone"])
    assert exc.value.code == 2 and "not allowed with argument --pruned" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", files["pruned"], "--pretrained")
    assert_one_line_error(code, err, files["pruned"], "is a pruned checkpoint")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", files["backbone"], "--threshold", 0.5)
    assert_one_line_error(code, err, "--threshold", "no interpreters")
    missing = files["root"] / "missing.pt"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", missing)
    assert_one_line_error(code, err, missing, "not found")


# -- errors: one line naming the input ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "text", "wrong_shapes"])
def test_eval_bad_checkpoint(kind, files, backbone, capsys, tmp_path):
    path = tmp_path / "bad.pt"
    if kind == "empty":
        path.touch()
    elif kind == "garbage":
        path.write_bytes(os.urandom(1000))
    elif kind == "text":
        path.write_text("model: deit\n")
    elif kind == "wrong_shapes":
        cfg = {**backbone.cfg.to_dict(), "embed_dim": 64}
        torch.save({"model": backbone.state_dict(), "config": {"model": cfg}}, path)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", path, "--json")
    assert out == ""
    assert_one_line_error(code, err, "iared eval: error:", path)
    if kind == "wrong_shapes":
        assert "cls_token: file (1, 1, 32) vs model (1, 1, 64)" in err


def test_bad_checkpoint_through_the_real_entry_point(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x00garbage" * 50)
    proc = subprocess.run([sys.executable, "-m", "iared.cli", "eval", "--checkpoint", str(path), "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and lines[0].startswith("iared eval: error: bad checkpoint")


def test_eval_unknown_model_and_nothing_to_evaluate(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--model", "deit_gigantic", "--pretrained")
    assert_one_line_error(code, err, "unknown model 'deit_gigantic'")
    code, _, err = run_cli(capsys, "eval", "--task", tmp_path)  # a folder has no shipped backbone
    assert_one_line_error(code, err, "nothing to evaluate")


def test_eval_digits_without_checkpoint_uses_the_shipped_backbone(capsys):
    code, out, err = run_cli(capsys, "eval", "--task", "digits-clutter", "--limit", 16, "--json")
    assert code == 0, err
    result = one_json(out)
    assert result["checkpoint"] == "digits_vit:shipped" and result["n"] == 16


def _folders(tmp_path):
    missing = tmp_path / "no_such_folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "classes_without_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "notes.txt").write_text("not an image")
    return [missing, empty, no_images]


def test_eval_bad_task_folders(files, capsys, tmp_path):
    for folder in _folders(tmp_path):
        code, _, err = run_cli(capsys, "eval", "--checkpoint", files["backbone"], "--task", folder)
        assert_one_line_error(code, err, folder)


def test_train_errors_name_the_input(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out would land here, not in the repository
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", "vit_gigantic", "--out", out, "--no-progress")
    assert_one_line_error(code, err, "iared train: error:", "unknown model 'vit_gigantic'")
    for folder in _folders(tmp_path):
        code, _, err = run_cli(capsys, "train", "--task", folder, "--out", out, "--steps", 1, "--no-progress")
        assert_one_line_error(code, err, "iared train: error:", folder)
    code, _, err = run_cli(capsys, "train", "--model-override", "depth", "--out", out, "--no-progress")
    assert_one_line_error(code, err, "bad override 'depth'")
    code, _, err = run_cli(capsys, "train", "--model-override", "embed_dim=30", "--out", out, "--no-progress")
    assert_one_line_error(code, err, "embed_dim 30 is not divisible by num_heads 4")
    assert not out.exists()  # nothing written by runs that never started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes_without_images", "empty"]
