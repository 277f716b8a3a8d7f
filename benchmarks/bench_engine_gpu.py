"""GPU engine benchmark (one prepared run for an H200 or any CUDA GPU): DETR-R50 at 800x1216.

1. Builds DETR-R50 with random weights (seed 0), quantizes a copy 4-4-8 and calibrates it on random images.
2. Builds the torch GPU engine (``.qdtorch``: int4 kernels, float16 elsewhere, CUDA graphs) with a dynamic
   batch, and a float32 twin of it for the correctness bar.
3. Times, at batch 1 and 8, numpy images in -> detections out (``Engine.run`` semantics, post-processing
   included): the GPU engine, the same float model in float16 PyTorch eager, and float16 under a CUDA
   graph. Median / p90 latency, images/s and peak device memory per method.
4. Correctness: normalised boxes of both engines against the PyTorch fake-quant model (float32, TF32 off)
   on the same images; the bar is 1e-3 for the float32 engine (the integer kernels), the float16 engine's
   difference is reported (float16 rounding flips activation codes at rounding boundaries).

Writes ``bench_engine_gpu.json`` to ``$OUT`` (or ``./bench_out``) and prints a Markdown table last.
Usage: ``python benchmarks/bench_engine_gpu.py [--iters N] [--no-fp32-check]``; exit status 1 when the
correctness bar fails, 2 without CUDA. ``--smoke`` runs the same code path on the CPU with detr_tiny at
64x96 (CUDA-graph rows are skipped) to test this script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdetr_deploy.engines import open_engine  # noqa: E402
from qdetr_deploy.export.torch_engine import build_torch_engine, engine_module  # noqa: E402
from qdetr_deploy.models import build_detr, get_preset, postprocess  # noqa: E402
from qdetr_deploy.quant import QuantConfig, calibrate, quantize  # noqa: E402

BOX_TOL = 1e-3


@dataclass
class Plan:
    """Sizes of one run: the real GPU plan or the CPU smoke plan."""

    device: str = "cuda"
    smoke: bool = False
    preset: str = "detr_r50"
    size: tuple = (800, 1216)
    batches: tuple = (1, 8)
    calib_batches: int = 4
    calib_batch: int = 2
    warmup: int = 5
    iters: int = 30
    bits: str = "4-4-8"


SMOKE = Plan(device="cpu", smoke=True, preset="detr_tiny", size=(64, 96), batches=(1, 2), calib_batches=2,
             warmup=1, iters=3)


def require_cuda() -> None:
    """Exit with a clear message when no CUDA device is present."""
    if not torch.cuda.is_available():
        print("bench_engine_gpu: needs a CUDA GPU, none is visible (torch.cuda.is_available() is False); "
              "nothing was run. (--smoke runs the code path on the CPU.)", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_engine_gpu: unset TRITON_INTERPRET (the interpreter is for CPU tests)", file=sys.stderr)
        sys.exit(2)


def out_dir() -> Path:
    d = Path(os.environ.get("OUT") or "bench_out")
    d.mkdir(parents=True, exist_ok=True)
    return d


# --- models ---------------------------------------------------------------------------------------------

def make_models(plan: Plan) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(float DETR, its 4-4-8 quantized and calibrated copy), both float32 on CPU, eval mode."""
    torch.manual_seed(0)
    fp = build_detr(get_preset(plan.preset)).eval()
    q = quantize(copy.deepcopy(fp), QuantConfig.from_bits(plan.bits)).to(plan.device)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(plan.calib_batch, 3, *plan.size, generator=g).to(plan.device)
               for _ in range(plan.calib_batches)]
    calibrate(q, batches, progress=False)
    return fp, q.cpu().eval()


def images(plan: Plan, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, *plan.size)).astype(np.float32)


