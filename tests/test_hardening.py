"""Issue #10, item by item: what a hostile but ordinary user did, and what must happen instead.

Every test here failed before the fix it names. Errors are checked through the real command line
(``iared.cli.main``): exit status, exactly one line on stderr, the offending input named in it.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iared.cli import main as cli_main
from iared.models import create_model
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed, save_pruned

TINY = ["--model", "digits_vit", "--model-override", "depth=1", "--model-override", "embed_dim=32",
        "--model-override", "num_heads=2"]
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
DIGITS_TINY = {"img_size": 64, "patch_size": 8, "in_chans": 1, "num_classes": 10, "embed_dim": 24, "depth": 3,
               "num_heads": 2, "mean": (0.0,), "std": (1.0,)}


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *needles) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def strict_json_lines(path: Path) -> list[dict]:
    """Parse as JSON proper: Python's json module accepts bare NaN / Infinity, JSON does not."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pruned") / "tiny_pruned.pt"
    save_pruned(IARed(VisionTransformer(ViTConfig(**DIGITS_TINY))).eval(), path)
    return path


# -- 1. a diverging run keeps its last good checkpoint ----------------------------------------------


def test_nan_loss_at_step_k_stops_the_run_and_keeps_the_checkpoint_from_before(tmp_path, capsys, monkeypatch):
    from iared.train import backbone

    k, calls = 5, []
    real = backbone.classification_loss

    def loss_nan_at_step_k(logits, labels, smoothing):
        calls.append(1)
        loss = real(logits, labels, smoothing)
        return loss * float("nan") if len(calls) == k else loss

    monkeypatch.setattr(backbone, "classification_loss", loss_nan_at_step_k)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *TINY, "--batch-size", 8, "--steps", 8, "--save-every", 2, "--val-size", 8,
                       "--eval-every", 0, "--no-progress", "--out", out)
    assert code == 1
    one_line(err, f"step {k}", "nan", f"last good checkpoint: {out / 'checkpoint.pt'} (step 4)")
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4  # the one written before step k, not overwritten
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    records = strict_json_lines(out / "log.jsonl")
    assert records[-1]["step"] <= 4 and records[0]["event"] == "start"


def test_max_bad_steps_skips_a_bounded_number_and_logs_null(tmp_path, capsys, monkeypatch):
    from iared.train import backbone

    calls = []
    real = backbone.classification_loss

    def loss_nan_at_steps_2_and_3(logits, labels, smoothing):
        calls.append(1)
        loss = real(logits, labels, smoothing)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(backbone, "classification_loss", loss_nan_at_steps_2_and_3)
    out = tmp_path / "run"
    base = ["train", *TINY, "--batch-size", 8, "--steps", 4, "--val-size", 8, "--eval-every", 0, "--log-every", 1,
            "--no-progress", "--out", out]
    code, _, err = run(capsys, *base, "--max-bad-steps", 1)
    assert code == 1 and "step 3" in err and "1 bad steps skipped before" in err
    calls.clear()
    code, _, err = run(capsys, *base, "--max-bad-steps", 2)
    assert code == 0, err
    bad = [r for r in strict_json_lines(out / "log.jsonl") if r["event"] == "bad_step"]
    assert [r["step"] for r in bad][-2:] == [2, 3] and bad[-1]["loss"] is None  # null, not NaN


