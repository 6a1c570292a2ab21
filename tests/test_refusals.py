"""Issue 26's silent nonsense, case by case: each now ends in one line naming the input (exit 2),
or goes on with a one-line warning where going on is reasonable.

Checked through the real command line (``iared.cli.main``), as a user meets them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from iared.cli import main as cli_main
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed, load_pruned, save_pruned
from iared.train.backbone import export_weights

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"
TINY = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 10, "embed_dim": 24, "depth": 3,
        "num_heads": 2}
TINY_ARGS = ["--model", "digits_vit", "--model-override", "depth=1", "--model-override", "embed_dim=32",
             "--model-override", "num_heads=2"]


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, err: str, *needles) -> None:
    """Exit 2 and one line (the last: a deprecation note may come first) naming what is wrong."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[-1], (needle, err)


def warned(err: str, *needles) -> str:
    (line,) = [line for line in err.splitlines() if all(str(n) in line for n in needles)]
    return line


def tiny(tmp_path: Path, name: str = "pruned.pt", **cfg) -> Path:
    torch.manual_seed(0)
    save_pruned(IARed(VisionTransformer(ViTConfig(**{**TINY, **cfg}))).eval(), tmp_path / name)
    return tmp_path / name


def photo(path: Path, size=(48, 40), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (torch.rand(size[1], size[0], 3) * 255).byte().numpy()
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def class_folder(root: Path, classes, size=(32, 32)) -> Path:
    for c in classes:
        for i in range(2):
            photo(root / c / f"{i}.png", size)
    return root


# -- inputs that do not fit the model ----------------------------------------------------------------


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real ImageNet sample not present at {SAMPLE}")
def test_explain_on_imagenet_photos_with_the_default_64px_model_says_it_resizes(tmp_path, capsys):
    folder = SAMPLE / "n01675722"  # one photo
    (image,) = folder.iterdir()
    with Image.open(image) as im:
        w, h = im.size
    code, _, err = run(capsys, "explain", folder, "--out", tmp_path / "panels", "--methods", "interpreter")
    assert code == 0, err
    warned(err, str(image), f"resized from {w}x{h} to the model's 64x64 input")
    assert len(list((tmp_path / "panels").glob("*.png"))) == 1


def test_channels_an_image_cannot_feed_are_refused_naming_the_photo(tmp_path, capsys):
    image = photo(tmp_path / "in" / "cat.png")
    two_channels = tiny(tmp_path, "two.pt", in_chans=2, mean=(0.0, 0.0), std=(1.0, 1.0))
    code, _, err = run(capsys, "explain", image, "--checkpoint", two_channels, "--out", tmp_path / "o")
    refused(code, err, image, "2-channel")
    code, _, err = run(capsys, "predict", image, "--checkpoint", two_channels, "--device", "cpu")
    refused(code, err, image, "2-channel")
    # one channel can be made from a colour photo: done, and said
    one_channel = tiny(tmp_path, "one.pt", in_chans=1, mean=(0.0,), std=(1.0,))
    code, _, err = run(capsys, "explain", image, "--checkpoint", one_channel, "--out", tmp_path / "o",
                       "--methods", "interpreter")
    assert code == 0, err
    warned(err, "1 colour input(s) converted to grayscale for the model's 1 input channel", image)


# -- fresh interpreters ------------------------------------------------------------------------------


def test_a_backbone_without_interpreters_is_refused_by_explain_and_export(tmp_path, capsys):
    backbone = export_weights(VisionTransformer(ViTConfig(**TINY)), tmp_path / "backbone.pt")
    image = photo(tmp_path / "in" / "a.png", (32, 32))
    code, _, err = run(capsys, "explain", image, "--checkpoint", backbone, "--out", tmp_path / "panels")
    refused(code, err, backbone, "untrained", "--allow-untrained")
    assert not (tmp_path / "panels").exists()
    code, _, err = run(capsys, "export", "--checkpoint", backbone, tmp_path / "m.onnx", "--keep", 0.5)
    refused(code, err, backbone, "untrained", "--allow-untrained")
    assert not (tmp_path / "m.onnx").exists()
    # said explicitly, it is the user's choice (attention maps of a backbone are still worth seeing)
    code, _, err = run(capsys, "explain", image, "--checkpoint", backbone, "--out", tmp_path / "panels",
                       "--methods", "raw-attention", "--allow-untrained")
    assert code == 0, err
    assert (tmp_path / "panels" / "a.png").is_file()


# -- thresholds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_thresholds_outside_0_1_are_refused(tmp_path, capsys, value):
    pruned = tiny(tmp_path)
    image = photo(tmp_path / "in" / "a.png", (32, 32))
    for argv in (["explain", image, "--checkpoint", pruned, "--out", tmp_path / "o", "--threshold", value],
                 ["predict", image, "--checkpoint", pruned, "--threshold", value],
                 ["eval", "--checkpoint", pruned, "--task", class_folder(tmp_path / "data", "ab"),
                  "--threshold", value],
                 ["train-interpreters", "--model", "digits_vit", "--pretrained", "--threshold", value,
                  "--out", tmp_path / "r"]):
        code, _, err = run(capsys, *argv)
        refused(code, err, f"--threshold {value}", "[0, 1]")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


# -- dataset folders ---------------------------------------------------------------------------------


def test_a_folder_without_val_warns_that_validation_reads_the_training_images(tmp_path, capsys):
    flat = class_folder(tmp_path / "flat", [str(d) for d in range(10)])
    backbone = export_weights(VisionTransformer(ViTConfig(**TINY)), tmp_path / "backbone.pt")
    code, _, err = run(capsys, "eval", "--checkpoint", backbone, "--task", flat, "--split", "val")
    assert code == 0, err
    warned(err, f"{flat} has no val/ folder", "the same images training reads")
    # with some split folders but not this one, the split folders are not read as classes
    split = class_folder(tmp_path / "split" / "train", [str(d) for d in range(10)]).parent
    code, _, err = run(capsys, "eval", "--checkpoint", backbone, "--task", split, "--split", "val")
    refused(code, err, split, "has train/ but no val/")


def test_a_flat_folder_of_videos_is_described_as_videos(tmp_path, capsys):
    flat = tmp_path / "clips"
    flat.mkdir()
    for name in ("a.mp4", "b.avi"):  # the layout is refused before any file is decoded
        (flat / name).write_bytes(b"\0")
    backbone = export_weights(VisionTransformer(ViTConfig(**TINY)), tmp_path / "backbone.pt")
    code, _, err = run(capsys, "eval", "--checkpoint", backbone, "--task", flat)
    refused(code, err, flat, "holds 2 videos directly, not in class folders", "<class>/<video>")
    mixed = class_folder(tmp_path / "mixed", "ab")
    (mixed / "b" / "clip.mp4").write_bytes(b"\0")
    code, _, err = run(capsys, "eval", "--checkpoint", backbone, "--task", mixed)
    refused(code, err, mixed, "mixes 4 images and 1 videos")


def test_a_head_smaller_than_the_folders_classes_is_one_line(tmp_path, capsys):
    backbone = export_weights(VisionTransformer(ViTConfig(**TINY)), tmp_path / "backbone.pt")
    twelve = class_folder(tmp_path / "twelve", [f"c{i:02d}" for i in range(12)])
    code, _, err = run(capsys, "eval", "--checkpoint", backbone, "--task", twelve)
    refused(code, err, twelve, "12 classes", "10-class head")
    code, _, err = run(capsys, "train-interpreters", "--checkpoint", backbone, "--task", twelve, "--out",
                       tmp_path / "r", "--quiet")
    refused(code, err, twelve, "12 classes", "10-class head")


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real ImageNet sample not present at {SAMPLE}")
def test_the_imagenet_sample_with_a_ten_class_checkpoint(tmp_path, capsys):
    backbone = export_weights(VisionTransformer(ViTConfig(**TINY)), tmp_path / "backbone.pt")
    code, _, err = run(capsys, "eval", "--checkpoint", backbone, "--task", SAMPLE)
    refused(code, err, SAMPLE, "ImageNet class folders", "10-class head")


# -- runs ----------------------------------------------------------------------------------------------


def test_a_run_removes_the_temporaries_an_interrupted_write_left(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # what write_atomic leaves when killed mid-write: its own mkstemp name beside the target
    fd, stale = tempfile.mkstemp(dir=out, prefix=".checkpoint.pt.", suffix=".tmp")
    with open(fd, "wb") as f:
        f.write(b"half a checkpoint")
    kept = [out / ".notes.tmp", out / "mine.tmp"]  # not write_atomic's pattern: the user's
    for path in kept:
        path.write_text("keep me")
    code, _, err = run(capsys, "train", *TINY_ARGS, "--batch-size", 4, "--steps", 1, "--val-size", 4,
                       "--eval-every", 0, "--no-progress", "--out", out)
    assert code == 0, err
    warned(err, f"removed 1 stale temporary file(s) of an interrupted write in {out}", Path(stale).name)
    assert not Path(stale).exists() and all(p.is_file() for p in kept)
    assert not list(out.glob(".checkpoint.pt.*.tmp"))


def test_a_pruned_checkpoint_as_backbone_says_what_is_taken(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = dict(img_size=64, patch_size=8, in_chans=1, num_classes=10, embed_dim=24, depth=3, num_heads=2,
               mean=(0.0,), std=(1.0,))
    pruned = tmp_path / "pruned.pt"
    source = IARed(VisionTransformer(ViTConfig(**cfg)), interpreter_heads=2).eval()
    save_pruned(source, pruned)
    out = tmp_path / "again"
    code, _, err = run(capsys, "train-interpreters", "--checkpoint", pruned, "--task", "digits-clutter",
                       "--steps-per-stage", 1, "--batch-size", 2, "--eval-samples", 2, "--interpreter-heads", 2,
                       "--quiet", "--out", out)
    assert code == 0, err
    warned(err, f"{pruned} is a pruned checkpoint: taking its backbone", "ignoring its 3 interpreter(s)")
    trained = load_pruned(out / "pruned.pt")
    for k, v in source.backbone.state_dict().items():  # the backbone is the file's
        assert torch.equal(trained.backbone.state_dict()[k], v), k
