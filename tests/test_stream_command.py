"""``iared stream``: JSON lines per frame for the embedded task, a folder of frames and a real video,
the strips of --explain, one-line refusals, and the --compare report's structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from iared.cli import main as cli_main
from iared.models import create_model
from iared.models.vit import VisionTransformer, ViTConfig
from iared.train.backbone import export_weights
from tests.helpers import json_lines as lines
from tests.helpers import run_cli as run

CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "kinetics400_demo.mp4"


def test_the_embedded_task_streams_with_the_shipped_model(tmp_path, capsys):
    code, out, err = run(capsys, "stream", "--streams", 2, "--frames", 6, "--explain", tmp_path / "strips")
    assert code == 0, err
    records = lines(out)
    frames, summary = records[:-1], records[-1]["summary"]
    assert len(frames) == 12 and summary["frames"] == 12 and summary["streams"] == 2
    assert [r["frame"] for r in frames if r["stream"].endswith("/0")] == list(range(6))
    first = [r for r in frames if r["frame"] == 0]
    assert all(r["key_frame"] and r["recomputed"] == 1.0 for r in first)
    later = [r for r in frames if r["frame"] > 0]
    assert sum(r["macs"] for r in later) / len(later) < min(r["macs"] for r in first)
    assert all(r["top_k"][0]["label"] == str(r["top_k"][0]["index"]) and "correct" in r for r in frames)
    assert summary["macs_reduction"] > 2.5 and 0 < summary["top1"] <= 1
    strip = Image.open(tmp_path / "strips" / "stream-000.png")
    assert strip.size == (6 * 64, 128)


def test_a_folder_of_frames_with_a_backbone_reuses_only(tmp_path, capsys):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=2, num_heads=2))
    weights = export_weights(vit, tmp_path / "tiny.safetensors")
    folder = tmp_path / "frames"
    folder.mkdir()
    base = (torch.rand(40, 40, 3) * 255).byte()
    for i in range(4):
        frame = base.clone()
        frame[:8, :8] = 255 * (i % 2)  # one corner blinks
        Image.fromarray(frame.numpy()).save(folder / f"{i:03d}.png")
    code, out, err = run(capsys, "stream", folder, "--checkpoint", weights, "--policy", "threshold:0.01",
                         "--json", tmp_path / "out.jsonl")
    assert code == 0, err
    assert out == "" and "resized from 40x40 to the model's 32x32" in err
    records = lines((tmp_path / "out.jsonl").read_text())
    assert len(records) == 5 and records[-1]["summary"]["frames"] == 4
    assert all(r["kept"] == 1.0 for r in records[:-1])  # a backbone drops nothing
    assert 0 < records[2]["recomputed"] < 1 and "label" not in records[0]


def test_streams_of_different_lengths_each_get_their_own_strip(tmp_path, capsys):
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=8, num_classes=4, embed_dim=32, depth=2, num_heads=2))
    weights = export_weights(vit, tmp_path / "tiny.safetensors")
    folders = []
    for name, count in (("a", 3), ("b", 2), ("c", 3)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(count):
            Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
        folders.append(folder)
    code, out, err = run(capsys, "stream", *folders, "--checkpoint", weights, "--policy", "top",
                         "--explain", tmp_path / "strips")
    assert code == 0, err
    records = lines(out)
    per_stream = {}
    for r in records:
        if "stream" in r:
            per_stream.setdefault(Path(r["stream"]).name, []).append(r["frame"])
    assert per_stream == {"a": [0, 1, 2], "b": [0, 1], "c": [0, 1, 2]}
    widths = [Image.open(tmp_path / "strips" / f"stream-{i:03d}.png").size[0] for i in range(3)]
    assert widths == [3 * 32, 2 * 32, 3 * 32]
    later = [r for r in records if r.get("frame", 0) > 0]
    assert all(r["recomputed"] < 1 for r in later)  # --policy top alone means top:0.3, not "nothing" or "all"


@pytest.mark.skipif(not CLIP.is_file(), reason=f"real video clip not present at {CLIP}")
def test_the_real_kinetics_clip_with_a_random_deit_s(tmp_path, capsys):
    torch.manual_seed(0)
    weights = export_weights(create_model("deit_small_patch16_224"), tmp_path / "deit_s.pt")
    code, out, err = run(capsys, "stream", CLIP, "--checkpoint", weights, "--max-frames", 4, "--top-k", 3)
    assert code == 0, err
    records = lines(out)
    assert len(records) == 5
    assert all(len(r["top_k"]) == 3 and r["frames_per_s"] > 0 for r in records[:-1])
    assert records[-1]["summary"]["frames"] == 4 and 0 < records[-1]["summary"]["recomputed"] <= 1
    assert "resized from 340x256 to the model's 224x224" in err


@pytest.mark.parametrize("argv, message", [
    (["stream", "no/such/video.mp4"], "no such video or folder: no/such/video.mp4"),
    (["stream", "--policy", "top:2"], "fraction in [0, 1]"),
    (["stream", "--policy", "hold"], "keyframe_every"),
    (["stream", "--threshold", "1.5"], "--threshold must lie in [0, 1]"),
    (["stream", "--frames", "0"], "--frames must be >= 1"),
    (["stream", "--compare", "--policy", "top:0.2"], "--compare chooses every method's settings"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_unknown_gate_rule_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["stream", "--policy", "sometimes"])
    assert e.value.code == 2 and "unknown gate rule 'sometimes'" in capsys.readouterr().err


def test_compare_chooses_on_validation_and_reports_every_method_once(tmp_path):
    from iared.stream_eval import StreamCompareConfig, compare_streaming

    cfg = StreamCompareConfig(val_streams=2, test_streams=2, frames=6, thresholds=(0.1, 0.3), tome_r=(2,),
                              repeats=1, bootstrap=200)
    result = compare_streaming(cfg, progress=lambda _: None)
    methods = [r["method"] for r in result["test"]]
    assert methods == ["full", "iared", "reuse", "iared+reuse", "tome", "random", "pixel", "keyframes"]
    sel = result["validation"]["selection"]
    assert [row["knob"]["value"] for row in sel["reuse"]["sweep"]] == [0.1, 0.3]
    by = {r["method"]: r for r in result["test"]}
    for name in ("reuse", "iared+reuse", "tome"):  # the fewest MACs within the loss window, on validation
        rows = sel[name]["sweep"]
        ok = [r for r in rows if r["loss_pt"] <= cfg.max_loss]
        best = min(ok, key=lambda r: r["macs"]) if ok else max(rows, key=lambda r: r["top1"])
        assert sel[name]["chosen"] == best["knob"] == by[name]["knob"]
    for row in result["test"]:
        d = row["delta_pt"]
        assert d["lo"] <= d["mean"] <= d["hi"]
        assert row["frames_per_s"]["min"] <= row["frames_per_s"]["median"] <= row["frames_per_s"]["max"]
    full = result["test"][0]
    assert full["delta_pt"]["mean"] == 0 and full["macs_reduction"] == pytest.approx(1.0)
    assert by["iared+reuse"]["macs_per_frame"] < by["iared"]["macs_per_frame"]
    assert result["machine"]["speed_probe_ms_at_start"] > 0 and result["machine_end"]["speed_probe_ms_at_start"] > 0
