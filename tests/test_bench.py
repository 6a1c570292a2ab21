"""iared bench: calibration, FLOP accounting and the report's shape (no timings are asserted)."""

import json

import pytest
import torch

from iared import flops
from iared.bench import (
    BenchConfig,
    bench_model,
    budget_ratios,
    calibrate_thresholds,
    format_table,
    interpreter_share,
    run,
    spread_interpreters,
)
from iared.cli import main as cli_main
from iared.models.vit import VisionTransformer, ViTConfig
from iared.pruning import IARed


def tiny_model(seed: int = 0) -> IARed:
    torch.manual_seed(seed)
    backbone = VisionTransformer(ViTConfig(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=48,
                                           depth=3, num_heads=3))
    model = IARed(backbone, num_stages=3, interpreter_heads=3).eval()
    spread_interpreters(model, 0.5)
    return model


def test_calibration_hits_keep_ratio_and_counts_vary():
    model = tiny_model()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    thresholds = calibrate_thresholds(model, x, 0.7)
    with torch.inference_mode():
        out = model(x, "threshold", threshold=thresholds)
    alive = 64.0
    for keep in out.keep:
        counts = keep[:, 1:].sum(1).float()
        assert counts.mean() / alive == pytest.approx(0.7, abs=0.02)
        assert counts.std() > 0  # adaptivity kept: images differ
        alive = float(counts.mean())


def test_budget_ratios_reproduce_mean_counts():
    model = tiny_model()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    thresholds = calibrate_thresholds(model, x, 0.6)
    with torch.inference_mode():
        thr = model(x, "threshold", threshold=thresholds)
        bud = model(x, "budget", keep_ratio=budget_ratios(thr, 64))
    for kt, kb in zip(thr.keep, bud.keep):
        assert float(kb[:, 1:].sum(1).float().mean()) == round(float(kt[:, 1:].sum(1).float().mean()))


def test_interpreter_share_matches_formula():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(x, "budget", keep_ratio=0.5)
    seen = [65, 33, 17]  # prefix + 64, 32, 16 patches
    interp = sum(flops.interpreter_macs(n, 48) for n in seen)
    assert interpreter_share(model, out) == pytest.approx(interp / (float(out.macs[0]) - interp))


def test_bench_model_rows_are_consistent():
    model = tiny_model()
    x = torch.randn(4, 3, 32, 32)
    thresholds = calibrate_thresholds(model, x, 0.7)
    rows = bench_model(model, x, thresholds=thresholds, strategies=("loop", "bucket"), warmup=0, repeats=1,
                       progress=lambda msg: None)
    names = [(r.config, r.attention) for r in rows]
    assert names == [("unpruned", None), ("budget", None), ("threshold-padded", None), ("threshold-static", None),
                     ("threshold-packed", "loop"), ("threshold-packed", "bucket")]
    for r in rows:
        assert r.error is None and r.ms_median > 0 and r.images_per_s > 0
        assert r.efficiency == pytest.approx(r.speedup / r.ideal_speedup)
    assert rows[0].ideal_speedup == 1.0 and rows[0].speedup == 1.0
    assert all(r.ideal_speedup > 1.2 for r in rows[1:])
    # threshold rows agree on what they computed, whatever the layout / strategy: the static row's
    # capacity is the batch's largest count per stage, so no image overflows
    assert rows[2].mean_kept == rows[3].mean_kept == rows[4].mean_kept == rows[5].mean_kept
    with torch.inference_mode():
        per_image = model(x, "threshold", threshold=thresholds).keep
    assert rows[3].capacity == [int(k[:, 1:].sum(1).max()) for k in per_image]


def test_run_writes_json_and_table(tmp_path):
    path = tmp_path / "bench.json"
    cfg = BenchConfig(model="digits_vit", dtypes=("float32",), batch_sizes=(2,), warmup=0, repeats=1,
                      json=str(path))
    report = run(cfg, progress=lambda msg: None)
    saved = json.loads(path.read_text())
    assert saved["machine"]["torch"] == torch.__version__
    assert str(tmp_path) not in path.read_text()  # the report does not name the machine's folders
    for key in ("cpu", "cpu_cores", "threads", "device_name"):
        assert key in saved["machine"]
    assert saved["machine"]["speed_probe_ms_at_start"] > 0 and saved["machine"]["speed_probe_ms_at_end"] > 0
    (run_,) = saved["runs"]
    assert run_["batch"] == 2 and run_["dtype"] == "float32" and len(run_["thresholds"]) == 3
    assert {r["config"] for r in run_["rows"]} == {"unpruned", "budget", "threshold-padded", "threshold-static",
                                                 "threshold-packed"}
    assert saved["config"]["device"] == "cpu"  # auto, on a machine without CUDA
    assert saved["default_attention"] in {"loop", "bucket"}
    packed = [r for r in run_["rows"] if r["config"] == "threshold-packed"]
    assert {r["attention"] for r in packed} == {"loop", "bucket"}  # nested is not timed on CPU by default
    table = format_table(report)
    assert "threshold-packed/bucket" in table and "digits_vit" in table
    assert "efficiency" in table and "interpreter FLOPs" in table  # the summary line


