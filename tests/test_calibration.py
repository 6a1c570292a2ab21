"""Threshold calibration to a kept-token budget on unlabelled inputs (issue 32): ``iared.calibration``,
``IARed.calibrate``, and ``--target-kept`` on eval, predict, bench and stream."""

from __future__ import annotations

import pytest
import torch

from iared.calibration import _threshold_for_count, calibrate_thresholds, check_target_kept, sample_inputs
from iared.checkpoint import read_checkpoint
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed, load_pruned, save_pruned
from tests.helpers import json_lines
from tests.helpers import run_cli as run

DIGITS_TINY = {"img_size": 64, "patch_size": 8, "in_chans": 1, "num_classes": 10, "embed_dim": 24, "depth": 3,
               "num_heads": 2, "mean": (0.0,), "std": (1.0,)}


def spread_model(seed: int = 0) -> IARed:
    torch.manual_seed(seed)
    model = IARed(VisionTransformer(ViTConfig(**DIGITS_TINY)), num_stages=3, interpreter_heads=2).eval()
    with torch.no_grad():  # scores spread over (0, 1) and distinct, so any count is reachable
        for p in model.interpreters.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 1, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "pruned.pt"
    save_pruned(spread_model(), path)
    return path


def kept_after_each_stage(model, x, thresholds) -> list[float]:
    with torch.no_grad():
        out = model(x, "threshold", threshold=thresholds)
    return [float(v) for v in out.kept_fraction().mean(0)]


def test_threshold_for_count_hits_the_count_and_prefers_the_larger_on_ties():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for want in range(5):
        t = _threshold_for_count(scores, want)
        assert int((scores > t).sum()) == want
    tied = torch.tensor([0.5, 0.5, 0.5, 0.9])  # 2 is unreachable: 1 (t=0.5) or 4 (t=0) kept
    assert int((tied > _threshold_for_count(tied, 3)).sum()) == 4
    assert int((tied > _threshold_for_count(tied, 2)).sum()) == 1  # 1 is nearer than 4


def test_one_target_keeps_that_share_after_the_last_stage(images):
    model = spread_model()
    n_patches = images.shape[0] * 64
    for target in (0.2, 0.5, 0.9):
        thresholds = calibrate_thresholds(model, images, target)
        assert len(thresholds) == 3 and all(0.0 <= t <= 1.0 for t in thresholds)
        kept = kept_after_each_stage(model, images, thresholds)
        # each stage keeps the same share r = target ** (1/3) of what reaches it, to the token
        r = target ** (1 / 3)
        for g, k in enumerate(kept):
            assert k == pytest.approx(r ** (g + 1), abs=3 / n_patches)
        assert kept[-1] == pytest.approx(target, abs=3 / n_patches)
    # the sample's thresholds hold on more inputs of the same kind, to sampling error
    thresholds = calibrate_thresholds(model, images, 0.3)
    other = torch.randn(96, 1, 64, 64, generator=torch.Generator().manual_seed(11))
    assert kept_after_each_stage(model, other, thresholds)[-1] == pytest.approx(0.3, abs=0.05)


def test_a_target_per_stage_is_the_share_of_the_grid_kept_after_that_stage(images):
    model = spread_model()
    targets = [0.7, 0.4, 0.25]
    kept = kept_after_each_stage(model, images, calibrate_thresholds(model, images, targets))
    assert kept == pytest.approx(targets, abs=2 / (images.shape[0] * 64))


def test_a_loader_of_labelled_batches_is_read_without_its_labels(images):
    model = spread_model()
    labels = torch.full((len(images),), -7)  # never valid: reading them would fail later
    loader = [(images[i: i + 10], labels[i: i + 10]) for i in range(0, len(images), 10)]
    assert sample_inputs(loader, 25).shape[0] == 25
    assert calibrate_thresholds(model, loader, 0.4) == calibrate_thresholds(model, images, 0.4)
    # chunked forward passes give the thresholds of one pass
    assert calibrate_thresholds(model, images, 0.4, batch_size=7) == pytest.approx(
        calibrate_thresholds(model, images, 0.4), abs=1e-6)  # batch composition moves float rounding only


