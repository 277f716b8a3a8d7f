"""int4 packing, the integer references, the custom ops (CPU), and GPU compile checks that need no GPU.

The Triton kernels themselves are compared with these references in ``test_kernels_triton.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():  # before any kernels import (see test_kernels_triton.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import compile_check, conv_int4, gemm_s4_mma, gemm_w4a8, ops  # noqa: E402
from kernels import quantize_act as qa
from kernels.packing import (  # noqa: E402
    PackedLinear,
    int_range,
    pack_int4,
    pack_int4_np,
    unpack_int4,
    unpack_int4_np,
    zero_point_correction,
)

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "needs CUDA (no GPU on this machine)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


# ----------------------------------------------------------------------------- packing
def test_int_range() -> None:
    assert int_range(4, True) == (-8, 7) and int_range(4, False) == (0, 15)
    assert int_range(8, True) == (-128, 127) and int_range(8, False) == (0, 255)
    with pytest.raises(ValueError):
        int_range(0, True)


def test_pack_order_is_low_nibble_first() -> None:
    packed = pack_int4(torch.tensor([1, -1, -8, 7, 3], dtype=torch.int8))
    assert packed.tolist() == [0xF1, 0x78, 0x03]  # odd K: zero high nibble in the last byte
    assert unpack_int4(packed, 5).tolist() == [1, -1, -8, 7, 3]
    assert unpack_int4(pack_int4(torch.tensor([15, 8, 0])), 3, signed=False).tolist() == [15, 8, 0]


@pytest.mark.parametrize("k", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_roundtrip_and_numpy_twins(k: int, signed: bool) -> None:
    lo, hi = int_range(4, signed)
    codes = torch.randint(lo, hi + 1, (3, 2, k), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k, signed), codes)
    np_packed = pack_int4_np(codes.numpy())
    assert np.array_equal(np_packed, packed.numpy())
    assert np.array_equal(unpack_int4_np(np_packed, k, signed), codes.numpy())


def test_pack_matches_onnx_int4_tensor() -> None:
    onnx = pytest.importorskip("onnx")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx import numpy_helper

    codes = np.random.default_rng(0).integers(-8, 8, size=(5, 13)).astype(np.int8)
    tensor = numpy_helper.from_array(codes.astype(ml_dtypes.int4), "w")
    assert tensor.data_type == onnx.TensorProto.INT4
    # ONNX packs the flattened tensor (rows are not padded): pack the flat codes for an initializer.
    assert tensor.raw_data == pack_int4_np(codes.reshape(-1)).tobytes()
    even = numpy_helper.from_array(codes[:, :12].astype(ml_dtypes.int4), "w")
    assert even.raw_data == pack_int4_np(codes[:, :12]).tobytes()  # even K: per-row packing is the same


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(4))
    with pytest.raises(ValueError):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 7)


def test_zero_point_correction_identity() -> None:
    w = torch.randint(-8, 8, (6, 11), dtype=torch.int8)
    x = torch.randint(0, 256, (4, 11)) - 128
    z = 17
    exact = (x - z) @ w.long().t()
    assert zero_point_correction(w, z).dtype == torch.int32
    assert torch.equal(x @ w.long().t() - zero_point_correction(w, z).long(), exact)


def test_packed_linear_from_float_weight() -> None:
    step = torch.tensor([0.5, 0.25])
    w = torch.tensor([[0.25, 0.75, -0.25, 10.0, -10.0], [0.125, 0.375, 0.1, -0.3, 1.0]])
    layer = PackedLinear.from_float_weight(w, step, act_zero_point=3, bias=torch.tensor([1.0, 2.0]))
    # ties to even (0.5 -> 0, 1.5 -> 2, -0.5 -> 0), clamped to [-8, 7]
    assert layer.codes().tolist() == [[0, 2, 0, 7, -8], [0, 2, 0, -1, 4]]
    assert layer.k == 5 and layer.n == 2 and layer.packed.shape == (2, 3)
    assert layer.zcorr.tolist() == [3 * 1, 3 * 5]
    assert layer.w_step.dtype == torch.float32 and layer.bias.dtype == torch.float32
    scalar = PackedLinear.from_float_weight(w, 0.5, act_zero_point=0)
    assert scalar.w_step.tolist() == [0.5, 0.5] and scalar.bias is None


# ----------------------------------------------------------------------------- references
def test_quantize_act_ref_formula() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 100.0, -100.0, 0.26])
    assert qa.quantize_act_ref(x, 1.0, 0, -128, 127).tolist() == [0, 2, 2, 0, -2, 100, -100, 0]
    assert qa.quantize_act_ref(x, 0.5, 2, 0, 15).tolist() == [3, 5, 7, 1, 0, 15, 0, 3]
    with pytest.raises(ValueError):
        qa.quantize_act_ref(x, 1.0, 0, 0, 255)  # int8 storage: shift unsigned 8-bit codes by -128
    with pytest.raises(ValueError):
        qa.quantize_act_ref(x, 0.0, 0, -8, 7)


def test_epilogue_ref_order() -> None:
    acc = torch.tensor([[100, -7]], dtype=torch.int32)
    out = gemm_w4a8.epilogue_ref(
        acc, torch.tensor([4, -3]), 0.1, torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.0])
    )
    scale = torch.tensor(0.1, dtype=torch.float32) * torch.tensor([0.5, 2.0])
    expected = torch.tensor([[96.0, -4.0]]) * scale + torch.tensor([1.0, 0.0])
    assert torch.equal(out, expected)


def test_w4a8_ref_matches_float_linear() -> None:
    n, k, z, x_step = 9, 37, 6, 0.05
    layer = PackedLinear.from_float_weight(
        torch.randn(n, k), torch.rand(n) * 0.1 + 0.02, z, bias=torch.randn(n)
    )
    x = torch.randint(-128, 128, (2, 5, k), dtype=torch.int8)
    out = gemm_w4a8.w4a8_linear_ref(x, layer.packed, k, layer.w_step, layer.zcorr, x_step, layer.bias)
    x_hat = (x.double() - z) * x_step
    w_hat = layer.codes().double() * layer.w_step.double()[:, None]
    expected = x_hat @ w_hat.t() + layer.bias.double()
    assert out.shape == (2, 5, n)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ks,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0)])
def test_conv_ref_matches_float_conv(ks: int, stride: int, pad: int) -> None:
    b, h, w, cin, cout, z, x_step = 2, 7, 9, 5, 6, -4, 0.03
    weight = torch.randn(cout, cin, ks, ks)
    layer = PackedLinear.from_float_weight(
        conv_int4.conv_weight_to_gemm(weight), torch.rand(cout) * 0.1 + 0.02, z, bias=torch.randn(cout)
    )
    x = torch.randint(-128, 128, (b, h, w, cin), dtype=torch.int8)
    out = conv_int4.w4_conv2d_ref(
        x, layer.packed, ks, stride, pad, layer.w_step, layer.zcorr, x_step, z, layer.bias
    )
    w_hat = (
        layer.codes().double().reshape(cout, ks, ks, cin).permute(0, 3, 1, 2)
        * layer.w_step.double()[:, None, None, None]
    )
    x_hat = ((x.double() - z) * x_step).permute(0, 3, 1, 2)
    expected = torch.nn.functional.conv2d(x_hat, w_hat, layer.bias.double(), stride, pad).permute(0, 2, 3, 1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- custom ops (CPU -> references)
def _op_samples() -> list[tuple[object, tuple, dict]]:
    torch.manual_seed(0)
    n, k, m = 13, 21, 5
    lin = PackedLinear.from_float_weight(
        torch.randn(n, k), torch.rand(n) * 0.1 + 0.01, 3, bias=torch.randn(n)
    )
    conv = PackedLinear.from_float_weight(torch.randn(n, 9 * 4), torch.rand(n) * 0.1 + 0.01, 3)
    x = torch.randint(-128, 128, (2, m, k), dtype=torch.int8)
    xp = pack_int4(torch.randint(0, 16, (m, k)))
    lin_args = (lin.packed, k, lin.w_step, lin.zcorr, 0.03)
    return [
        (ops.quantize_act, (torch.randn(3, 5), 0.1, 2, -128, 127), {}),
        (ops.w4a8_linear, (x, *lin_args, lin.bias), {}),
        (ops.w4a8_linear, (x, *lin_args, None), {"out_dtype": torch.float16}),
        (ops.w4a8_linear, (x, *lin_args, lin.bias), {"out_step": 0.1, "out_zero_point": 1}),
        (ops.w4a4_linear, (xp, False, *lin_args, lin.bias), {}),
        (
            ops.w4_conv2d,
            (
                torch.randint(-128, 128, (2, 5, 7, 4), dtype=torch.int8),
                conv.packed,
                3,
                2,
                1,
                conv.w_step,
                conv.zcorr,
                0.03,
                3,
            ),
            {},
        ),
    ]


@pytest.mark.parametrize("index", range(6))
def test_custom_op_opcheck(index: int) -> None:
    op, args, kwargs = _op_samples()[index]
    result = torch.library.opcheck(op, args, kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_custom_ops_dispatch_cpu_to_references() -> None:
    samples = _op_samples()
    x, packed, k, w_step, zcorr, x_step, bias = samples[1][1]
    assert torch.equal(
        torch.ops.qdetr.w4a8_linear(x, packed, k, w_step, zcorr, x_step, bias),
        gemm_w4a8.w4a8_linear_ref(x, packed, k, w_step, zcorr, x_step, bias),
    )
    out = ops.w4a8_linear(x, packed, k, w_step, zcorr, x_step, bias, out_step=0.1, out_zero_point=1)
    assert out.dtype == torch.int8 and out.shape == (2, 5, 13)
    y = torch.randn(4, 6)
    assert torch.equal(torch.ops.qdetr.quantize_act(y, 0.1, 0, -8, 7), qa.quantize_act_ref(y, 0.1, 0, -8, 7))
    xc, wp, ks, st, pd, ws, zc, xs, xz = samples[5][1]
    out = torch.ops.qdetr.w4_conv2d(xc, wp, ks, st, pd, ws, zc, xs, xz)
    assert out.shape == (2, 3, 4, 13)


# ----------------------------------------------------------------------------- GPU-only (skip here)
@needs_cuda
def test_triton_kernels_on_cuda_match_references() -> None:
    layer = PackedLinear.from_float_weight(
        torch.randn(70, 129), torch.rand(70) * 0.1 + 0.02, 3, bias=torch.randn(70)
    ).to("cuda")
    x = torch.randint(-128, 128, (33, 129), dtype=torch.int8, device="cuda")
    args = (x, layer.packed, 129, layer.w_step, layer.zcorr, 0.02, layer.bias)
    for kw in ({"return_acc": True}, {"out_dtype": torch.float16}, {}):
        assert torch.equal(gemm_w4a8.w4a8_linear(*args, **kw), gemm_w4a8.w4a8_linear_ref(*args, **kw))
    assert torch.equal(ops.w4a8_linear(*args), gemm_w4a8.w4a8_linear_ref(*args))


@needs_cuda
def test_custom_ops_compile_and_cuda_graph() -> None:
    layer = PackedLinear.from_float_weight(torch.randn(64, 256), torch.rand(64) * 0.1 + 0.02, 0).to("cuda")
    x = torch.randn(128, 256, device="cuda")

    def f(t: torch.Tensor) -> torch.Tensor:
        q = ops.quantize_act(t, 0.05, 0, -128, 127)
        return ops.w4a8_linear(q, layer.packed, 256, layer.w_step, layer.zcorr, 0.05, None, torch.float16)

    eager = f(x)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = f(x)
    graph.replay()
    assert torch.equal(captured, eager)


def test_gemm_s4_mma_matches_reference() -> None:
    reason = gemm_s4_mma.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    m, n, k = 70, 72, 257
    layer = PackedLinear.from_float_weight(
        torch.randn(n, k), torch.rand(n) * 0.1 + 0.02, 8, bias=torch.randn(n)
    ).to("cuda")
    for signed, (lo, hi) in ((True, (-8, 7)), (False, (0, 15))):
        xp = pack_int4(torch.randint(lo, hi + 1, (m, k), device="cuda"))
        args = (xp, signed, layer.packed, k, layer.w_step, layer.zcorr, 0.07, layer.bias)
        for kw in (
            {"return_acc": True},
            {},
            {"out_dtype": torch.float16},
            {"out_quant": qa.ActQuant(0.2, 8, 0, 15)},
        ):
            assert torch.equal(
                gemm_s4_mma.w4a4_linear_mma(*args, **kw), gemm_w4a8.w4a4_linear_ref(*args, **kw)
            )


def test_gemm_s4_mma_availability_reason() -> None:
    if not torch.cuda.is_available():
        assert gemm_s4_mma.unavailable_reason() == NO_CUDA and not gemm_s4_mma.is_available()
        with pytest.raises(RuntimeError, match="needs CUDA"):
            gemm_s4_mma.load_extension()


# ----------------------------------------------------------------------------- compile checks without a GPU
def _has_triton_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton_nvidia_backend(), reason="triton has no NVIDIA backend here")
def test_triton_kernels_compile_for_hopper_and_orin() -> None:
    """AOT-compile every kernel for sm_90 and sm_87 (fresh process: compiled, not interpreted, mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 12
    for name, facts in report.items():
        assert not facts["fma_f32"], name  # no contracted a*b+c: float outputs match the reference
        assert facts["div_rn"] == ("quant" in name or name.startswith("quantize_act")), name
        if not name.startswith("quantize_act"):
            assert facts["int8_mma"] and facts["pipelined"], name
            assert any(m.startswith("wgmma" if name.endswith("sm90") else "mma.sync") for m in facts["mma"])


@needs_nvcc
def test_cuda_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    for arch in ("sm_87", "sm_80", "sm_90"):  # sm_90: emulated int4 MMA (the H200 correctness check)
        obj = compile_check.nvcc_compile(arch, tmp_path / f"gemm_s4_mma_{arch}.o")
        assert obj.stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    if cuobjdump:
        sass = subprocess.run(
            [cuobjdump, "-sass", str(tmp_path / "gemm_s4_mma_sm_87.o")], capture_output=True, text=True
        ).stdout
        assert "IMMA.16864.S4.S4" in sass and "IMMA.16864.U4.S4" in sass  # native int4 tensor-core MMA


@needs_nvcc
def test_cuda_binding_compiles_with_torch_headers(tmp_path: Path) -> None:
    """The full extension source (dispatcher binding included), as cpp_extension.load compiles it."""
    obj = compile_check.nvcc_compile("sm_87", tmp_path / "gemm_s4_mma_torch.o", with_torch=True)
    assert obj.stat().st_size > 0


def _triton_tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def test_autotune_pruning_keeps_small_tiles_for_small_problems() -> None:
    configs = gemm_w4a8.GPU_CONFIGS
    one = gemm_w4a8.prune_configs(configs, {"M": 1, "N": 17})
    assert one and all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] <= 64 for c in one)
    assert gemm_w4a8.prune_configs(configs, {"M": 7600, "N": 2048}) == configs


