"""The one timing loop: ``bench``, ``demo``, ``eval`` and ``compare`` all measure speed here.

Rules, so that two commands give the same number for the same model and batch:
- warm-up calls first (allocator, bucket plans, lazy initialisation, compilation);
- the candidates are timed *interleaved*, call by call, so a change in machine load (another
  process, CPU frequency) hits all of them alike;
- each figure is the median of ``repeats`` calls; the device is synchronised around every call;
- the thread count and the machine are recorded next to the figures (:func:`machine_info`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                     warmup: int = 2, repeats: int = 5, clock: str = "wall",
                     min_ms: float = 0.0) -> dict[str, list[float]]:
    """Milliseconds per call of every function in ``fns``, timed round-robin after ``warmup`` calls each.

    ``min_ms``: a call shorter than this is repeated inside one measurement until the time passes it
    (the figure stays per call): batch-1 calls of small models last well under a millisecond, where
    timer resolution and scheduling noise dominate a single call.
    ``clock``: ``wall`` (elapsed) or ``cpu`` (this process's CPU time; on a shared CPU with one
    thread it counts only the work done).
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
    return times


def median_ms(times: list[float]) -> float:
    return float(statistics.median(times))


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
    return info
