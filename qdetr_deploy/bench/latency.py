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


# --- other processes on the machine ----------------------------------------------------------------------

#: CPUs other processes may keep busy on average while bench times before it warns. Absolute, not a share:
#: ONNX Runtime runs a thread on every core by default, so one busy process slows it on any machine.
OTHER_LOAD_LIMIT = 0.5


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``, Linux), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()  # children: the bench worker processes this one waited for
    return t.user + t.system + t.children_user + t.children_system


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


class MachineLoad:
    """How busy other processes kept the CPUs while a block ran (``with MachineLoad() as load: ...``).

    On Linux: busy CPU time of the whole machine (``/proc/stat``) minus this process's and its waited-for
    children's (``os.times``), over the wall time: ``other_cpus`` is the average number of CPUs others kept
    busy. Elsewhere only the 1-minute load average before and after (it includes our own threads)."""

    def __enter__(self) -> MachineLoad:
        self.cpus = os.cpu_count() or 1
        self.loadavg_before = _loadavg()
        self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self._t0
        busy = _busy_seconds()
        self.loadavg_after = _loadavg()
        self.other_cpus = None
        if busy is not None and self._busy0 is not None and wall > 0:
            other = (busy - self._busy0) - (_own_seconds() - self._own0)
            self.other_cpus = max(0.0, other / wall)

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "other_cpus": self.other_cpus, "loadavg_before": self.loadavg_before,
                "loadavg_after": self.loadavg_after}

    def warning(self, limit: float = OTHER_LOAD_LIMIT) -> str | None:
        """One line when others kept more than ``limit`` CPUs busy on average, else None."""
        before, after = self.loadavg_before, self.loadavg_after
        loads = "" if before is None or after is None else \
            f" (1-minute load average {before:.1f} before, {after:.1f} after)"
        if self.other_cpus is not None:
            if self.other_cpus <= limit:
                return None
            return (f"other processes kept {self.other_cpus:.1f} of {self.cpus} CPUs busy while bench timed"
                    f"{loads}: the latencies are likely inflated")
        if before is not None and after is not None and min(before, after) > self.cpus:
            return f"the machine was loaded while bench timed{loads} on {self.cpus} CPUs: the latencies " \
                   "are likely inflated"
        return None
