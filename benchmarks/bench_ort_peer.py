"""ONNX Runtime latency of our quantized exports against ONNX Runtime's own static quantization (the peer).

For each model and input size (default DETR-R50 and DETR-R18 at 320x320 and 512x512; random weights, seed 0,
batch norms given random statistics: enough for speed, not for accuracy), in one process:

1. ``fp32``: the full-precision export (``build_onnx`` of the float model, post-processing in the graph);
2. ``ort u8s8``: ``onnxruntime.quantization.quantize_static`` of that same file: QDQ format, per-channel
   weights, uint8 activations / int8 weights, MinMax calibration on the first ``--calib`` coco128 images
   (what a CPU user would do instead of us);
3. ``ours 4-4-8`` and ``ours 8-8-8``: the model quantized with ``quantize``'s defaults (its preset
   ``QuantConfig.from_preset("onnxruntime")``: residual_bits 8, conv biases on the int32 grid, 8-bit
   downsample convs, shared block inputs; no DA),
   calibrated (LSQ+) on the same images, exported with the default flags (int8 container, int32 biases).
   No distillation: the drift of a QAT student is smaller.

All graphs of one model and size are timed in one run, interleaved (``bench.latency.interleaved``, blocks of
``BLOCK`` calls), batch 1, ``--threads`` intra-op threads, optimisation level "all", on one coco128 image.
Drift: each graph against fp32 on the held-out coco128 images (after the calibration ones): mean and max
|score diff| (max class probability), mean |box diff| (normalised by the canvas) and the share of queries
with the same label. Our exports are also checked against PyTorch fake-quant on one held-out image
(``export.check.check_onnx``: per-layer code agreement, and the largest int32 bias rounding, 0 when the model
carries its biases).

Prints a Markdown section (machine, CPU model from /proc/cpuinfo, load, date, versions) and writes it to
``--out`` (default ``ort_peer.md``). ``--quick``: DETR-R18 at 320 only, 4 calibration and 4 held-out images,
few iterations (a smoke run: about a minute on an idle 2-core machine, 5 under a load of 10).
Usage: ``python benchmarks/bench_ort_peer.py [--quick] [--iters 30] [--threads 2] [--out ort_peer.md]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdetr_deploy.bench.latency import BLOCK, interleaved  # noqa: E402
from qdetr_deploy.engines.onnxruntime import session_options  # noqa: E402
from qdetr_deploy.export.calibration import list_images, load_images  # noqa: E402
from qdetr_deploy.export.check import check_onnx  # noqa: E402
from qdetr_deploy.export.onnx_export import QUANTIZERS_KEY, build_onnx, save_onnx  # noqa: E402
from qdetr_deploy.models import build_detr, get_preset  # noqa: E402
from qdetr_deploy.quant import QuantConfig, calibrate, quantize  # noqa: E402

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "train2017"
MODELS = ("detr_r50", "detr_r18")
SIZES = (320, 512)
OURS = ("4-4-8", "8-8-8")


def random_detr(preset: str, seed: int = 0) -> torch.nn.Module:
    """A DETR with random weights and random (valid) frozen batch-norm statistics, eval mode."""
    torch.manual_seed(seed)
    model = build_detr(get_preset(preset)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.3, 1.0)
                m.bias.normal_(0, 0.05)
    return model


class _Reader(CalibrationDataReader):
    """The calibration canvases, one image per call, for ``quantize_static``."""

    def __init__(self, images: np.ndarray) -> None:
        self.items = iter([{"images": images[i:i + 1]} for i in range(len(images))])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def ort_peer(fp_path: Path, out: Path, calib: np.ndarray) -> Path:
    """ONNX Runtime's static quantization of the fp32 export: QDQ, per channel, u8 activations, s8
    weights, MinMax."""
    quantize_static(str(fp_path), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def ours(fp: torch.nn.Module, bits: str, size: int, calib: np.ndarray,
         out: Path) -> tuple[Path, torch.nn.Module]:
    """Our student (quantize's defaults: the onnxruntime preset, no DA; LSQ+ on the calibration images)
    exported with the default flags."""
    q = quantize(copy.deepcopy(fp), QuantConfig.from_preset("onnxruntime", bits, da="none"))
    batches = [torch.from_numpy(calib[i:i + 4]) for i in range(0, len(calib), 4)]
    calibrate(q, batches, progress=False)
    proto, _ = build_onnx(q.eval(), (size, size))
    return save_onnx(proto, out), q


INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
               "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearConcat", "QLinearSigmoid",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearReduceMean")


def composition(path: Path, tmp: Path, threads: int) -> dict[str, int]:
    """Node counts of the graph as onnxruntime optimises it (level "extended"): integer kernels, float
    convs/matmuls, QuantizeLinear/DequantizeLinear, and all nodes."""
    so = session_options(threads, "extended")
    so.optimized_model_filepath = str(tmp / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node]
    return {"integer": sum(op in INTEGER_OPS for op in ops),
            "float": sum(op in ("Conv", "MatMul", "FusedMatMul", "Gemm", "FusedConv") for op in ops),
            "qdq": sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops), "nodes": len(ops)}


def drift(outputs: dict[str, list[dict]], size: int) -> dict[str, dict]:
    """Each graph's held-out outputs against fp32's."""
    ref = outputs["fp32"]
    res = {}
    for name, outs in outputs.items():
        ds, db, same = [], [], []
        for o, r in zip(outs, ref):
            ds.append(np.abs(o["scores"] - r["scores"]).reshape(-1))
            db.append((np.abs(o["boxes"] - r["boxes"]) / size).reshape(-1))
            same.append((o["labels"] == r["labels"]).reshape(-1))
        ds, db, same = np.concatenate(ds), np.concatenate(db), np.concatenate(same)
        res[name] = {"score_mean": float(ds.mean()), "score_max": float(ds.max()),
                     "box_mean": float(db.mean()), "labels_same": float(same.mean())}
    return res


def bench_one(preset: str, size: int, files: list[Path], args: argparse.Namespace, tmp: Path) -> dict:
    t0 = time.perf_counter()
    calib = load_images(files[:args.calib], (size, size))
    held = load_images(files[args.calib:args.calib + args.holdout], (size, size))
    fp = random_detr(preset)
    proto, _ = build_onnx(fp, (size, size))
    paths = {"fp32": save_onnx(proto, tmp / f"{preset}_{size}_fp32.onnx")}
    paths["ort u8s8"] = ort_peer(paths["fp32"], tmp / f"{preset}_{size}_ort.onnx", calib)
    students = {}
    for bits in OURS:
        paths[f"ours {bits}"], students[bits] = ours(fp, bits, size, calib,
                                                    tmp / f"{preset}_{size}_{bits}.onnx")
    sessions = {name: ort.InferenceSession(str(p), sess_options=session_options(args.threads, "all"),
                                           providers=["CPUExecutionProvider"]) for name, p in paths.items()}
    image = held[:1]
    runners = {name: (lambda _i, s=s: s.run(None, {"images": image})) for name, s in sessions.items()}
    load_before = os.getloadavg()[0]
    times = interleaved(runners, args.warmup, args.iters, block=BLOCK)
    load_after = os.getloadavg()[0]
    med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    outputs = {name: [dict(zip(("scores", "labels", "boxes"), s.run(None, {"images": held[i:i + 1]})))
                      for i in range(len(held))] for name, s in sessions.items()}
    parity = {}
    for bits, q in students.items():
        r = check_onnx(paths[f"ours {bits}"], q, held[:1], threads=args.threads)
        deltas = [abs(d) for e in bias_deltas(paths[f"ours {bits}"]).values() for d in e["delta"]]
        parity[f"ours {bits}"] = {"layer_codes": r.layer_code_agreement, "max_bias_delta": max(deltas or [0])}
    graphs = {name: composition(p, tmp, args.threads) for name, p in paths.items()}
    print(f"{preset} {size}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"model": preset, "size": size, "median_ms": med, "drift": drift(outputs, size), "parity": parity,
            "graphs": graphs,
            "mb": {n: p.stat().st_size / 1e6 for n, p in paths.items()}, "load": (load_before, load_after)}


def bias_deltas(path: Path) -> dict:
    """The export's recorded int32 bias deltas (conv -> {module, delta})."""
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[QUANTIZERS_KEY]).get("bias_deltas") or {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def table(rows: list[dict]) -> str:
    head = ("| model | input | graph | size (MB) | median (ms) | speed-up vs fp32 | vs ORT u8s8 | optimised "
            "graph: integer / float conv+matmul / Q+DQ / all nodes | drift vs fp32: score mean / max | box "
            "mean | labels same | parity per layer (codes) / bias rounding |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        med, peer = r["median_ms"], r["median_ms"]["ort u8s8"]
        for name, ms in med.items():
            d, p = r["drift"][name], r["parity"].get(name)
            par = f"{100 * p['layer_codes']:.3f}% / {p['max_bias_delta']:.1e}" if p else "-"
            c = r["graphs"][name]
            lines.append(f"| {r['model']} | {r['size']}x{r['size']} | {name} | {r['mb'][name]:.1f} | "
                         f"{ms:.1f} | {med['fp32'] / ms:.2f}x | {peer / ms:.2f}x | {c['integer']} / "
                         f"{c['float']} / {c['qdq']} / {c['nodes']} | {d['score_mean']:.4f} / "
                         f"{d['score_max']:.3f} | {d['box_mean']:.4f} | {100 * d['labels_same']:.1f}% | "
                         f"{par} |")
    return "\n".join(lines)


def section(rows: list[dict], args: argparse.Namespace, cmd: str, seconds: float) -> str:
    loads = ", ".join(f"{r['model']} {r['size']}: {r['load'][0]:.1f} -> {r['load'][1]:.1f}" for r in rows)
    return f"""## ONNX Runtime: our exports against ONNX Runtime's own static quantization (CPU)

Command: `{cmd}` ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {seconds / 60:.1f} min; machine:
{cpu_model()}, {os.cpu_count()} cores visible; 1-minute load average before -> after each timing run: {loads};
onnxruntime {ort.__version__}, torch {torch.__version__}, onnx {onnx.__version__}). Random weights (seed 0),
batch 1, {args.threads} intra-op threads, optimisation level "all", median of {args.iters} timed calls per
graph, all graphs of a row group interleaved in one run (blocks of {BLOCK}) after {args.warmup} warm-up
rounds. "ort u8s8": `onnxruntime.quantization.quantize_static` of the fp32 export (QDQ, per-channel, uint8
activations / int8 weights, MinMax on the first {args.calib} coco128 images). "ours": `quantize` with its
defaults (`--preset onnxruntime`: `--residual-bits 8 --conv-bias int32 --downsample-bits 8
--shared-block-input --input-proj-bits 8`; no DA), LSQ+ calibration on the same images, no distillation,
exported with `export`'s default flags (int8 container, int32 conv biases).
Drift: against the fp32 export on {args.holdout} held-out coco128 images (score: max class probability
per query; box: |diff| / canvas; labels: share of queries with the fp32 label); with random weights these
only compare the quantizers, not accuracy. Parity: our export against PyTorch fake-quant on one held-out
image (`export --check`, per layer) and the largest int32 bias rounding the export applied (0: the
model carries its biases on the grid).

{table(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="DETR-R18 at 320, 4+4 images, 10 iterations")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=16, help="calibration images (ORT MinMax and our LSQ+)")
    ap.add_argument("--holdout", type=int, default=16, help="held-out images for the drift")
    ap.add_argument("--images", type=Path, default=COCO128)
    ap.add_argument("--out", type=Path, default=Path("ort_peer.md"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.sizes, args.iters, args.warmup, args.calib, args.holdout = (
            ["detr_r18"], [320], 10, 2, 4, 4)
    torch.set_num_threads(args.threads)
    files = list_images(args.images, args.calib + args.holdout)
    if len(files) < args.calib + args.holdout:
        sys.exit(f"{args.images}: {len(files)} images, need {args.calib + args.holdout}")
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.models:
            for size in args.sizes:
                rows.append(bench_one(preset, size, files, args, Path(tmp)))
    cmd = "python benchmarks/bench_ort_peer.py " + " ".join(sys.argv[1:])
    text = section(rows, args, cmd.strip(), time.perf_counter() - t0)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
