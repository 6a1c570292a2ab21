"""``iared predict`` and its one-call Python equivalent, ``iared.predict`` (issue 26).

Real inputs where they matter: the shared ImageNet photos (sizes vary, 4 are grayscale) with a
random-weight DeiT-S, and the real Kinetics clip with a random-weight TimeSformer (small geometry:
the clip, its decoding and frame sampling are what is real here).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import iared
from iared.models import create_model
from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed, save_pruned
from iared.train.backbone import export_weights
from tests.helpers import json_lines
from tests.helpers import run_cli as run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = DATA / "imagenet-sample"
CLIP = DATA / "video" / "kinetics400_demo.mp4"
RGB_TINY = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 10, "embed_dim": 24, "depth": 3,
            "num_heads": 2}


def check_top_k(result: dict, k: int, num_classes: int) -> None:
    probs = [c["probability"] for c in result["top_k"]]
    assert len(probs) == k and probs == sorted(probs, reverse=True), result
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
    assert all(0 <= c["index"] < num_classes for c in result["top_k"])


@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = IARed(VisionTransformer(ViTConfig(**RGB_TINY))).eval()
    with torch.no_grad():  # interpreter scores spread around 0.5, so tokens are really dropped
        for p in model.interpreters.parameters():
            p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("pruned") / "tiny_pruned.pt"
    save_pruned(model, path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three small photos of different sizes, one grayscale, in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    torch.manual_seed(0)
    for name, size, mode in (("a.png", (48, 40), "RGB"), ("b.jpg", (32, 32), "RGB"), ("c.png", (20, 50), "L")):
        pixels = (torch.rand(size[1], size[0], 3) * 255).byte().numpy()
        Image.fromarray(pixels).convert(mode).save(folder / name)
    return folder


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real ImageNet sample not present at {SAMPLE}")
def test_imagenet_photos_with_a_random_deit_s(tmp_path, capsys):
    """One line per photo (grayscale JPEGs included), ImageNet labels, and the probabilities are
    the model's own on the evaluation view of each photo."""
    from timm.data import ImageNetInfo

    from iared.data import eval_transform, load_image
    from iared.loading import load_backbone

    torch.manual_seed(0)
    weights = export_weights(create_model("deit_small_patch16_224"), tmp_path / "deit_s_random.pt")
    report = tmp_path / "predictions.jsonl"
    code, _, err = run(capsys, "predict", SAMPLE, "--checkpoint", weights, "--json", report, "--batch-size", 30,
                       "--device", "cpu")
    assert code == 0, err
    results = json_lines(report.read_text())
    photos = sorted(SAMPLE.rglob("*.JPEG"))
    assert [r["input"] for r in results] == [str(p) for p in photos]
    info = ImageNetInfo()
    for r in results:
        check_top_k(r, 5, 1000)
        assert all(c["label"] == info.index_to_description(c["index"]) for c in r["top_k"])
        assert "kept_fraction" not in r  # a backbone: nothing is pruned
    net = load_backbone(weights).eval()
    cfg = net.cfg
    with torch.no_grad():
        x = eval_transform(cfg.img_size, cfg.mean, cfg.std)(load_image(photos[0]))[None]
        probs = net(x).softmax(-1)[0]
    best = results[0]["top_k"][0]
    assert best["index"] == int(probs.argmax()) and math.isclose(best["probability"], float(probs.max()), rel_tol=1e-4)
    assert "inputs resized from" in err and "to the model's 224x224 input" in err


def test_python_call_returns_what_the_command_prints(tmp_path, tiny_pruned, photos, capsys):
    code, out, err = run(capsys, "predict", photos, photos / "a.png", "--checkpoint", tiny_pruned, "--top-k", 3,
                         "--device", "cpu", "--batch-size", 2)
    assert code == 0, err
    lines = json_lines(out)
    assert lines == iared.predict(tiny_pruned, [photos, photos / "a.png"], top_k=3, device="cpu")
    assert [Path(r["input"]).name for r in lines] == ["a.png", "b.jpg", "c.png", "a.png"]
    assert lines[0] == lines[3]  # the same photo in another batch: the same answer
    for r in lines:
        check_top_k(r, 3, 10)
        assert r["top_k"][0]["label"] is None  # random weights, no task: no class names to give
        assert len(r["kept_fraction"]) == 3 and all(0 <= v <= 1 for v in r["kept_fraction"])
        assert 0 < r["macs"] < r["macs_unpruned"]
    # the 32x32 photo is used whole, the two others are resized: one warning line, from what to what
    (note,) = [line for line in err.splitlines() if "resized" in line]
    assert "2 of 3 inputs resized from 48x40, 20x50 to the model's 32x32 input" in note  # distinct files


