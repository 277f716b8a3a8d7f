"""Timing helpers: warm-up, interleaved iterations (engines taking turns), latency statistics and memory.

Several engines are timed interleaved: each iteration runs every engine once, starting with a different
engine each time, so machine noise (other processes, thermal throttling) hits them all alike.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, wall clock (``perf_counter``)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def latency_stats(seconds: Iterable[float], batch: int = 1) -> dict:
    """mean/p50/p90/p99/min/max/std in ms, iterations and throughput (images/s) of per-call latencies."""
    s = np.asarray(list(seconds), np.float64) * 1e3
    if s.size == 0:
        return {"n": 0}
    mean = float(s.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(s, [50, 90, 99]))
    return {"n": int(s.size), "batch": int(batch), "mean_ms": mean, "p50_ms": p50, "p90_ms": p90,
            "p99_ms": p99, "min_ms": float(s.min()), "max_ms": float(s.max()), "std_ms": float(s.std()),
            "throughput_ips": float(batch * 1e3 / mean) if mean > 0 else None}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Current resident set size from ``/proc/self/statm`` (no tracemalloc); None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def memory_snapshot(engine: Any | None = None) -> dict:
    """Host RSS now and at peak (process-wide) and, when the engine can tell, its peak device memory."""
    device = engine.peak_device_memory() if engine is not None else None
    return {"host_rss_mb": current_rss_mb(), "host_peak_rss_mb": peak_rss_mb(),
            "device_peak_mb": device / (1 << 20) if device is not None else None}


def rotated(names: list[str], i: int) -> list[str]:
    """``names`` starting at position ``i % len(names)``: the round-robin order of iteration ``i``."""
    k = i % len(names) if names else 0
    return names[k:] + names[:k]


#: timed calls per engine per turn when several engines are interleaved (see :func:`interleaved`)
BLOCK = 10


def interleaved(runners: dict[str, Callable[[int], Any]], warmup: int, iters: int,
                progress: Any | None = None, block: int = 1) -> dict[str, list[float]]:
    """Run ``runners[name](i)`` for every name, ``warmup`` untimed then ``iters`` timed calls each, taking
    turns in round-robin order (drift on a shared machine hits every engine alike); returns the
    per-call latencies (s) of each. ``progress.update(1)`` per warm-up or timed call.

    ``block`` > 1: each turn is one untimed call, then up to ``block`` timed calls of the same engine. An
    ONNX Runtime session's worker threads spin for a while after its run (the default, and the fastest
    setting for a deployed model); an engine timed right after another one's run would share the cores
    with those spinning threads (measured: about 2x slower on 2 cores), the settle call absorbs that.
    """
    names = list(runners)
    for i in range(warmup):
        for name in rotated(names, i):
            runners[name](i)
            if progress is not None:
                progress.update(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    block = max(1, int(block))
    turn = 0
    while any(len(t) < iters for t in times.values()):
        for name in rotated(names, turn):
            todo = min(block, iters - len(times[name]))
            if todo <= 0:
                continue
            if block > 1 and len(names) > 1:
                runners[name](len(times[name]))  # settle: absorbs the previous engine's spinning threads
            for _ in range(todo):
                i = len(times[name])
                dt, _ = time_call(lambda name=name, i=i: runners[name](i))
                times[name].append(dt)
                if progress is not None:
                    progress.update(1)
        turn += 1
    return times


def time_engine(engine: Any, images: np.ndarray, warmup: int = 10, iters: int = 50) -> dict:
    """Engine-only latency statistics of one engine on one prepared batch."""
    times = interleaved({"engine": lambda _i: engine.run(images)}, warmup, iters)["engine"]
    return latency_stats(times, images.shape[0])
