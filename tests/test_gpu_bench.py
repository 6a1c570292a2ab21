"""scripts/gpu_bench.py, the prepared GPU benchmark, on a tiny geometry on the CPU (eager only: CI
has no GPU, and compiling is covered by tests/test_static_shapes.py)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_suite_times_every_candidate_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu-bench.json"
    assert load_script().main(["--smoke", "--no-compile", "--repeats", "1", "--warmup", "0", "--json", str(out),
                               "--device", "cpu"]) == 0
    d = json.loads(out.read_text())
    assert d["machine"]["torch"] and d["dtype"] == "float32" and not d["skipped"]
    assert [r["geometry"] for r in d["runs"]] == ["tiny", "tiny-video"]
    for run in d["runs"]:
        rows = run["rows"]
        assert set(rows) == {"unpruned", "budget", "threshold", "tome-r8", "tome-r13", "evit-0.7"}
        for name, r in rows.items():
            assert "error" not in r, (name, r)
            assert r["ms_median"] > 0 and len(r["ms_all"]) == 1
            assert abs(r["speedup_vs_eager"] - rows["unpruned"]["ms_median"] / r["ms_median"]) < 1e-3
        assert rows["unpruned"]["ideal_speedup"] == 1.0
        # keep 0.7 per stage over 3 stages: about a third of the patches go, so the ideal lies well above 1
        assert all(rows[k]["ideal_speedup"] > 1.2 for k in ("budget", "threshold"))
        # the static capacity holds the batch's largest count: at least its mean
        assert all(c >= m for c, m in zip(run["capacity"], run["mean_kept"]))
