"""``iared explain`` / ``iared explain-eval`` on a tiny saved pruned checkpoint, and their input errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from iared import cli
from iared.data import DigitsClutter
from iared.explain import cli as explain_cli
from iared.explain.cli import load_mask, load_model_input, pair_folders
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def digits_samples():
    data = DigitsClutter("test", length=3)
    return [data[i] for i in range(3)]


def write_pairs(root, samples, names=None, rgb_every=2):
    """Images (grayscale, or RGB at twice the size every other one) and 0/255 or 0/1 masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i, (image, _, mask) in enumerate(samples):
        name = names[i] if names else f"sample{i}"
        img = Image.fromarray((image[0].numpy() * 255).astype(np.uint8))
        msk = Image.fromarray(mask.numpy().astype(np.uint8) * (255 if i % 2 else 1))
        if i % rgb_every == 1:
            img, msk = img.convert("RGB").resize((128, 128)), msk.resize((128, 128), Image.NEAREST)
        img.save(root / "images" / f"{name}.png")
        msk.save(root / "masks" / f"{name}.png")
    return root / "images", root / "masks"


def test_explain_writes_one_panel_per_image(tmp_path, tiny_checkpoint, digits_samples, capsys):
    images, _ = write_pairs(tmp_path, digits_samples)
    (images / "nested").mkdir()
    Image.open(images / "sample1.png").save(images / "nested" / "deep.jpg")  # RGB JPEG -> grayscale
    out = tmp_path / "panels"
    code, _, err = run(["explain", images, "--checkpoint", tiny_checkpoint, "--out", out], capsys)
    assert code == 0, err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["nested__deep.png", "sample0.png", "sample1.png", "sample2.png"]
    assert all(Image.open(out / name).size[0] > 500 for name in written)  # a real multi-panel figure
    # a single file, a subset of methods, an output folder inside the input folder
    code, _, err = run(["explain", images / "sample0.png", "--checkpoint", tiny_checkpoint,
                             "--out", images / "out", "--methods", "interpreter:1", "chefer"], capsys)
    assert code == 0, err
    assert (images / "out" / "sample0.png").is_file()


