"""The one timing loop (iared.timing): call counts, interleaving, percentiles. No timed assertions."""

import numpy as np
import pytest

import torch

from iared.timing import latency_percentiles, machine_info, percentile, speed_probe_ms, time_interleaved, use_threads


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_interleaved_call_order_and_counts():
    calls = []
    rounds = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(fns, warmup=2, repeats=3, min_ms=0.0, on_round=lambda i, t: rounds.append(i))
    # warm-up of each candidate first, then one call of each per round: a burst of load hits both alike
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert rounds == [1, 2, 3]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_short_calls_are_repeated_inside_one_measurement():
    n = {"calls": 0}

    def quick():
        n["calls"] += 1

    times = time_interleaved({"q": quick}, warmup=0, repeats=2, min_ms=5.0)
    # a call of microseconds is repeated until a measurement lasts >= 5 ms: many calls per figure
    assert len(times["q"]) == 2 and n["calls"] > 10


def test_latency_percentiles_time_single_calls():
    n = {"calls": 0}

    def fn():
        n["calls"] += 1

    out = latency_percentiles({"f": fn}, calls=9, warmup=1)
    assert n["calls"] == 10 and out["f"]["calls"] == 9
    assert 0 <= out["f"]["p50_ms"] <= out["f"]["p90_ms"]


def test_use_threads_leaves_torch_alone_unless_the_count_changes(monkeypatch):
    """torch.set_num_threads with the count torch already has still switches MKL's dynamic threading
    off (slower fused attention on short sequences): commands call it only for a new count."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    current = torch.get_num_threads()
    assert use_threads(None) == current
    assert use_threads(current) == current
    assert calls == []
    use_threads(current + 1)
    assert calls == [current + 1]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        use_threads(0)


def test_reports_carry_a_speed_probe():
    """Every report records how long a fixed matrix product took when it was made (no timing is
    asserted here: speed belongs in benchmarks), so two reports of one model can be compared."""
    import math

    info = machine_info("cpu")
    assert info["speed_probe_ms_at_start"] > 0
    probe = speed_probe_ms(calls=2, repeats=1)
    assert probe > 0 and math.isfinite(probe)
