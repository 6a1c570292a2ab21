"""Video through the shared entry points: pruned TimeSformer checkpoints, ``load_backbone`` /
``load_model`` on TimeSformer files and names, video folders through ``build_dataset`` /
``task_dataset``, and ``iared eval`` on a tiny video folder (PyAV-made in tmp_path)."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from iared.checkpoint import CheckpointError, save_atomic
from iared.cli import main as cli_main
from iared.data import VideoFolder, build_dataset, is_video_folder
from iared.loading import load_backbone, load_iared, load_pruned_checked, task_dataset
from iared.models import load_model
from iared.models.timesformer import TimeSformer, TimeSformerConfig
from iared.pruning import IARed, load_pruned, save_pruned

TINY = dict(img_size=32, patch_size=8, num_frames=4, depth=2, embed_dim=64, num_heads=2, num_classes=3,
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def tiny_timesformer(seed=0, **kw) -> TimeSformer:
    torch.manual_seed(seed)
    return TimeSformer(TimeSformerConfig(**{**TINY, **kw})).eval()


def write_video(path, frames: np.ndarray, rate: int = 8) -> Path:
    """``(T, H, W, 3)`` uint8 frames, losslessly (libx264rgb, crf 0)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=rate, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_folder(root, per_class=2, classes=3, frames=6, size=32) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            write_video(Path(root) / f"class{c}" / f"v{i}.mp4", rng.integers(0, 256, (frames, size, size, 3), np.uint8))
    return Path(root)


@pytest.mark.parametrize("mode", ["threshold", "budget", "all"])
def test_pruned_timesformer_round_trips_logits_exactly(tmp_path, mode):
    model = IARed(tiny_timesformer(), num_stages=2).eval()
    for p in model.reducers.parameters():  # spread the scores so threshold mode really drops tokens
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    assert torch.load(path, weights_only=True)["config"]["architecture"] == "timesformer"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary left behind
    x = torch.rand(2, 4, 3, 32, 32)
    kw = {"keep_ratio": 0.5} if mode == "budget" else {}
    with torch.no_grad():
        out = model(x, mode=mode, **kw)
        for loaded in (load_pruned(path), load_pruned_checked(path), load_iared(path)):
            assert isinstance(loaded.backbone, TimeSformer)
            again = loaded(x, mode=mode, **kw)
            assert torch.equal(out.logits, again.logits)
    if mode == "threshold":
        assert float(out.kept_fraction()[:, -1].mean()) < 1.0  # something was dropped
    backbone = load_backbone(path)  # a pruned file as a backbone: its TimeSformer
    assert isinstance(backbone, TimeSformer) and torch.equal(backbone(x), model.backbone(x))
    assert torch.equal(load_model(path)(x), model.backbone(x))


def test_timesformer_files_and_names_through_load_backbone(tmp_path):
    net = tiny_timesformer()
    x = torch.rand(1, 4, 3, 32, 32)
    official = tmp_path / "official.pyth"
    torch.save({"model_state": {f"model.{k}": v for k, v in net.state_dict().items()}}, official)
    plain = tmp_path / "plain.pt"
    torch.save(net.state_dict(), plain)
    iared_file = tmp_path / "iared.pt"
    save_atomic({"model": net.state_dict(), "config": {"architecture": "timesformer", "model": net.cfg.to_dict()}},
                iared_file)
    for path in (official, plain):  # geometry read off the weights (heads: width / 64)
        got = load_backbone(path)
        assert isinstance(got, TimeSformer) and got.cfg.num_frames == 4 and got.cfg.img_size == 32
    for got in (load_backbone(iared_file), load_model(iared_file),
                load_backbone(official, "timesformer_base_patch16_224", overrides=TINY)):
        assert torch.equal(got(x), net(x))
    with pytest.raises(CheckpointError, match="official.pyth"):  # geometry of another model: one line, the file
        load_backbone(official, "timesformer_base_patch16_224")
    with pytest.raises(ValueError, match="no download"):
        load_backbone(None, "timesformer_base_patch16_224", pretrained=True)
    bad = tmp_path / "bad.pt"
    save_atomic({"model": net.state_dict(), "config": {"architecture": "swin", "model": {}}}, bad)
    with pytest.raises(CheckpointError, match="bad.pt.*unknown backbone architecture 'swin'"):
        load_model(bad)


def test_video_folder_through_build_dataset_and_task_dataset(tmp_path):
    root = video_folder(tmp_path / "videos")
    assert is_video_folder(root)
    ds = build_dataset(str(root), "test", num_frames=4, img_size=32)
    assert isinstance(ds, VideoFolder) and len(ds) == 6 and not ds.train
    cfg = tiny_timesformer().cfg
    ds = task_dataset(str(root), "test", cfg)
    clip, label = ds[0]
    assert clip.shape == (4, 3, 32, 32) and label == 0
    assert float(clip.min()) >= 0 and float(clip.max()) <= 1  # the model's mean 0 / std 1
    assert task_dataset(str(root), "train", cfg, augment=True).train
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "x.png")
    assert not is_video_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="folder of images, but the model takes clips"):
        task_dataset(str(tmp_path / "images"), "test", cfg)
    with pytest.raises(ValueError, match="folder of videos, but the model takes images"):
        from iared.models import create_model

        task_dataset(str(root), "test", create_model("digits_natural_vit").cfg)


def test_eval_command_on_a_video_folder(tmp_path, capsys):
    root = video_folder(tmp_path / "videos")
    net = tiny_timesformer()
    ckpt = tmp_path / "tsf.pt"
    save_atomic({"model": net.state_dict(), "config": {"architecture": "timesformer", "model": net.cfg.to_dict()}},
                ckpt)
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--task", str(root), "--batch-size", "4", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and 0 <= result["top1"] <= 1
    # the same logits as the model on the folder's clips
    clips = torch.stack([VideoFolder.for_model(root, net)[i][0] for i in range(6)])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        expect = float((net(clips).argmax(-1) == labels).float().mean())
    assert result["top1"] == pytest.approx(expect)
    bad = tmp_path / "broken"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.mp4").write_bytes(b"not a video")
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--task", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad video" in err and "x.mp4" in err