def test_default_model_is_the_shipped_digits_natural_one(photos, capsys):
    code, out, err = run(capsys, "predict", photos / "b.jpg", "--top-k", 10, "--device", "cpu")
    assert code == 0, err
    (result,) = json_lines(out)
    check_top_k(result, 10, 10)
    assert sorted(c["label"] for c in result["top_k"]) == [str(d) for d in range(10)]
    assert f"{photos / 'b.jpg'}: resized from 32x32 to the model's 64x64 input" in err


@pytest.mark.skipif(not CLIP.is_file(), reason=f"real Kinetics clip not present at {CLIP}")
def test_the_real_kinetics_clip_with_a_random_timesformer(tmp_path, capsys):
    from iared.data.video import probe_video, sample_indices

    torch.manual_seed(0)
    cfg = TimeSformerConfig(img_size=64, patch_size=16, num_frames=4, num_classes=400, embed_dim=48, depth=3,
                            num_heads=2)
    save_pruned(IARed(TimeSformer(cfg), interpreter_heads=2).eval(), tmp_path / "tsf_pruned.pt")
    code, out, err = run(capsys, "predict", CLIP, "--checkpoint", tmp_path / "tsf_pruned.pt", "--device", "cpu")
    assert code == 0, err
    (result,) = json_lines(out)
    assert result["input"] == str(CLIP)
    check_top_k(result, 5, 400)
    assert result["frames"] == sample_indices(probe_video(CLIP).frames, 4)  # one clip over the whole video
    assert len(result["kept_fraction"]) == 3 and 0 < result["macs"] <= result["macs_unpruned"]
    assert f"{CLIP}: resized from 340x256 to the model's 64x64 input" in err
    # an image model given the clip: one line naming it
    code, _, err = run(capsys, "predict", CLIP, "--device", "cpu")
    assert code == 2 and err.strip().count("\n") == 0 and str(CLIP) in err and "takes images" in err


def test_explain_writes_the_interpreter_heatmap_of_each_input(tmp_path, tiny_pruned, photos, capsys):
    out_dir = tmp_path / "heatmaps"
    code, out, err = run(capsys, "predict", photos, "--checkpoint", tiny_pruned, "--explain", out_dir,
                         "--device", "cpu")
    assert code == 0, err
    results = json_lines(out)
    assert [Path(r["explanation"]).name for r in results] == ["a.png", "b.png", "c.png"]
    for r in results:
        with Image.open(r["explanation"]) as panel:
            assert panel.format == "PNG"
    backbone = export_weights(VisionTransformer(ViTConfig(**RGB_TINY)), tmp_path / "backbone.pt")
    code, _, err = run(capsys, "predict", photos, "--checkpoint", backbone, "--explain", tmp_path / "none")
    assert code == 2 and err.strip().count("\n") == 0 and "--explain" in err and "backbone" in err
    assert not (tmp_path / "none").exists()


def test_bad_inputs_end_in_one_line_naming_them(tmp_path, tiny_pruned, photos, capsys):
    (tmp_path / "empty").mkdir()
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    for argv, named in (
        ([tmp_path / "missing.jpg"], tmp_path / "missing.jpg"),
        ([photos / "a.png", tmp_path / "empty"], tmp_path / "empty"),
        ([photos], photos / "broken.jpg"),
        ([photos / "a.png", "--top-k", 0], "--top-k"),
        ([photos / "a.png", "--threshold", 1.5], "1.5"),
    ):
        code, out, err = run(capsys, "predict", *argv, "--checkpoint", tiny_pruned, "--device", "cpu")
        assert code == 2, (argv, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err and str(named) in err, err
