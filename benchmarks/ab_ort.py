"""Paired latency of ONNX files under ONNX Runtime: the first file is the baseline, every file's speed-up is
the median over rounds of (baseline time / its time) in the same round.

All sessions live in one process and take turns call by call (the order reversed every other round), so a
shared machine's drift hits every file alike; worker-thread spinning is off (a session's spinning threads
would otherwise share the cores with the next session's run). Random input of the first graph's size;
``--threads`` intra-op threads, optimisation level "all" (``engines.onnxruntime.session_options``). This is
how each step of the issue-13 graph work was measured (docs/BENCHMARKS.md).

Usage: ``python benchmarks/ab_ort.py base.onnx other.onnx [...] [--rounds 60] [--threads 2] [--warmup 5]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdetr_deploy.engines.onnxruntime import session_options  # noqa: E402


def paired(paths: list[Path], rounds: int, threads: int, warmup: int) -> np.ndarray:
    """Seconds per call, [rounds, files]."""
    sessions = []
    for p in paths:
        so = session_options(threads, "all")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"]))
    inp = sessions[0].get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    t = np.zeros((rounds, len(sessions)))
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feed)
            t[r, i] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", type=Path, nargs="+", help="ONNX files; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]}: file not found")
    t = paired(args.files, args.rounds, args.threads, args.warmup)
    print(f"| file | median (ms) | min (ms) | speed-up vs {args.files[0].name} (paired median) |")
    print("| --- | --- | --- | --- |")
    for i, p in enumerate(args.files):
        ratio = float(np.median(t[:, 0] / t[:, i]))
        print(f"| {p.name} | {1e3 * np.median(t[:, i]):.2f} | {1e3 * t[:, i].min():.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