def test_interpreter_training_nan_keeps_the_state_from_before(tmp_path, capsys, monkeypatch):
    from iared.train import interpreters

    k, calls = 3, []
    real = interpreters.policy_gradient_loss

    def nan_at_call_k(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == k else loss

    monkeypatch.setattr(interpreters, "policy_gradient_loss", nan_at_call_k)
    backbone_file = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    net = VisionTransformer(ViTConfig(**DIGITS_TINY))
    torch.save({"model": net.state_dict(), "config": {"model": net.cfg.to_dict()}}, backbone_file)
    out = tmp_path / "interp"
    code, _, err = run(capsys, "train-interpreters", "--checkpoint", backbone_file, "--steps-per-stage", 2,
                       "--batch-size", 4, "--eval-samples", 4, "--eval-every", 1, "--save-every", 1,
                       "--interpreter-heads", 2, "--quiet", "--out", out)
    assert code == 1
    one_line(err, "stage 2 step 1", "nan", "train_state.pt (stage 2 step 0)")
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert (state["stage"], state["step"]) == (1, 0)
    strict_json_lines(out / "log.jsonl")
    assert not (out / "pruned.pt").exists()


# -- 2. non-finite weights and pixels are refused --------------------------------------------------


def test_non_finite_checkpoint_is_refused_naming_the_file_and_tensor(tiny_pruned, tmp_path, capsys):
    obj = torch.load(tiny_pruned, map_location="cpu", weights_only=True)
    key = next(k for k in obj["model"] if "blocks.0" in k and k.endswith("weight"))
    obj["model"][key] = obj["model"][key].clone()
    obj["model"][key][0] = float("nan")
    bad = tmp_path / "nan_pruned.pt"
    torch.save(obj, bad)
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "img.png")
    for argv in (["eval", "--checkpoint", bad, "--limit", 4],
                 ["export", "--checkpoint", bad, tmp_path / "x.onnx", "--keep", 0.5],
                 ["explain", tmp_path, "--checkpoint", bad, "--out", tmp_path / "panels"]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        one_line(err, "bad checkpoint", bad, "non-finite", key)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "panels").exists()


def test_float_tiff_with_nan_pixels_is_refused_naming_the_file(tmp_path):
    from iared.data import BadImageError, load_image

    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[2, 3] = np.nan
    path = tmp_path / "float.tiff"
    Image.fromarray(pixels, mode="F").save(path)
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert str(path) in str(info.value) and "non-finite" in str(info.value)
    pixels[2, 3] = np.inf
    Image.fromarray(pixels, mode="F").save(path)
    with pytest.raises(BadImageError):
        load_image(path)


# -- 3. output paths are checked before the work -----------------------------------------------------


def test_output_paths_fail_in_one_line_before_any_work(tmp_path, tiny_pruned, capsys, monkeypatch):
    from iared.explain import cli as explain_lib

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    unwritable = Path("/proc/iared-cannot-write-here")  # not even root can create files in /proc

    def never(*a, **kw):
        raise AssertionError("the evaluation started although its output path is bad")

    monkeypatch.setattr(explain_lib, "evaluate_methods", never)
    cases = [
        (["explain-eval", "--checkpoint", tiny_pruned, "--json", a_dir, "--quiet"], a_dir, "is a directory"),
        (["explain-eval", "--checkpoint", tiny_pruned, "--json", a_file / "r.json"], a_file, "is a file"),
        (["export", "--checkpoint", tiny_pruned, a_dir, "--keep", 0.5], a_dir, "is a directory"),
        (["export", "--checkpoint", tiny_pruned, a_file / "m.onnx", "--keep", 0.5], a_file, "is a file"),
        (["export", "--checkpoint", tiny_pruned, unwritable / "m.onnx", "--keep", 0.5], unwritable, "not writable"),
        (["explain", tmp_path, "--checkpoint", tiny_pruned, "--out", a_file], a_file, "is a file"),
        (["train", *TINY, "--out", a_file, "--no-progress"], a_file, "is a file"),
        (["train", *TINY, "--out", unwritable / "run", "--no-progress"], unwritable, "not writable"),
        (["train", *TINY, "--out", tmp_path / "run", "--export", a_dir, "--no-progress"], a_dir, "is a directory"),
        (["bench", "--quick", "--json", a_dir], a_dir, "is a directory"),
    ]
    for argv, named, problem in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        one_line(err, named, problem)
    assert not (tmp_path / "run").exists()


# -- 4. folders adapt to the model's channels; empty classes are an error -----------------------