def test_explain_stops_on_a_corrupt_image_before_writing_anything(tmp_path, tiny_checkpoint, digits_samples,
                                                                  capsys):
    images, _ = write_pairs(tmp_path, digits_samples)
    (images / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "panels"
    code, _, err = run(["explain", images, "--checkpoint", tiny_checkpoint, "--out", out], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "broken.png" in err
    assert not out.exists()


def test_default_checkpoint_is_the_shipped_one_or_a_clear_error(tmp_path, tiny_checkpoint, digits_samples,
                                                                 monkeypatch, capsys):
    images, _ = write_pairs(tmp_path, digits_samples[:1])
    # the default task is digits-natural; digits-clutter keeps its own shipped model
    assert explain_cli.default_checkpoint_path().name == "digits_natural_pruned.pt"
    assert explain_cli.default_checkpoint_path("digits-clutter").name == "digits_pruned.pt"
    monkeypatch.setattr(explain_cli, "default_checkpoint_path",
                        lambda task=None: tmp_path / "missing" / "digits_pruned.pt")
    code, _, err = run(["explain", images, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--checkpoint" in err and "digits_pruned.pt" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr(explain_cli, "default_checkpoint_path", lambda task=None: tiny_checkpoint)
    code, _, err = run(["explain", images, "--out", tmp_path / "o", "--methods", "interpreter"], capsys)
    assert code == 0, err


def test_explain_eval_on_digits_prints_table_writes_json_and_chart(tmp_path, tiny_checkpoint, capsys):
    report = tmp_path / "r" / "explain.json"
    code, stdout, err = run(["explain-eval", "--checkpoint", tiny_checkpoint, "--limit", 3, "--batch-size", 2,
                             "--steps", 4, "--json", report, "--quiet"], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    methods = ["interpreter", "interpreter:0", "interpreter:1", "interpreter:2", "raw-attention", "rollout",
               "gradcam", "chefer", "random"]
    assert list(results["methods"]) == methods
    assert results["n"] == 3 and results["data"] == "digits-clutter test"
    for name, scores in results["methods"].items():
        for metric in ("pixel_accuracy", "miou", "map", "pointing", "deletion", "insertion"):
            assert 0.0 <= scores[metric] <= 1.0, (name, metric)
        assert name in stdout
    assert "mIoU" in stdout and "pixAcc" in stdout
    assert Image.open(report.with_suffix(".png")).format == "PNG"


def test_explain_eval_on_folder_pairs(tmp_path, tiny_checkpoint, digits_samples, capsys):
    images, masks = write_pairs(tmp_path, digits_samples)
    report, chart = tmp_path / "pairs.json", tmp_path / "chart.png"
    code, _, err = run(["explain-eval", "--checkpoint", tiny_checkpoint, "--images", images, "--masks", masks,
                             "--methods", "interpreter", "random", "--steps", 2, "--json", report, "--plot", chart,
                             "--quiet"], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    assert results["n"] == 3 and list(results["methods"]) == ["interpreter", "random"]
    assert chart.is_file()


def test_mismatched_image_and_mask_folders_name_the_unpaired_files(tmp_path, tiny_checkpoint, digits_samples,
                                                                   capsys):
    images, masks = write_pairs(tmp_path, digits_samples, names=["cat", "dog", "owl"])
    (masks / "owl.png").rename(masks / "owl_mask.png")
    (masks / "dog.png").unlink()
    with pytest.raises(ValueError) as info:
        pair_folders(images, masks)
    message = str(info.value)
    assert "images without a mask" in message and "dog, owl" in message
    assert "masks without an image" in message and message.endswith(": owl_mask")
    report = tmp_path / "r.json"
    code, _, err = run(["explain-eval", "--checkpoint", tiny_checkpoint, "--images", images, "--masks", masks,
                             "--json", report, "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dog, owl" in err
    assert not report.exists() and not report.with_suffix(".png").exists()


def test_folder_input_errors_are_one_line_and_write_nothing(tmp_path, tiny_checkpoint, digits_samples, capsys):
    images, masks = write_pairs(tmp_path, digits_samples)
    report = tmp_path / "r.json"
    base = ["explain-eval", "--checkpoint", tiny_checkpoint, "--json", report, "--quiet"]
    code, _, err = run([*base, "--images", images, "--masks", tmp_path / "nowhere"], capsys)
    assert code == 2 and "mask folder not found" in err and "nowhere" in err
    code, _, err = run([*base, "--images", images], capsys)
    assert code == 2 and "--masks" in err
    (masks / "sample0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("L", (50, 60)).save(masks / "sample2.png")
    code, _, err = run([*base, "--images", images, "--masks", masks], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sample0.png" in err and "sample2.png" in err and "50x60" in err
    assert not report.exists()


def test_inputs_are_converted_to_the_models_channels_and_masks_binarised(tmp_path, model):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(gray)
    assert load_model_input(gray, model).shape == (1, 64, 64)
    rgb_model = IARed(VisionTransformer(ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=2,
                                                  embed_dim=24, depth=3, num_heads=2)))
    x = load_model_input(gray, rgb_model)  # grayscale -> RGB, resized for a 3-channel model
    cfg = rgb_model.backbone.cfg
    pixels = x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)
    assert x.shape == (3, 32, 32) and torch.allclose(pixels, torch.full_like(pixels, 200 / 255), atol=1e-3)
    for value in (1, 255, 200):  # 0/1, 0/255 and 0/200 masks
        arr = np.zeros((4, 4), np.uint8)
        arr[1:3, 1:3] = value
        Image.fromarray(arr).save(tmp_path / "m.png")
        assert load_mask(tmp_path / "m.png").sum() == 4
    red = np.zeros((4, 4, 3), np.uint8)
    red[0, 0] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    assert load_mask(tmp_path / "red.png", size=8).sum() == 4  # colour masks count, resized nearest


def test_explain_eval_reads_the_task_the_model_fits(tmp_path, tiny_checkpoint, capsys):
    """An RGB 64x64 model is explained on digits-natural's test split with its digit masks; asking a
    one-channel model for digits-natural is refused in one line before any work."""
    from safetensors.torch import save_file

    from iared.models import create_model

    torch.manual_seed(0)
    weights = tmp_path / "natural_vit.safetensors"  # random weights in the shipped format
    save_file(create_model("digits_natural_vit").state_dict(), str(weights))
    report = tmp_path / "natural.json"
    code, stdout, err = run(["explain-eval", "--model", "digits_natural_vit", "--checkpoint", weights,
                             "--limit", 2, "--batch-size", 2,
                             "--steps", 2, "--methods", "interpreter", "raw-attention", "--json", report,
                             "--quiet"], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    assert results["n"] == 2 and results["data"] == "digits-natural test"
    assert list(results["methods"]) == ["interpreter", "raw-attention"]
    code, _, err = run(["explain-eval", "--checkpoint", tiny_checkpoint, "--task", "digits-natural", "--limit", 2,
                        "--quiet"], capsys)
    assert code != 0 and "digits-natural" in err and "input channel" in err and len(err.strip().splitlines()) == 1