# ----------------------------------------------------------------------------- the GPU benchmark script
BENCH = ROOT / "benchmarks" / "bench_kernels_gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_benchmark_exits_clearly_without_cuda() -> None:
    proc = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_benchmark_smoke_on_cpu(tmp_path: Path) -> None:
    """The benchmark's whole code path on the CPU (interpreter, tiny shapes): checks pass, report written."""
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_kernels_gpu.json").read_text())
    assert report["checks"] and all(c["exact"] for c in report["checks"])
    kernels_timed = {r["kernel"] for r in report["timings"]}
    assert {"triton w4a8 fp16-out", "triton w4a4 fp16-out", "torch._int_mm int8"} <= kernels_timed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| triton w4a4 fp16-out")  # the table is last


def test_output_options_are_checked() -> None:
    with pytest.raises(TypeError, match="float16 or float32"):
        gemm_w4a8.out_kind(torch.bfloat16, None, False)
    with pytest.raises(ValueError, match="int8"):
        gemm_w4a8.out_kind(torch.float32, qa.ActQuant(0.1, 0, 0, 255), False)
    assert gemm_w4a8.out_kind(torch.float16, qa.ActQuant(0.1, 0, -8, 7), True) == (
        gemm_w4a8.OUT_ACC,
        torch.int32,
    )
