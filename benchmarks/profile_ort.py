"""Where ONNX Runtime spends its time in one or more ONNX files: kernel time per operator type, and per
(part of the model, operator) with ``--parts`` (backbone / encoder / decoder / other, from node names).

Each file runs in one session (``engines.onnxruntime.session_options``: ``--threads`` intra-op threads,
optimisation level "all") with onnxruntime's profiler on a random input of the graph's size: ``--warmup``
untimed calls, then ``--runs`` profiled ones; times are the profiler's per-node kernel times averaged per
run (they add up to a little less than the wall time, which is printed too). This is how the float islands
of docs/BENCHMARKS.md ("ONNX Runtime against its own static quantization") were found.

Also ``--layernorm``: the micro-benchmark behind the export's 2-D LayerNorm (export/lower/layers.py): 30
residual Add + LayerNormalization pairs on DETR-sized [100,1,256] tensors, 3-D (onnxruntime fuses them into
SkipLayerNormalization) against the same on a 2-D view (not fused).

Usage: ``python benchmarks/profile_ort.py model.onnx [other.onnx ...] [--threads 2] [--parts] [--top 14]``
       ``python benchmarks/profile_ort.py --layernorm``
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdetr_deploy.engines.onnxruntime import session_options  # noqa: E402

PARTS = ("backbone", "encoder", "decoder")


def profile(path: Path, threads: int, warmup: int, runs: int) -> tuple[float, dict[str, float], dict]:
    """(wall ms per run, kernel ms per run by node name, op type by node name) of ``path``."""
    so = session_options(threads, "all")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal((1, 3, shape[2], shape[3])).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {"images": x})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {"images": x})
    wall = (time.perf_counter() - t0) / runs * 1e3
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, float] = collections.Counter()
    ops = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            per_node[node] += e["dur"] / 1e3
            ops[node] = e["args"]["op_name"]
    n = warmup + runs  # the profiler records the warm-up calls too
    return wall, {k: v / n for k, v in per_node.items()}, ops


def part(node: str) -> str:
    return next((p for p in PARTS if p in node), "other")


def report(path: Path, args: argparse.Namespace) -> None:
    wall, per_node, ops = profile(path, args.threads, args.warmup, args.runs)
    total = sum(per_node.values())
    by: dict[tuple[str, str], float] = collections.Counter()
    count: dict[tuple[str, str], int] = collections.Counter()
    for node, ms in per_node.items():
        key = (part(node) if args.parts else "", ops[node])
        by[key] += ms
        count[key] += 1
    print(f"== {path.name}: wall {wall:.1f} ms per run, kernels {total:.1f} ms ({args.threads} threads)")
    for (where, op), ms in sorted(by.items(), key=lambda kv: -kv[1])[: args.top]:
        label = f"{where:9s} {op}" if args.parts else op
        print(f"  {label:38s} {ms:7.2f} ms {100 * ms / total:5.1f}%  nodes {count[(where, op)]}")


def layernorm_graph(two_d: bool, rows: int = 100, dim: int = 256, pairs: int = 30) -> bytes:
    """``pairs`` chained residual Add + LayerNormalization on [rows,1,dim] (2-D view when ``two_d``)."""
    inits = [numpy_helper.from_array(np.ones(dim, np.float32), "g"),
             numpy_helper.from_array(np.zeros(dim, np.float32), "b"),
             numpy_helper.from_array(np.array([-1, dim], np.int64), "flat"),
             numpy_helper.from_array(np.array([rows, 1, dim], np.int64), "back")]
    nodes, x = [], "x"
    for i in range(pairs):
        nodes.append(helper.make_node("Add", [x, "y"], [f"a{i}"]))
        if two_d:
            nodes.append(helper.make_node("Reshape", [f"a{i}", "flat"], [f"f{i}"]))
            nodes.append(helper.make_node("LayerNormalization", [f"f{i}", "g", "b"], [f"n{i}"], axis=-1))
            nodes.append(helper.make_node("Reshape", [f"n{i}", "back"], [f"o{i}"]))
        else:
            nodes.append(helper.make_node("LayerNormalization", [f"a{i}", "g", "b"], [f"o{i}"], axis=-1))
        x = f"o{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, 1, dim]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "layernorm", io, [helper.make_tensor_value_info(x, TensorProto.FLOAT,
                                                                                    [rows, 1, dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def layernorm(threads: int, calls: int = 200) -> None:
    feed = {k: np.random.default_rng(0).standard_normal((100, 1, 256)).astype(np.float32) for k in "xy"}
    variants = (("3-D (SkipLayerNormalization)", False), ("2-D view (Add, LayerNorm)", True))
    so = session_options(threads, "all")
    sessions = {name: ort.InferenceSession(layernorm_graph(two_d), sess_options=so,
                                           providers=["CPUExecutionProvider"]) for name, two_d in variants}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(20):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(calls // 10):  # interleaved blocks of 10 calls
        for name, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(10):
                s.run(None, feed)
            times[name].append((time.perf_counter() - t0) / 10 / 30 * 1e6)
    base = float(np.median(times["3-D (SkipLayerNormalization)"]))
    for name, t in times.items():
        print(f"{name:32s} {np.median(t):7.1f} us per residual Add + LayerNorm  (x{base / np.median(t):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--parts", action="store_true", help="split by backbone / encoder / decoder / other")
    ap.add_argument("--layernorm", action="store_true", help="the SkipLayerNormalization micro-benchmark")
    args = ap.parse_args()
    if args.layernorm:
        layernorm(args.threads)
    for path in args.models:
        report(path, args)


if __name__ == "__main__":
    main()
