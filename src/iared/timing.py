"""The one timing loop: ``bench``, ``demo``, ``eval`` and ``compare`` all measure speed here.

Rules, so that two commands give the same number for the same model and batch:
- warm-up calls first (allocator, bucket plans, lazy initialisation, compilation);
- the candidates are timed *interleaved*, call by call, so a change in machine load (another
  process, CPU frequency) hits all of them alike;
- each figure is the median of ``repeats`` calls; the device is synchronised around every call;
- a call shorter than ``MIN_CALL_MS`` is repeated inside one measurement (batch-1 calls of small
  models last well under a millisecond, where timer resolution and scheduling noise dominate);
- the thread count and the machine are recorded next to the figures (:func:`machine_info`).

The defaults below are the rules: commands pass only what their user changed (``--repeats``).
Latency (:func:`latency_percentiles`) is the exception that times single calls, because a
percentile of per-call times is what a latency budget means.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
WARMUP = 3  # calls per candidate before timing: allocator, bucket plans, lazy init, compilation
REPEATS = 7  # timed measurements per candidate; the median is reported
MIN_CALL_MS = 20.0  # shorter calls are repeated inside one measurement
LATENCY_CALLS = 50  # single calls per candidate for latency percentiles


def use_threads(threads: int | None) -> int:
    """Run torch on ``threads`` intra-op threads (None: leave torch's choice); returns the count in use.

    ``torch.set_num_threads`` is called only for a count other than the current one: torch's fused CPU
    attention ran up to twice as slow on short sequences, the pruned model's case, after
    ``torch.set_num_threads(2)`` on a 2-core machine where 2 was already torch's count
    (``scripts/attention_crossover.py --threads 2``; the call also does ``mkl_set_dynamic(false)``,
    the likely cause). A command that "set" the count it already had would time a slower pruned
    model than the library gives its users."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                     warmup: int = WARMUP, repeats: int = REPEATS, clock: str = "wall",
                     min_ms: float = MIN_CALL_MS,
                     on_round: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds per call of every function in ``fns``, timed round-robin after ``warmup`` calls each.

    ``min_ms``: a call shorter than this is repeated inside one measurement until the time passes it
    (the figure stays per call); 0 times every call alone.
    ``clock``: ``wall`` (elapsed) or ``cpu`` (this process's CPU time; on a shared CPU with one
    thread it counts only the work done).
    ``on_round(i, times)``: called after every round (progress lines of long benchmarks).
    """
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected one of {sorted(CLOCKS)}")
    now = CLOCKS[clock]
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        inner[name] = 1
        if min_ms:  # one calibration call: how many calls make a measurement of at least min_ms
            synchronize(device)
            t0 = now()
            fn()
            synchronize(device)
            once = (now() - t0) * 1e3
            inner[name] = max(1, int(min_ms / max(once, 1e-6)) + 1) if once < min_ms else 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = now()
            for _ in range(inner[name]):
                fn()
            synchronize(device)
            times[name].append((now() - t0) * 1e3 / inner[name])
        if on_round is not None:
            on_round(len(next(iter(times.values()), [])), times)
    return times


def latency_percentiles(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                        calls: int = LATENCY_CALLS, warmup: int = WARMUP, clock: str = "wall") -> dict[str, dict]:
    """``{name: {"p50_ms", "p90_ms", "calls"}}`` from single calls, interleaved like every timing here."""
    times = time_interleaved(fns, device, warmup=warmup, repeats=calls, clock=clock, min_ms=0.0)
    return {name: {"p50_ms": percentile(t, 50), "p90_ms": percentile(t, 90), "calls": len(t)}
            for name, t in times.items()}


def percentile(times: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation between order statistics, as numpy's default)."""
    if not times:
        raise ValueError("percentile of no measurements")
    ordered = sorted(times)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def median_ms(times: list[float]) -> float:
    return float(statistics.median(times))


PROBE_SIZE = 384  # the yardstick: one (384 x 384) @ (384 x 384) float32 product


def speed_probe_ms(device: torch.device | str = "cpu", calls: int = 20, repeats: int = 5) -> float:
    """Milliseconds of one fixed float32 matrix product on ``device`` (median of ``repeats`` rounds of
    ``calls``): how fast the machine ran when a report was taken. On a shared machine its speed drifts
    (on this project's 2-core machine, by about 30 % within an hour, unseen by the load average), and
    two reports of one model are comparable only when their probes are close."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PROBE_SIZE, PROBE_SIZE, generator=g).to(device) for _ in range(2))
    with torch.inference_mode():
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                a @ b
            synchronize(device)
            times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What every benchmark file records next to its figures (bench, compare, demo, explain-eval)."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        # 1-minute load when the run started: above ~0 before we start, other jobs share the CPU
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    info["speed_probe_ms_at_start"] = round(speed_probe_ms(device), 4)
    return info
