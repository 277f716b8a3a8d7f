"""Triton kernels against their integer references, bit for bit, on random data of awkward sizes.

Without a GPU the kernels run in Triton's interpreter (NumPy, CPU tensors). Triton decides between the
interpreter and the compiler when a ``@triton.jit`` function is *defined*, i.e. when ``kernels.*`` is
first imported, so ``TRITON_INTERPRET=1`` is set here before that import. If another test module imported
``kernels`` earlier in this pytest process (compiled mode), the in-process tests skip and
``test_triton_suite_in_subprocess`` reruns this file in a fresh interpreter-mode process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import conv_int4, gemm_w4a8  # noqa: E402
from kernels import quantize_act as qa
from kernels._triton import is_interpreted  # noqa: E402
from kernels.packing import PackedLinear, pack_int4  # noqa: E402
from kernels.quantize_act import ActQuant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = torch.cuda.is_available() or is_interpreted(gemm_w4a8._w4_gemm_kernel)
in_process = pytest.mark.skipif(
    not RUNNABLE,
    reason="kernels were imported in compiled mode before TRITON_INTERPRET was set; "
    "test_triton_suite_in_subprocess runs these checks",
)


def test_triton_suite_in_subprocess() -> None:
    """The fallback: this file in a fresh process with TRITON_INTERPRET=1."""
    if RUNNABLE:
        pytest.skip("the Triton checks run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _layer(n: int, k: int, z: int, seed: int, bias: bool = True) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    step = torch.rand(n, generator=g) * 0.2 + 0.05
    b = torch.randn(n, generator=g) if bias else None
    return PackedLinear.from_float_weight(w, step, z, bias=b).to(DEVICE)


def _codes(shape: tuple[int, ...], lo: int, hi: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8).to(DEVICE)


# ----------------------------------------------------------------------------- quantize_act
QUANTIZERS = [
    (0.0371, 3, -128, 127),
    (0.25, 0, 0, 15),
    (0.5, -2, -8, 7),
    (1.0, 1, -128, 127),
    (0.1, 0, 0, 127),
]


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("params", QUANTIZERS)
def test_quantize_act_matches_ref(dtype: torch.dtype, params: tuple[float, int, int, int]) -> None:
    step = params[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1001, generator=g) * 40 * step
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * step  # exact k + 0.5 for binary steps
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 6e4, -6e4, 1e-8, step / 2, -step / 2])
    x = torch.cat([x.flatten(), ties, special]).to(dtype).to(DEVICE)
    out = qa.quantize_act(x, *params)
    assert out.dtype == torch.int8 and out.shape == x.shape
    assert torch.equal(out, qa.quantize_act_ref(x, *params))


@in_process
def test_quantize_act_ties_round_to_even_and_shapes() -> None:
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5]], device=DEVICE)
    assert qa.quantize_act(x, 1.0, 0, -128, 127).tolist() == [[0, 2, 2, 0, -2, -2]]
    assert qa.quantize_act(torch.empty(0, 7, device=DEVICE), 0.1, 0, -128, 127).shape == (0, 7)
    y = torch.randn(2, 3, 5, device=DEVICE).transpose(1, 2)  # non-contiguous
    assert torch.equal(qa.quantize_act(y, 0.05, 4, -8, 7), qa.quantize_act_ref(y, 0.05, 4, -8, 7))


# ----------------------------------------------------------------------------- GEMM
# (M, N, K): partial tiles, odd K, M = 1, and a batch of 8 images x 19 tokens
SHAPES = [(1, 17, 33), (8, 40, 77), (37, 45, 64), (33, 70, 129), (8 * 19, 24, 96)]


@in_process
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w4a8_accumulators_exact(m: int, n: int, k: int) -> None:
    layer = _layer(n, k, z=5, seed=m + n + k)
    x = _codes((m, k), -128, 127, seed=k)
    args = (layer.packed, k, layer.w_step, layer.zcorr, 0.0371, layer.bias)
    acc = gemm_w4a8.w4a8_linear(x, *args, return_acc=True)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, gemm_w4a8.w4a8_linear_ref(x, *args, return_acc=True))


@in_process
@pytest.mark.parametrize("m,n,k", SHAPES[:3])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_w4a8_float_output_exact(m: int, n: int, k: int, has_bias: bool, out_dtype: torch.dtype) -> None:
    layer = _layer(n, k, z=-7, seed=3 * m + k, bias=has_bias)
    x = _codes((2, m, k), -128, 127, seed=n)  # leading dims are flattened into M
    args = (layer.packed, k, layer.w_step, layer.zcorr, 0.021, layer.bias, out_dtype)
    out = gemm_w4a8.w4a8_linear(x, *args)
    assert out.shape == (2, m, n) and out.dtype == out_dtype
    assert torch.equal(out, gemm_w4a8.w4a8_linear_ref(x, *args))


@in_process
@pytest.mark.parametrize("m,n,k", SHAPES[1:3])
def test_w4a8_fused_output_quantization(m: int, n: int, k: int) -> None:
    layer = _layer(n, k, z=2, seed=11)
    x = _codes((m, k), -128, 127, seed=12)
    for q in (ActQuant(0.05, 3, -128, 127), ActQuant(0.2, 0, 0, 15), ActQuant(0.1, -1, -8, 7)):
        args = (layer.packed, k, layer.w_step, layer.zcorr, 0.03, layer.bias)
        out = gemm_w4a8.w4a8_linear(x, *args, out_quant=q)
        assert out.dtype == torch.int8
        assert torch.equal(out, gemm_w4a8.w4a8_linear_ref(x, *args, out_quant=q))


@in_process
def test_w4a8_strided_input_and_extreme_codes() -> None:
    k, n = 1001, 24  # |acc| up to 128 * 8 * 1001: far beyond int16, well inside int32
    layer = PackedLinear(
        pack_int4(torch.full((n, k), -8)), k, torch.ones(n), None, torch.zeros(n, dtype=torch.int32)
    ).to(DEVICE)
    x = torch.full((3, k), -128, dtype=torch.int8, device=DEVICE)
    acc = gemm_w4a8.w4a8_linear(x, layer.packed, k, layer.w_step, layer.zcorr, 1.0, return_acc=True)
    assert (acc == 128 * 8 * k).all()
    wide = _codes((5, 2 * 40), -128, 127, seed=4)[:, ::2]  # column stride 2
    lay = _layer(9, 40, z=0, seed=5)
    args = (lay.packed, 40, lay.w_step, lay.zcorr, 0.5, lay.bias)
    assert torch.equal(gemm_w4a8.w4a8_linear(wide, *args), gemm_w4a8.w4a8_linear_ref(wide, *args))


@in_process
@pytest.mark.parametrize("act_signed", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 17, 33), (21, 40, 77), (16, 33, 128)])
def test_w4a4_matches_ref(act_signed: bool, m: int, n: int, k: int) -> None:
    lo, hi = (-8, 7) if act_signed else (0, 15)
    z = 0 if act_signed else 8
    layer = _layer(n, k, z=z, seed=k)
    xp = pack_int4(_codes((m, k), lo, hi, seed=m))
    args = (xp, act_signed, layer.packed, k, layer.w_step, layer.zcorr, 0.11, layer.bias)
    assert torch.equal(
        gemm_w4a8.w4a4_linear(*args, return_acc=True), gemm_w4a8.w4a4_linear_ref(*args, return_acc=True)
    )
    assert torch.equal(
        gemm_w4a8.w4a4_linear(*args, out_dtype=torch.float16),
        gemm_w4a8.w4a4_linear_ref(*args, out_dtype=torch.float16),
    )
    q = ActQuant(0.3, 8, 0, 15)
    assert torch.equal(
        gemm_w4a8.w4a4_linear(*args, out_quant=q), gemm_w4a8.w4a4_linear_ref(*args, out_quant=q)
    )


# ----------------------------------------------------------------------------- convolution
CONVS = [  # (B, H, W, Cin, Cout, kernel, stride, padding)
    (2, 7, 9, 5, 11, 3, 1, 1),
    (1, 9, 6, 3, 7, 3, 2, 1),
    (2, 8, 8, 6, 9, 3, 2, 1),
    (1, 7, 8, 5, 6, 1, 2, 0),
    (2, 5, 5, 6, 9, 1, 1, 0),
]


@in_process
@pytest.mark.parametrize("b,h,w,cin,cout,ks,stride,pad", CONVS)
def test_w4_conv2d_matches_ref(
    b: int, h: int, w: int, cin: int, cout: int, ks: int, stride: int, pad: int
) -> None:
    z = -3
    layer = _layer(cout, ks * ks * cin, z=z, seed=h * w + cin)
    x = _codes((b, h, w, cin), -128, 127, seed=cout)
    args = (layer.packed, ks, stride, pad, layer.w_step, layer.zcorr, 0.02, z, layer.bias)
    acc = conv_int4.w4_conv2d(x, *args, return_acc=True)
    assert torch.equal(acc, conv_int4.w4_conv2d_ref(x, *args, return_acc=True))
    out = conv_int4.w4_conv2d(x, *args, out_dtype=torch.float16)
    assert torch.equal(out, conv_int4.w4_conv2d_ref(x, *args, out_dtype=torch.float16))
    q = ActQuant(0.07, 1, -128, 127)
    assert torch.equal(
        conv_int4.w4_conv2d(x, *args, out_quant=q), conv_int4.w4_conv2d_ref(x, *args, out_quant=q)
    )


@in_process
def test_w4_conv2d_padding_is_the_zero_point() -> None:
    """A real-valued zero image stays zero through the conv: padding contributes (z - z) * w = 0."""
    z, cin, cout = 9, 4, 5
    layer = _layer(cout, 9 * cin, z=z, seed=0, bias=False)
    x = torch.full((1, 5, 6, cin), z, dtype=torch.int8, device=DEVICE)
    out = conv_int4.w4_conv2d(x, layer.packed, 3, 2, 1, layer.w_step, layer.zcorr, 0.1, z, return_acc=True)
    assert out.shape == (1, 3, 3, cout) and (out == 0).all()