def _rgb_folder(root: Path, classes=("a", "b"), per_class=3, size=40) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_rgb_folder_with_the_one_channel_default_model(tmp_path, capsys):
    folder = _rgb_folder(tmp_path / "rgb")
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *TINY, "--task", folder, "--steps", 1, "--batch-size", 2, "--eval-every", 0,
                       "--no-progress", "--out", out)
    assert code == 0, err
    assert err.count("converted to grayscale") == 1  # said once, however many images
    code, out_text, err = run(capsys, "eval", "--checkpoint", out / "checkpoint.pt", "--task", folder, "--json")
    assert code == 0, err
    assert json.loads(out_text)["n"] == 6
    (folder / "empty").mkdir()
    code, _, err = run(capsys, "eval", "--checkpoint", out / "checkpoint.pt", "--task", folder)
    assert code == 2
    one_line(err, folder, "without images: empty")


# -- 5. export: the requested opset, no tracebacks, failures name the stage -------------------------


def test_export_writes_the_requested_opset_quietly(tiny_pruned, tmp_path, capfd, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    capfd.readouterr()
    assert cli_main(["export", "--checkpoint", str(tiny_pruned), str(path), "--keep", "0.5", "--check"]) == 0
    out, err = capfd.readouterr()  # file-descriptor level: loggers that hold the real stderr too
    assert "Traceback" not in err and "Warning" not in err and "[torch.onnx]" not in out + err, err
    assert err.strip().splitlines() == [f"wrote {path} (opset 17)", err.strip().splitlines()[-1]]
    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()

    from onnx import version_converter

    def broken(*a, **kw):
        raise RuntimeError("adapter failed\nwith a second line")

    monkeypatch.setattr(version_converter, "convert_version", broken)
    capfd.readouterr()
    assert cli_main(["export", "--checkpoint", str(tiny_pruned), str(tmp_path / "n.onnx"), "--keep", "0.5"]) == 1
    _, err = capfd.readouterr()
    one_line(err, "stage opset", "adapter failed", "--opset 18")
    assert not (tmp_path / "n.onnx").exists()


# -- 6. every checkpoint problem is one line naming the file -------------------------------------


def test_checkpoint_config_problems_directories_and_pickles(tiny_pruned, tmp_path, capsys):
    obj = torch.load(tiny_pruned, map_location="cpu", weights_only=True)
    unknown = tmp_path / "unknown_key.pt"
    torch.save({**obj, "config": {**obj["config"], "model": {**obj["config"]["model"], "flash": True}}}, unknown)
    invalid = tmp_path / "invalid.pt"
    torch.save({**obj, "config": {**obj["config"], "model": {**obj["config"]["model"], "num_heads": 5}}}, invalid)
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return os.system, ("true",)

    import pickle

    evil.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "img.png")
    for argv, named, problem in [
        (["eval", "--checkpoint", unknown, "--limit", 2], unknown, "unknown keys [flash]"),
        (["eval", "--checkpoint", invalid, "--limit", 2], invalid, "not divisible by num_heads 5"),
        (["eval", "--checkpoint", tmp_path, "--limit", 2], tmp_path, "is a directory"),
        (["explain", tmp_path, "--checkpoint", tmp_path, "--out", tmp_path / "o"], tmp_path, "is a directory"),
        (["eval", "--checkpoint", evil, "--limit", 2], evil, "unsupported GLOBAL posix.system"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        line = one_line(err, named, problem)
        if named == evil:  # torch's refusal, whole: not cut mid-sentence at a character count
            assert line.endswith("whose module posix is blocked"), line


# -- 7. degenerate masks: undefined, with a warning ---------------------------------------------


def test_all_zero_masks_give_undefined_metrics_with_a_warning(tiny_pruned, tmp_path, capsys):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png")
        Image.new("L", (64, 64), 0).save(tmp_path / "masks" / f"{i}.png")
    report = tmp_path / "r.json"
    code, out, err = run(capsys, "explain-eval", "--checkpoint", tiny_pruned, "--images", tmp_path / "images",
                         "--masks", tmp_path / "masks", "--methods", "interpreter", "--steps", 2, "--json", report,
                         "--quiet")
    assert code == 0, err
    assert err.count("every mask is all background") == 1 and "undefined" in err
    scores = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    scores = scores["methods"]["interpreter"]
    assert scores["miou"] is None and scores["map"] is None and scores["pointing"] is None
    assert 0 <= scores["pixel_accuracy"] <= 1


# -- 8. every file gets the usual permissions ----------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_explain_outputs_get_the_usual_mode(tiny_pruned, tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "img.png")
    code, _, err = run(capsys, "explain", tmp_path / "img.png", "--checkpoint", tiny_pruned, "--out",
                       tmp_path / "panels", "--methods", "interpreter")
    assert code == 0, err
    report = tmp_path / "r.json"
    code, _, err = run(capsys, "explain-eval", "--checkpoint", tiny_pruned, "--limit", 2, "--batch-size", 2,
                       "--methods", "random", "--steps", 2, "--json", report, "--quiet")
    assert code == 0, err
    want = 0o666 & ~_umask()
    for path in (tmp_path / "panels" / "img.png", report, report.with_suffix(".png")):
        assert stat.S_IMODE(path.stat().st_mode) == want, path


# -- entry points and the shipped defaults ------------------------------------------------------


def test_python_dash_m_iared(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "iared", "eval", "--checkpoint", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    one_line(proc.stderr, "iared eval: error: bad checkpoint", tmp_path, "is a directory")


def test_library_never_imports_commands():
    src = Path(__file__).resolve().parents[1] / "src" / "iared"
    offenders = []
    for path in src.rglob("*.py"):
        if "commands" in path.parts or path.name in ("cli.py", "__main__.py") and path.parent == src:
            continue
        imports = re.compile(r"^\s*(import argparse|from iared\.commands|import iared\.commands|from iared import commands)",
                             re.MULTILINE)
        if imports.search(path.read_text()):
            offenders.append(str(path.relative_to(src)))
    assert not offenders, offenders


# -- the real user's path: an official DeiT checkpoint and an ImageNet folder ----------------------


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real ImageNet sample not present at {SAMPLE}")
def test_official_deit_checkpoint_on_an_imagenet_folder(tmp_path, capsys):
    from timm.data import ImageNetInfo

    torch.manual_seed(0)
    deit = create_model("deit_tiny_patch16_224")
    # a head that ignores the image and always answers the last folder's class: with the standard
    # labels exactly one of the 60 images is right; renumbered 0..59 labels could never reach it
    wnids = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    target = ImageNetInfo().label_names().index(wnids[-1])
    assert target >= len(wnids)
    with torch.no_grad():
        deit.head.weight.zero_()
        deit.head.bias.zero_()
        deit.head.bias[target] = 10.0
    weights = tmp_path / "deit_tiny_patch16_224-random.pth"
    torch.save({"model": deit.state_dict()}, weights)  # the official layout: no config inside

    out = tmp_path / "interp"
    code, _, err = run(capsys, "train-interpreters", "--task", SAMPLE, "--model", "deit_tiny_patch16_224",
                       "--checkpoint", weights, "--steps-per-stage", 1, "--batch-size", 2, "--eval-samples", 2,
                       "--eval-every", 1, "--save-every", 1, "--quiet", "--out", out)
    assert code == 0, err
    assert (out / "pruned.pt").is_file()
    code, text, err = run(capsys, "eval", "--model", "deit_tiny_patch16_224", "--checkpoint", weights,
                          "--task", SAMPLE, "--batch-size", 30, "--json")
    assert code == 0, err
    result = json.loads(text)
    assert result["n"] == len(wnids) and math.isclose(result["top1"], 1 / len(wnids))
    # without --model the geometry comes from the weights
    code, text, err = run(capsys, "eval", "--checkpoint", weights, "--task", SAMPLE, "--limit", 2, "--json")
    assert code == 0, err