@torch.no_grad()
def fake_quant_boxes(q: torch.nn.Module, x: np.ndarray, plan: Plan) -> np.ndarray:
    """Boxes (canvas pixels) of the PyTorch fake-quant model, float32 with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = q.to(plan.device)
    out = model(torch.from_numpy(x).to(plan.device))
    sizes = torch.tensor([list(plan.size)] * len(x), device=plan.device)
    boxes = postprocess(out["pred_logits"], out["pred_boxes"], sizes)[2].cpu().numpy()
    q.cpu()
    return boxes


def box_diff(a: np.ndarray, b: np.ndarray, plan: Plan) -> float:
    h, w = plan.size
    return float((np.abs(a - b) / np.array([w, h, w, h], np.float32)).max())


# --- runners: numpy images in, numpy detections out ------------------------------------------------------

class TorchRunner:
    """The float model in the ONNX contract (DetrEngineModule), eager or replayed from a CUDA graph."""

    def __init__(self, fp: torch.nn.Module, plan: Plan, graphs: bool) -> None:
        dtype = torch.float16 if plan.device == "cuda" else torch.float32
        self.module, _ = engine_module(copy.deepcopy(fp), plan.size, torch.device(plan.device), dtype=dtype)
        self.device, self.graphs, self._captured = plan.device, graphs, {}

    @torch.inference_mode()
    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        t = torch.from_numpy(x)
        outs = self._replay(t) if self.graphs else self.module(t.to(self.device))
        return {n: o.cpu().numpy() for n, o in zip(("scores", "labels", "boxes"), outs)}

    def _replay(self, x: torch.Tensor) -> tuple:
        if x.shape[0] not in self._captured:
            static = torch.zeros_like(x, device="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.module(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.module(static)
            self._captured[x.shape[0]] = (graph, static, out)
        graph, static, out = self._captured[x.shape[0]]
        static.copy_(x)
        graph.replay()
        return out


def timed(run, x: np.ndarray, plan: Plan) -> dict:
    """Latency of ``run(x)`` (wall clock per call; outputs are on the host when it returns)."""
    for _ in range(plan.warmup):
        run(x)
    ms = []
    for _ in range(plan.iters):
        t0 = time.perf_counter()
        run(x)
        if plan.device == "cuda":
            torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    med = float(np.median(ms))
    return {"median_ms": med, "p90_ms": float(np.percentile(ms, 90)), "images_per_s": len(x) * 1e3 / med}


def peak_memory(plan: Plan) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if plan.device == "cuda" else None


def reset_peak(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- main --------------------------------------------------------------------------------------------------

def build_engines(q: torch.nn.Module, plan: Plan, folder: Path, fp32_check: bool) -> dict[str, dict]:
    """Build the GPU engine (and its float32 twin); returns name -> {engine, build_s}."""
    dtypes = {"engine": None, **({"engine_fp32": "float32"} if fp32_check and plan.device == "cuda" else {})}
    built = {}
    for name, dtype in dtypes.items():
        t0 = time.perf_counter()
        path = build_torch_engine(q, folder / f"{name}.qdtorch", 4, image_size=plan.size,
                                  batch=None, max_batch=max(plan.batches), device=plan.device, dtype=dtype)
        built[name] = {"engine": open_engine(path), "build_s": time.perf_counter() - t0,
                       "file_mb": path.stat().st_size / 2**20}
    return built


def bench(plan: Plan, fp32_check: bool) -> dict:
    fp, q = make_models(plan)
    with tempfile.TemporaryDirectory() as tmp:
        engines = build_engines(q, plan, Path(tmp), fp32_check)
        runners = {"qdtorch_engine (int4 kernels)": engines["engine"]["engine"].run,
                   "torch_fp16_eager": TorchRunner(fp, plan, graphs=False).run}
        if plan.device == "cuda":
            runners["torch_fp16_cuda_graph"] = TorchRunner(fp, plan, graphs=True).run
        rows, checks = [], []
        for b in plan.batches:
            x = images(plan, b, seed=b)
            want = fake_quant_boxes(q, x, plan)
            for name, e in engines.items():
                diff = box_diff(e["engine"].run(x)["boxes"], want, plan)
                checks.append({"engine": name, "batch": b, "max_box_diff": diff,
                               "bar": BOX_TOL if name == "engine_fp32" or plan.device == "cpu" else None})
            for name, run in runners.items():
                reset_peak(plan)
                rows.append({"method": name, "batch": b, **timed(run, x, plan), "peak_mem_mb":
                             (peak_memory(plan) or 0) / 2**20 if plan.device == "cuda" else None})
        build = {n: {"build_s": e["build_s"], "file_mb": e["file_mb"]} for n, e in engines.items()}
    return {"plan": plan.__dict__, "device": device_name(plan), "torch": torch.__version__, "rows": rows,
            "checks": checks, "build": build,
            "passed": all(c["bar"] is None or c["max_box_diff"] < c["bar"] for c in checks)}


def device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (smoke)"


def markdown(result: dict) -> str:
    lines = [f"## GPU engine vs PyTorch: {result['plan']['preset']} {result['plan']['bits']} at "
             f"{result['plan']['size'][0]}x{result['plan']['size'][1]} on {result['device']}", "",
             "| method | batch | median ms | p90 ms | images/s | peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['images_per_s']:.1f} | {mem} |")
    lines += ["", "| engine vs fake-quant | batch | max normalised box diff | bar |", "|---|---:|---:|---|"]
    for c in result["checks"]:
        bar = "report only" if c["bar"] is None else ("pass" if c["max_box_diff"] < c["bar"] else "FAIL") + \
            f" (< {c['bar']:g})"
        lines.append(f"| {c['engine']} | {c['batch']} | {c['max_box_diff']:.3g} | {bar} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="time the torch GPU engine against float16 PyTorch")
    parser.add_argument("--smoke", action="store_true", help="CPU run of this script's code path (tests)")
    parser.add_argument("--iters", type=int, help="timed calls per method and batch")
    parser.add_argument("--no-fp32-check", action="store_true", help="skip the float32 engine build")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if not args.smoke:
        require_cuda()
    if args.iters:
        plan.iters = args.iters
    result = bench(plan, fp32_check=not args.no_fp32_check)
    path = out_dir() / "bench_engine_gpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    print(markdown(result))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
