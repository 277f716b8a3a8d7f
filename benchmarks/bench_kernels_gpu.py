"""GPU check and benchmark of the int4 kernels (one prepared run for an H200 or any CUDA GPU).

1. Checks every kernel against its integer reference on random CUDA data (bit-exact is the bar; float
   outputs that differ report their largest difference in float32 ulps).
2. Measures the device: int8 peak (``torch._int_mm`` at 8192^3), float16 peak (``torch.matmul`` at
   8192^3) and device-to-device copy bandwidth.
3. Times with ``triton.testing.do_bench`` (median; also under a CUDA graph, which removes the Python
   launch cost) the W4A8 and W4A4 GEMMs at DETR shapes (M = 950 * batch tokens of an 800x1216 image at
   stride 32, batch 1 and 8; (K, N) in {(256, 256), (256, 2048), (2048, 256)}) and at 8192^3, plus the
   3x3 conv of the backbone's last stage, against float16 linear/conv and ``torch._int_mm``. Reports
   TOPS, ratios, weight bytes vs float16 and % of a roofline: max(ops / measured int8 peak, bytes /
   measured copy bandwidth) over the measured time.

Writes ``bench_kernels_gpu.json`` to ``$OUT`` (or ``./bench_out``) and prints a Markdown table last.
Usage: ``python benchmarks/bench_kernels_gpu.py [--quick]``; exit status 1 when a check fails, 2 without
CUDA. ``--smoke`` runs the same code path on the CPU (Triton interpreter, tiny shapes, wall-clock timing)
to test this script; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Plan:
    """Sizes of one run: the real GPU plan or the CPU smoke plan."""

    device: str = "cuda"
    smoke: bool = False
    tokens_per_image: int = 950  # 800x1216 image, stride-32 feature map 25 x 38
    detr_kn: tuple = ((256, 256), (256, 2048), (2048, 256))
    big: int = 8192
    copy_bytes: int = 1 << 30
    conv: tuple = ((1, (25, 38), 512), (2, (50, 76), 512))  # (stride, (H, W), channels)
    check_gemms: tuple = ((1, 33, 17), (37, 77, 45), (950, 256, 2048), (7600, 2048, 256), (300, 4097, 130))
    check_convs: tuple = (
        (2, 13, 17, 35, 70, 3, 1, 1),
        (2, 13, 17, 64, 64, 3, 2, 1),
        (1, 25, 38, 256, 256, 1, 1, 0),
    )


SMOKE = Plan(
    device="cpu",
    smoke=True,
    tokens_per_image=19,
    detr_kn=((32, 32), (32, 64)),
    big=64,
    copy_bytes=1 << 20,
    conv=((2, (9, 11), 16),),
    check_gemms=((1, 33, 17), (37, 77, 45)),
    check_convs=((2, 7, 9, 5, 11, 3, 2, 1), (1, 5, 6, 8, 8, 1, 1, 0)),
)
PLAN = Plan()


def require_cuda() -> None:
    """Exit with a clear message when no CUDA device is present."""
    if not torch.cuda.is_available():
        print(
            "bench_kernels_gpu: needs a CUDA GPU, none is visible (torch.cuda.is_available() is False); "
            "nothing was run.",
            file=sys.stderr,
        )
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels_gpu: unset TRITON_INTERPRET (the interpreter is for CPU tests)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- data and comparison
def make_layer(n: int, k: int, z: int, bias: bool = True, seed: int = 0):
    from kernels.packing import PackedLinear

    g = torch.Generator().manual_seed(seed)
    w, step = torch.randn(n, k, generator=g), torch.rand(n, generator=g) * 0.1 + 0.01
    b = torch.randn(n, generator=g) if bias else None
    return PackedLinear.from_float_weight(w, step, z, bias=b).to(PLAN.device)


def codes(shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, device=PLAN.device, dtype=torch.int8)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 ulps (0 when equal)."""
    ia, ib = (t.float().view(torch.int32).long() for t in (a, b))
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)  # monotonic integer order of floats
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max().item()) if a.numel() else 0


