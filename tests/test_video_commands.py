"""The commands on video: bench (--frames), explain (PNG strip + GIF), compare (the peers on a
TimeSformer, framediff refused on images), train-interpreters + eval --pruned on moving-digits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from iared.checkpoint import save_atomic
from iared.cli import main as cli_main
from iared.compare import CompareConfig, check_methods, run_compare
from iared.models import create_model
from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.pruning import IARed, save_pruned

from .test_video_wiring import tiny_timesformer, video_folder, write_video


def moving_digits_backbone(path) -> TimeSformer:
    """A tiny random TimeSformer of moving-digits' geometry (8 x 48 x 48, patch 8), saved to ``path``."""
    torch.manual_seed(0)
    net = TimeSformer(TimeSformerConfig(img_size=48, patch_size=8, num_frames=8, depth=3, embed_dim=32, num_heads=2,
                                        num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3)).eval()
    save_atomic({"model": net.state_dict(), "config": {"architecture": "timesformer", "model": net.cfg.to_dict()}},
                path)
    return net


def test_bench_timesformer_with_frames(capsys):
    rc = cli_main(["bench", "--quick", "--model", "timesformer_base_patch16_224", "--frames", "2", "--batch-sizes",
                   "2", "--dtype", "float32", "--json", "-", "--clock", "cpu", "--threads", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["num_frames"] == 2 and report["model"]["attention_type"] == "divided_space_time"
    rows = {r["config"]: r for r in report["runs"][0]["rows"]}
    assert {"unpruned", "budget", "threshold-padded"} <= set(rows)
    assert rows["budget"]["gmacs_per_image"] < rows["unpruned"]["gmacs_per_image"]
    assert cli_main(["bench", "--quick", "--model", "digits", "--frames", "4"]) == 2  # an image model: refused
    assert "image model" in capsys.readouterr().err


def test_bench_on_a_video_folder(tmp_path, capsys):
    root = video_folder(tmp_path / "videos", per_class=1, classes=2)
    rc = cli_main(["bench", "--quick", "--model", "timesformer_base_patch16_224", "--task", str(root), "--batch-sizes",
                   "3", "--dtype", "float32", "--json", "-", "--clock", "cpu", "--threads", "1"])
    assert rc == 0  # 2 videos, repeated to fill the batch of 3 clips (4 frames of 32x32: the quick geometry)
    assert json.loads(capsys.readouterr().out)["runs"][0]["batch"] == 3


def test_explain_writes_a_strip_and_a_gif(tmp_path, capsys):
    model = IARed(tiny_timesformer(), num_stages=2)
    for p in model.reducers.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_pruned(model, tmp_path / "pruned.pt")
    write_video(tmp_path / "clips" / "a.mp4", np.random.default_rng(0).integers(0, 256, (6, 40, 48, 3), np.uint8))
    out = tmp_path / "out"
    assert cli_main(["explain", str(tmp_path / "clips"), "--checkpoint", str(tmp_path / "pruned.pt"),
                     "--out", str(out), "--methods", "interpreter", "random"]) == 0
    png, gif = Image.open(out / "a.png"), Image.open(out / "a.gif")
    assert gif.n_frames == 4  # one per sampled frame
    assert png.size[0] > png.size[1] / 3 and png.size[1] > 400  # a strip: rows of 4 frames
    # frame, kept tokens and the two heatmaps side by side, 4x upsampled (32 px + 1 px gaps)
    assert gif.size == (4 * 4 * 33, 4 * 32)
    capsys.readouterr()
    assert cli_main(["explain", str(tmp_path / "clips"), "--checkpoint", str(tmp_path / "pruned.pt"),
                     "--out", str(tmp_path / "o2"), "--methods", "rollout"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rollout: not for video" in err
    Image.new("RGB", (32, 32)).save(tmp_path / "clips" / "b.png")
    assert cli_main(["explain", str(tmp_path / "clips"), "--checkpoint", str(tmp_path / "pruned.pt"),
                     "--out", str(tmp_path / "o3")]) == 2
    assert "b.png (an image, but the model takes clips" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists() or not any((tmp_path / "o3").iterdir())


def test_compare_on_video_runs_the_peers_and_floors(tmp_path):
    moving_digits_backbone(tmp_path / "tsf.pt")
    cfg = CompareConfig(task="moving-digits", backbone=str(tmp_path / "tsf.pt"),
                        methods=("tome", "evit", "random", "pixel", "framediff"), test_samples=4, batch_sizes=(2,),
                        repeats=1, quick=True, out=str(tmp_path / "cmp"))
    result = run_compare(cfg, progress=lambda msg: None)
    methods = {c["method"] for c in result["candidates"]}
    assert methods == {"tome", "evit", "random", "pixel", "framediff"}
    assert all(c["gflops"] < result["unpruned"]["gflops"] for c in result["candidates"])
    assert (tmp_path / "cmp" / "compare.md").is_file()


def test_compare_default_methods_and_refusals(tmp_path, capsys):
    video = tiny_timesformer()
    cfg = CompareConfig()
    check_methods(cfg, video)
    assert "framediff" in cfg.methods and "iared" in cfg.methods
    cfg = CompareConfig()
    check_methods(cfg, create_model("digits_vit"))
    assert "framediff" not in cfg.methods
    with pytest.raises(ValueError, match="framediff does not apply to VisionTransformer"):
        check_methods(CompareConfig(methods=("random", "framediff")), create_model("digits_vit"))
    assert cli_main(["compare", "--quick", "--methods", "random,framediff", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "images have no frames" in err
    from iared.loading import load_backbone
    from iared.models import TASK_BACKBONES
    from iared.models.timesformer import TimeSformer

    shipped = load_backbone(default=TASK_BACKBONES["moving-digits"])  # what compare / eval / demo use when given none
    assert isinstance(shipped, TimeSformer) and shipped.cfg.conv_stem == (16, 32, 64)


def test_train_interpreters_and_eval_pruned_on_moving_digits(tmp_path, capsys):
    moving_digits_backbone(tmp_path / "tsf.pt")
    out = tmp_path / "run"
    assert cli_main(["train-interpreters", "--task", "moving-digits", "--checkpoint", str(tmp_path / "tsf.pt"),
                     "--out", str(out), "--steps-per-stage", "1", "--batch-size", "2", "--eval-every", "1",
                     "--eval-samples", "2", "--num-stages", "2"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--pruned", str(out / "pruned.pt"), "--task", "moving-digits", "--limit", "4",
                     "--batch-size", "4", "--throughput-batch", "2", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and len(result["kept_fraction"]) == 2
