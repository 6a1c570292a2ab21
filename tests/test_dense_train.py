"""train-dense resumes bit for bit; eval-dense reports every figure; bad checkpoints are one line."""

import json

import pytest
import torch

from iared.cli import main
from iared.dense import load_dense
from iared.models.vit import VisionTransformer, ViTConfig

TINY_HEAD = ["--neck-hidden-sizes", "4,4,4,4", "--fusion-hidden-size", "4", "--reassemble-factors", "4,2,1,0.5"]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=64, patch_size=16, in_chans=1, num_classes=10, embed_dim=16, depth=4, num_heads=2,
                    mean=(0.0,), std=(1.0,))
    path = tmp_path_factory.mktemp("backbone") / "tiny.pt"
    torch.save({"model": VisionTransformer(cfg).state_dict(), "config": {"model": cfg.to_dict()}}, path)
    return path


def _train(backbone, out, *extra):
    args = ["train-dense", "--checkpoint", str(backbone), "--steps", "4", "--batch-size", "4", "--train-size", "64",
            "--val-size", "4", "--pruned-fraction", "0.5", "--threshold", "0.55", "--save-every", "2", "--warmup", "1",
            "--out", str(out), "--no-progress", *TINY_HEAD, *extra]
    assert main(args) == 0


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_backbone, tmp_path, capsys):
    _train(tiny_backbone, tmp_path / "a")
    _train(tiny_backbone, tmp_path / "b", "--stop-at", "2")
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    _train(tiny_backbone, tmp_path / "b", "--resume")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the frozen backbone did not change
    start = load_dense(tmp_path / "a" / "dense.pt")
    backbone = torch.load(tiny_backbone, weights_only=True)["model"]
    for k, v in backbone.items():
        assert torch.equal(start.backbone.state_dict()[k], v)
    # resuming with other settings is refused in one line naming them
    capsys.readouterr()
    assert main(["train-dense", "--checkpoint", str(tiny_backbone), "--steps", "4", "--batch-size", "4",
                 "--train-size", "64", "--out", str(tmp_path / "b"), "--resume", "--lr", "0.5", *TINY_HEAD]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "lr" in err and err.count("\n") == 0


def test_eval_dense_reports_every_figure(tiny_backbone, tmp_path, capsys):
    _train(tiny_backbone, tmp_path / "run")
    capsys.readouterr()
    pngs = tmp_path / "png"
    assert main(["eval-dense", "--checkpoint", str(tmp_path / "run" / "dense.pt"), "--limit", "6",
                 "--throughput-batch", "4", "--repeats", "1", "--png-dir", str(pngs), "--png-count", "2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for side in ("unpruned", "pruned"):
        assert 0 <= report[side]["miou"] <= 1 and 0 <= report[side]["pixel_accuracy"] <= 1
        assert len(report[side]["iou_per_class"]) == 11
    model = load_dense(tmp_path / "run" / "dense.pt")
    # GFLOPs include the head, which runs in full on both sides
    assert report["unpruned"]["gflops"] == pytest.approx(model.full_macs() / 1e9)
    assert report["gflops_head"] == pytest.approx(model.head_macs / 1e9)
    assert report["pruned"]["gflops"] < report["unpruned"]["gflops"]
    assert report["threshold"] == 0.55 and len(report["pruned"]["kept_fraction"]) == 3
    t = report["throughput"]
    assert t["batch_size"] == 4 and t["speedup"] == pytest.approx(t["throughput_pruned"] / t["throughput_unpruned"])
    assert sorted(p.name for p in pngs.iterdir()) == ["dense_000.png", "dense_001.png"]


def test_eval_dense_bad_checkpoint_is_one_line(tiny_backbone, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert main(["eval-dense", "--checkpoint", str(junk), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad checkpoint" in err and "junk.pt" in err
    # a backbone is not a dense model: named as such, in one line
    assert main(["eval-dense", "--checkpoint", str(tiny_backbone)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a dense (DPT) checkpoint" in err