def test_calibrate_stores_the_thresholds_and_the_file_keeps_them(images, tmp_path):
    model = spread_model()
    settings = model.calibrate(images, 0.3)
    assert settings.target_kept == 0.3 and settings.calibration_samples == len(images)
    assert settings.threshold == calibrate_thresholds(model, images, 0.3)
    save_pruned(model, tmp_path / "c.pt")
    loaded = load_pruned(tmp_path / "c.pt")
    assert loaded.inference == settings


def test_small_samples_are_warned_about_and_bad_targets_refused(images, capsys):
    model = spread_model()
    calibrate_thresholds(model, images[:5], 0.5)
    assert "only 5 input(s)" in capsys.readouterr().err
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            check_target_kept(bad)
    with pytest.raises(ValueError, match="one value or 3"):
        calibrate_thresholds(model, images, [0.5, 0.4])
    with pytest.raises(ValueError, match="empty"):
        sample_inputs([])


# -- the commands ------------------------------------------------------------------------------------


def test_eval_target_kept_meets_the_target_on_the_split_and_saves_a_copy(pruned_file, tmp_path, capsys):
    out_file = tmp_path / "calibrated.pt"
    code, out, err = run(capsys, "eval", "--checkpoint", pruned_file, "--task", "digits-clutter", "--limit", 64,
                         "--repeats", 1, "--throughput-batch", 8, "--target-kept", 0.3, "--calibration-samples",
                         64, "--save-calibrated", out_file, "--json", "-")
    assert code == 0, err
    r = json_lines(out)[0]
    assert r["target_kept"] == 0.3 and r["calibration_samples"] == 64 and r["threshold_stored"] == 0.5
    # calibrated on the same 64 inputs it evaluates: the target is met to a few tokens
    assert r["kept_fraction"][-1] == pytest.approx(0.3, abs=0.01)
    assert "calibrated on 64 unlabelled input(s)" in err
    saved = read_checkpoint(out_file)["config"]["inference"]
    assert saved["threshold"] == r["threshold"] and saved["target_kept"] == 0.3
    # the source file is untouched, the copy keeps everything else it held
    assert read_checkpoint(pruned_file)["config"]["inference"]["threshold"] == 0.5
    a, b = load_pruned(pruned_file), load_pruned(out_file)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_predict_calibrates_on_the_inputs_it_is_given(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    model = IARed(VisionTransformer(ViTConfig(**{**DIGITS_TINY, "in_chans": 3, "img_size": 32,
                                                 "mean": (0.5,) * 3, "std": (0.5,) * 3})), num_stages=2,
                  interpreter_heads=2).eval()
    with torch.no_grad():
        for p in model.interpreters.parameters():
            p.normal_(0, 0.5)
    save_pruned(model, tmp_path / "p.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
                        ).save(folder / f"{i}.png")
    code, out, err = run(capsys, "predict", folder, "--checkpoint", tmp_path / "p.pt", "--target-kept", 0.25,
                         "--json", "-")
    assert code == 0, err
    rows = json_lines(out)
    assert len(rows) == 6 and "calibrated on 6 unlabelled input(s)" in err and "only 6 input(s)" in err
    # six inputs of 16 patches: the last stage lands within a token or two of 25 % over them
    assert sum(r["kept_fraction"][-1] for r in rows) / 6 == pytest.approx(0.25, abs=2 / 96)


def test_calibration_refusals_come_before_any_work(pruned_file, tmp_path, capsys):
    cases = [
        (("eval", "--checkpoint", pruned_file, "--target-kept", 0.3, "--threshold", 0.5), "exclude each other"),
        (("eval", "--checkpoint", pruned_file, "--target-kept", 2), "in (0, 1]"),
        (("eval", "--checkpoint", pruned_file, "--save-calibrated", tmp_path / "x.pt"), "apply with --target-kept"),
        (("eval", "--checkpoint", pruned_file, "--target-kept", 0.3, "--calibration-samples", 0), "at least 1"),
        (("eval", "--model", "digits_vit", "--target-kept", 0.3), "has no interpreters"),
        (("bench", "--model", "deit_tiny_patch16_224", "--target-kept", 0.3), "no trained interpreters"),
        (("stream", "--checkpoint", pruned_file, "--backbone-only", "--target-kept", 0.3), "needs a pruned"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code != 0 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.pt").exists()


def test_capacity_from_the_sample_fits_it_and_a_lower_quantile_overflows(images):
    from iared.calibration import calibrate_capacity

    model = spread_model()
    thresholds = calibrate_thresholds(model, images, 0.3)
    caps = calibrate_capacity(model, images, thresholds)
    with torch.no_grad():
        dynamic = model(images, "threshold", threshold=thresholds)
        counts = [k[:, 1:].sum(1) for k in dynamic.keep]
        assert caps == [int(c.max()) for c in counts]
        static = model(images, "threshold", threshold=thresholds, layout="static", capacity=caps)
        assert torch.allclose(static.logits, dynamic.logits, atol=1e-5)
        assert all(int(o.sum()) == 0 for o in static.overflow)
        narrow = calibrate_capacity(model, images, thresholds, quantile=0.5)
        assert all(n <= c for n, c in zip(narrow, caps)) and narrow != caps
        tight = model(images, "threshold", threshold=thresholds, layout="static", capacity=narrow)
        assert sum(int(o.sum()) for o in tight.overflow) > 0
    with pytest.raises(ValueError, match="quantile"):
        calibrate_capacity(model, images, thresholds, quantile=0)


def test_bench_calibrates_on_the_task_and_saves_a_copy(tmp_path, capsys):
    model = spread_model()
    save_pruned(model, tmp_path / "p.pt")
    out_json, copy = tmp_path / "b.json", tmp_path / "c.pt"
    code, _, err = run(capsys, "bench", "--checkpoint", tmp_path / "p.pt", "--task", "digits-clutter", "--target-kept",
                       0.3, "--calibration-samples", 32, "--save-calibrated", copy, "--dtype", "float32",
                       "--batch-sizes", 2, "--warmup", 0, "--repeats", 1, "--strategies", "bucket", "--json", out_json)
    assert code == 0, err
    import json

    report = json.loads(out_json.read_text())
    cal = report["calibration"]
    assert cal["target_kept"] == 0.3 and cal["samples"] == 32 and cal["threshold_stored"] == [0.5] * 3
    from iared.bench import load_task_images

    sample = load_task_images("digits-clutter", 32, model.backbone.cfg)
    assert cal["thresholds"] == pytest.approx(calibrate_thresholds(model, sample, 0.3), abs=1e-6)
    assert report["runs"][0]["thresholds"] == cal["thresholds"]  # what was timed
    assert load_pruned(copy).inference.threshold == cal["thresholds"]


def test_stream_calibrates_on_frames_spread_over_the_streams(tmp_path, capsys):
    from iared.stream_eval import default_checkpoint

    copy = tmp_path / "c.pt"
    code, out, err = run(capsys, "stream", "--streams", 2, "--frames", 4, "--target-kept", 0.1, "--save-calibrated",
                         copy)
    assert code == 0, err
    assert "calibrated on 8 unlabelled input(s)" in err
    calibrated = load_pruned(copy).inference
    assert calibrated.target_kept == 0.1 and calibrated.threshold != load_pruned(default_checkpoint()).inference.threshold
    summary = json_lines(out)[-1]["summary"]
    assert summary["frames"] == 8