def compare(name: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
    exact = got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)
    row = {"check": name, "exact": bool(exact), "shape": list(got.shape), "dtype": str(got.dtype)}
    if not exact and got.shape == ref.shape:
        if got.dtype.is_floating_point:
            row["max_ulp"] = ulp_diff(got, ref)
        else:
            row["max_abs"] = int((got.long() - ref.long()).abs().max().item())
        row["mismatches"] = int((got != ref).sum().item())
    print(f"  check {name:50s} {'exact' if exact else 'MISMATCH ' + json.dumps(row)}", flush=True)
    return row


# ----------------------------------------------------------------------------- checks
GEMM_OUTPUTS = (("acc", {"return_acc": True}), ("fp32", {}), ("fp16", {"out_dtype": torch.float16}))


def check_quantize() -> list[dict]:
    from kernels import quantize_act as qa

    x = torch.randn(4097, 33, device=PLAN.device) * 3
    rows = []
    for dt in (torch.float32, torch.float16):
        for p in ((0.0371, 3, -128, 127), (0.25, 8, 0, 15)):
            xd = x.to(dt)
            rows.append(
                compare(f"quantize_act {dt} {p}", qa.quantize_act(xd, *p), qa.quantize_act_ref(xd, *p))
            )
    return rows


def load_mma() -> bool:
    """Build the CUDA int4-MMA extension (native on sm_8x, emulated on sm_9x); False if unavailable."""
    from kernels import gemm_s4_mma

    reason = gemm_s4_mma.unavailable_reason(allow_emulated=True)
    if reason is None:
        try:
            start = time.time()
            gemm_s4_mma.load_extension(allow_emulated=True)
            print(f"  built the CUDA int4-MMA extension in {time.time() - start:.0f} s", flush=True)
            return True
        except Exception as e:  # noqa: BLE001 - a missing compiler must not stop the Triton checks
            reason = f"build failed: {type(e).__name__}: {str(e)[-500:]}"
    print(f"  CUDA int4-MMA kernel not checked: {reason}", flush=True)
    return False


def check_gemm(m: int, k: int, n: int, mma: bool) -> list[dict]:
    from kernels import gemm_s4_mma
    from kernels import gemm_w4a8 as g
    from kernels.packing import pack_int4
    from kernels.quantize_act import ActQuant

    layer = make_layer(n, k, z=5, seed=m)
    a = (codes((m, k), -128, 127), layer.packed, k, layer.w_step, layer.zcorr, 0.0213, layer.bias)
    outputs = (*GEMM_OUTPUTS, ("quant", {"out_quant": ActQuant(0.05, 3, -128, 127)}))
    rows = [
        compare(f"w4a8 {m}x{k}x{n} {t}", g.w4a8_linear(*a, **kw), g.w4a8_linear_ref(*a, **kw))
        for t, kw in outputs
    ]
    for signed, lo, hi in ((True, -8, 7), (False, 0, 15)):
        a4 = (pack_int4(codes((m, k), lo, hi)), signed, *a[1:])
        tag = f"{'s4' if signed else 'u4'} {m}x{k}x{n}"
        for t, kw in GEMM_OUTPUTS:
            ref = g.w4a4_linear_ref(*a4, **kw)
            rows.append(compare(f"w4a4 {tag} {t}", g.w4a4_linear(*a4, **kw), ref))
            if mma:
                got = gemm_s4_mma.w4a4_linear_mma(*a4, **kw, allow_emulated=True)
                rows.append(compare(f"cuda-mma w4a4 {tag} {t}", got, ref))
    return rows


def check_conv(b: int, h: int, w: int, cin: int, cout: int, ks: int, st: int, pd: int) -> list[dict]:
    from kernels import conv_int4

    layer = make_layer(cout, ks * ks * cin, z=-3, seed=cin)
    a = (
        codes((b, h, w, cin), -128, 127),
        layer.packed,
        ks,
        st,
        pd,
        layer.w_step,
        layer.zcorr,
        0.02,
        -3,
        layer.bias,
    )
    name = f"conv{ks}x{ks}/s{st} {b}x{h}x{w}x{cin}->{cout}"
    return [
        compare(f"{name} {t}", conv_int4.w4_conv2d(*a, **kw), conv_int4.w4_conv2d_ref(*a, **kw))
        for t, kw in GEMM_OUTPUTS
    ]