def test_cli_bench_quick_to_stdout(capsys):
    """The smoke configuration: tiny geometry, both dtypes, every default batch size, JSON on stdout."""
    rc = cli_main(["bench", "--quick", "--model", "digits", "--json", "-", "--clock", "cpu", "--threads", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["config"]["quick"] and report["config"]["repeats"] <= 2
    assert report["model"]["embed_dim"] == 48  # the quick geometry, not digits_vit's 144
    assert {(r["dtype"], r["batch"]) for r in report["runs"]} == {
        (d, b) for d in ("float32", "bfloat16") for b in (1, 8, 64, 256)}
    for run_ in report["runs"]:
        for row in run_["rows"]:
            assert row["error"] is None and row["images_per_s"] > 0
            assert row["efficiency"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
            assert 0 <= row["interpreter_pct"] < 100
    assert "threshold-packed/bucket" in captured.err  # the table goes to stderr when JSON is on stdout
    # batch 1 carries latency percentiles of single calls (p50 <= p90); larger batches do not
    for run_ in report["runs"]:
        for row in run_["rows"]:
            if run_["batch"] == 1:
                assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
            else:
                assert row["latency_p50_ms"] is None
    assert "latency at batch 1" in captured.err


def test_cli_bench_checkpoint(tmp_path, capsys):
    from iared.pruning import save_pruned

    ckpt = tmp_path / "pruned.pt"
    save_pruned(tiny_model(), ckpt)
    out_json = tmp_path / "b.json"
    rc = cli_main(["bench", "--checkpoint", str(ckpt), "--threshold", "0.5", "--dtype", "float32",
                   "--batch-sizes", "2", "--warmup", "0", "--repeats", "1", "--strategies", "bucket",
                   "--json", str(out_json)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["runs"][0]["thresholds"] == [0.5, 0.5, 0.5]
    assert "threshold-packed/bucket" in capsys.readouterr().out


def test_cli_bench_rejects_bad_keep(capsys):
    assert cli_main(["bench", "--model", "digits_vit", "--keep", "1.5", "--batch-sizes", "1"]) == 2
    assert "--keep" in capsys.readouterr().err


def test_cli_bench_rejects_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli_main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_cli_bench_backbone_weights_file(tmp_path, capsys):
    """An official-format backbone file (no config inside) gets fresh, calibrated interpreters."""
    from iared.models import create_model

    torch.manual_seed(0)
    backbone = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    path = tmp_path / "tiny.pth"
    torch.save({"model": backbone.state_dict()}, path)
    out = tmp_path / "b.json"
    rc = cli_main(["bench", "--checkpoint", str(path), "--batch-sizes", "4", "--dtype", "float32", "--warmup", "0",
                   "--repeats", "1", "--keep", "0.5", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"]["embed_dim"] == 192 and report["model"]["depth"] == 3  # geometry read off the file
    packed = [r for r in report["runs"][0]["rows"] if r["config"].startswith("threshold-packed")]
    assert packed and all(r["mean_kept"][0] == 8.0 for r in packed)  # calibrated: stage 1 keeps half of 16 on average


def test_varlen_is_refused_off_cuda_before_any_timing():
    cfg = BenchConfig(model="digits_vit", dtypes=("float32",), batch_sizes=(2,), strategies=("varlen",), device="cpu")
    with pytest.raises(ValueError, match="varlen: the fused varlen kernels are CUDA's"):
        run(cfg, progress=lambda msg: None)


def test_a_compile_mode_without_compile_is_refused_before_any_timing():
    cfg = BenchConfig(model="digits_vit", dtypes=("float32",), batch_sizes=(2,), device="cpu",
                      compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs --compile"):
        run(cfg, progress=lambda msg: None)