def check_graph_and_compile() -> dict:
    """quantize -> GEMM through the custom ops: eager vs torch.compile vs CUDA graph replay."""
    from kernels import ops

    layer = make_layer(256, 256, z=0, bias=True)
    x = torch.randn(950, 256, device="cuda")

    def f(t: torch.Tensor) -> torch.Tensor:
        q = ops.quantize_act(t, 0.05, 0, -128, 127)
        return ops.w4a8_linear(
            q, layer.packed, 256, layer.w_step, layer.zcorr, 0.05, layer.bias, torch.float16
        )

    eager = f(x)
    same_compiled = torch.equal(torch.compile(f, fullgraph=True)(x), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = f(x)
    graph.replay()
    torch.cuda.synchronize()
    ok = same_compiled and torch.equal(captured, eager)
    print(f"  check {'ops: torch.compile + CUDA graph':50s} {'exact' if ok else 'MISMATCH'}", flush=True)
    return {"check": "ops torch.compile + cuda graph", "exact": bool(ok)}


def run_checks() -> list[dict]:
    print(f"checks ({PLAN.device} kernels vs integer references):", flush=True)
    mma = load_mma()
    rows = check_quantize()
    for shape in PLAN.check_gemms:
        rows += check_gemm(*shape, mma=mma)
    for shape in PLAN.check_convs:
        rows += check_conv(*shape)
    if not PLAN.smoke:
        rows.append(check_graph_and_compile())
    return rows


# ----------------------------------------------------------------------------- timing
def timed(fn, quick: bool) -> dict:
    """Median ms with do_bench (eager, includes the Python launch cost) and under a CUDA graph."""
    fn()  # compile / autotune outside the measurements and the graph capture
    if PLAN.smoke:
        start = time.perf_counter()
        fn()
        return {"ms": (time.perf_counter() - start) * 1e3, "graph_ms": float("nan")}
    import triton.testing as tt

    torch.cuda.synchronize()
    rep = 30 if quick else 100
    eager = tt.do_bench(fn, warmup=10, rep=rep, return_mode="median")
    try:
        graph = tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as e:  # noqa: BLE001 - report and keep going
        print(f"    (cuda graph timing failed: {type(e).__name__}: {e})", flush=True)
        graph = float("nan")
    return {"ms": eager, "graph_ms": graph}


def best_ms(t: dict) -> float:
    return min(v for v in (t["ms"], t["graph_ms"]) if not math.isnan(v))


def measure_device(quick: bool) -> dict:
    """int8 and float16 peaks at big^3, and device-to-device copy bandwidth (read + write)."""
    n = PLAN.big
    a8, b8 = codes((n, n), -128, 127), codes((n, n), -128, 127).t()
    t8 = timed(lambda: torch._int_mm(a8, b8), quick)
    dt16 = torch.float32 if PLAN.smoke else torch.float16  # CPU half matmul is slow or missing
    a16, b16 = (torch.randn(n, n, device=PLAN.device, dtype=dt16) for _ in range(2))
    t16 = timed(lambda: torch.matmul(a16, b16), quick)
    src = torch.empty(PLAN.copy_bytes, dtype=torch.uint8, device=PLAN.device)
    dst = torch.empty_like(src)
    tc = timed(lambda: dst.copy_(src), quick)
    ops = 2.0 * n**3
    dev = {
        "int8_peak_tops": ops / best_ms(t8) / 1e9,
        "fp16_peak_tflops": ops / best_ms(t16) / 1e9,
        "copy_bandwidth_gbs": 2 * src.numel() / best_ms(tc) / 1e6,
    }
    print(f"device: {json.dumps({k: round(v, 1) for k, v in dev.items()})}", flush=True)
    return dev


def measure(
    name: str,
    fn,
    shape: tuple[int, int, int],
    nbytes: tuple[int, int, int],
    peak: float,
    dev: dict,
    quick: bool,
) -> dict:
    """Time one kernel; ``nbytes`` = (activation, weight, output) bytes, ``peak`` in T(FL)OPS."""
    m, k, n = shape
    t = timed(fn, quick)
    ops = 2.0 * m * n * k
    compute_ms, memory_ms = ops / (peak * 1e9), sum(nbytes) / (dev["copy_bandwidth_gbs"] * 1e6)
    floor = max(compute_ms, memory_ms)
    row = {
        "kernel": name,
        "M": m,
        "K": k,
        "N": n,
        **t,
        "tops": ops / t["ms"] / 1e9,
        "weight_bytes": nbytes[1],
        "weight_vs_fp16": nbytes[1] / (2 * n * k),
        "roofline_ms": floor,
        "bound": "compute" if compute_ms >= memory_ms else "memory",
        "pct_of_roofline": 100 * floor / t["ms"],
    }
    if not math.isnan(t["graph_ms"]):
        row["graph_tops"] = ops / t["graph_ms"] / 1e9
        row["graph_pct_of_roofline"] = 100 * floor / t["graph_ms"]
    print(
        f"  {name:28s} M{m} K{k} N{n}: {t['ms'] * 1e3:9.1f} us (graph {t['graph_ms'] * 1e3:9.1f} us) "
        f"{row['tops']:8.2f} TOPS {row['pct_of_roofline']:5.1f}% of roofline",
        flush=True,
    )
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add speedups against the float16 row (first) and the _int_mm row (when present)."""
    int_mm = [r for r in rows if r["kernel"].startswith("torch._int_mm")]
    for row in rows:
        row["speedup_vs_fp16"] = rows[0]["ms"] / row["ms"]
        if int_mm:
            row["speedup_vs_int_mm"] = int_mm[0]["ms"] / row["ms"]
    return rows


def run_cases(cases: list[tuple], shape: tuple[int, int, int], dev: dict, quick: bool) -> list[dict]:
    """Time ``(name, fn, (activation, weight, output) bytes, peak)`` cases; add ratios to the first row."""
    return with_ratios(
        [measure(name, fn, shape, nbytes, peak, dev, quick) for name, fn, nbytes, peak in cases]
    )


def bench_gemm(m: int, k: int, n: int, dev: dict, quick: bool) -> list[dict]:
    """W4A8 and W4A4 (float16 out) against float16 linear and _int_mm on one (M, K, N)."""
    from kernels import gemm_s4_mma, gemm_w4a8
    from kernels.packing import pack_int4, packed_len

    layer = make_layer(n, k, z=3)
    x8, xp = codes((m, k), -128, 127), pack_int4(codes((m, k), -8, 7))
    dt16 = torch.float32 if PLAN.smoke else torch.float16
    x16 = torch.randn(m, k, device=PLAN.device, dtype=dt16)
    w16 = torch.randn(n, k, device=PLAN.device, dtype=dt16)
    w8t = codes((n, k), -128, 127).t()
    a = (layer.packed, k, layer.w_step, layer.zcorr, 0.02, layer.bias)
    kb, i8, f16 = packed_len(k), dev["int8_peak_tops"], dev["fp16_peak_tflops"]
    fp16_bytes, int8_bytes = (2 * m * k, 2 * n * k, 2 * m * n), (m * k, n * k, 4 * m * n)
    w4a8_bytes, w4a4_bytes = (m * k, n * kb, 2 * m * n), (m * kb, n * kb, 2 * m * n)
    out16 = torch.float16
    cases = [
        ("torch fp16 linear", lambda: torch.nn.functional.linear(x16, w16), fp16_bytes, f16),
        ("torch._int_mm int8", lambda: torch._int_mm(x8, w8t), int8_bytes, i8),
        ("triton w4a8 fp16-out", lambda: gemm_w4a8.w4a8_linear(x8, *a, out_dtype=out16), w4a8_bytes, i8),
        (
            "triton w4a4 fp16-out",
            lambda: gemm_w4a8.w4a4_linear(xp, True, *a, out_dtype=out16),
            w4a4_bytes,
            i8,
        ),
    ]
    if gemm_s4_mma.is_available():  # native int4 MMA only (sm_8x); emulated timings would mislead
        mma = lambda: gemm_s4_mma.w4a4_linear_mma(xp, True, *a, out_dtype=torch.float16)  # noqa: E731
        cases.append(("cuda mma w4a4 fp16-out", mma, w4a4_bytes, i8))
    return run_cases(cases, (m, k, n), dev, quick)


def bench_conv(batch: int, hw: tuple[int, int], ch: int, stride: int, dev: dict, quick: bool) -> list[dict]:
    """3x3 implicit-GEMM conv (NHWC int8 in, float16 out) against cuDNN float16 conv (channels_last)."""
    from kernels import conv_int4
    from kernels.packing import packed_len

    (h, w), k = hw, 9 * ch
    layer = make_layer(ch, k, z=-3)
    xc = codes((batch, h, w, ch), -128, 127)
    dt16 = torch.float32 if PLAN.smoke else torch.float16
    cl = torch.channels_last
    x16 = torch.randn(batch, ch, h, w, device=PLAN.device, dtype=dt16).to(memory_format=cl)
    w16 = torch.randn(ch, ch, 3, 3, device=PLAN.device, dtype=dt16).to(memory_format=cl)
    ho, wo = (conv_int4.conv_out_size(s, 3, stride, 1) for s in (h, w))
    m, act = batch * ho * wo, batch * h * w * ch
    args = (layer.packed, 3, stride, 1, layer.w_step, layer.zcorr, 0.02, -3, layer.bias, torch.float16)
    cases = [
        (f"cudnn fp16 conv3x3/s{stride}", lambda: torch.nn.functional.conv2d(x16, w16, None, stride, 1),
         (2 * act, 2 * ch * k, 2 * m * ch), dev["fp16_peak_tflops"]),
        (f"triton w4 conv3x3/s{stride}", lambda: conv_int4.w4_conv2d(xc, *args),
         (act, ch * packed_len(k), 2 * m * ch), dev["int8_peak_tops"]),
    ]  # fmt: skip
    return run_cases(cases, (m, k, ch), dev, quick)


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict], dev: dict, checks: list[dict]) -> str:
    failed = [c["check"] for c in checks if not c["exact"]]
    head = (
        f"int8 peak {dev['int8_peak_tops']:.0f} TOPS (_int_mm {PLAN.big}^3), "
        f"fp16 peak {dev['fp16_peak_tflops']:.0f} TFLOPS, copy {dev['copy_bandwidth_gbs']:.0f} GB/s; "
        f"checks: {len(checks) - len(failed)}/{len(checks)} exact"
    )
    lines = [
        head + (f" (FAILED: {', '.join(failed)})" if failed else ""),
        "",
        "| kernel | M | K | N | us (do_bench) | us (graph) | T(FL)OPS | vs fp16 | vs _int_mm "
        "| weight B vs fp16 | % roofline | bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs8 = f"{r['speedup_vs_int_mm']:.2f}x" if "speedup_vs_int_mm" in r else "-"
        cells = [
            r["kernel"], r["M"], r["K"], r["N"], f"{r['ms'] * 1e3:.1f}", f"{r['graph_ms'] * 1e3:.1f}",
            f"{r['tops']:.1f}", f"{r['speedup_vs_fp16']:.2f}x", vs8, f"{r['weight_vs_fp16']:.3f}",
            f"{r['pct_of_roofline']:.0f}%", r["bound"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global PLAN
    parser = argparse.ArgumentParser(description="check and time the int4 kernels on a CUDA GPU")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, batch 1 only")
    parser.add_argument("--skip-checks", action="store_true", help="timings only")
    parser.add_argument("--smoke", action="store_true", help="CPU run of this script's code path (tests)")
    args = parser.parse_args()
    if args.smoke:
        PLAN = SMOKE
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.* is imported (all imports here are lazy)
    else:
        require_cuda()
    start = time.time()
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    info = {"device": PLAN.device, "torch": torch.__version__, "triton": triton.__version__}
    if not PLAN.smoke:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}")
    print(json.dumps(info), flush=True)
    checks = [] if args.skip_checks else run_checks()
    dev = measure_device(args.quick)
    print("timing:", flush=True)
    rows: list[dict] = []
    for batch in (1,) if args.quick else (1, 8):
        for k, n in PLAN.detr_kn:
            rows += bench_gemm(PLAN.tokens_per_image * batch, k, n, dev, args.quick)
        for stride, hw, ch in PLAN.conv:
            rows += bench_conv(batch, hw, ch, stride, dev, args.quick)
    rows += bench_gemm(PLAN.big, PLAN.big, PLAN.big, dev, args.quick)
    report = {"info": info, "device": dev, "checks": checks, "timings": rows, "seconds": time.time() - start}
    path = out_dir / "bench_kernels_gpu.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path} ({report['seconds']:.0f} s)\n", flush=True)
    print(markdown(rows, dev, checks))
    sys.exit(1 if any(not c["exact"] for c in checks) else 0)


if __name__ == "__main__":
    main()
