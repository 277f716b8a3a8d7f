"""Int4-weight convolution over NHWC int8 activations: implicit GEMM in Triton, im2col reference.

GEMM view: ``M = B * Ho * Wo`` output pixels, ``N = Cout``, ``K = KH * KW * Cin`` in ``(kh, kw, cin)``
order (cin fastest). Weights are packed ``[Cout, ceil(KH*KW*Cin/2)]`` (see :func:`conv_weight_to_gemm`
and ``kernels/packing.py``). A 1x1, stride 1, padding 0 convolution is the plain GEMM over the
``[B*H*W, Cin]`` tokens; anything else gathers its im2col tile on the fly from the NHWC input, with the
activation zero point as the padding value (a real zero), so ``zcorr = z * sum_k w[n, k]`` over the
full K stays right at the borders. Output ``[B, Ho, Wo, Cout]`` with the epilogue of ``gemm_w4a8``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import (
    LAUNCH_OPTIONS,
    check_device,
    is_interpreted,
    store_epilogue,
    swizzle_pid,
    unpack_rows,
)
from kernels.gemm_w4a8 import (
    GPU_CONFIGS,
    INTERPRETER_CONFIG,
    epilogue_args,
    out_kind,
    prune_configs,
    w4a8_linear,
    w4a8_linear_ref,
)
from kernels.packing import packed_len
from kernels.quantize_act import ActQuant

__all__ = ["conv_out_size", "conv_weight_to_gemm", "im2col_nhwc", "w4_conv2d", "w4_conv2d_ref"]


def conv_out_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of one spatial axis: ``(size + 2 * padding - kernel_size) // stride + 1``."""
    return (size + 2 * padding - kernel_size) // stride + 1


def conv_weight_to_gemm(weight: Tensor) -> Tensor:
    """Conv weight ``[Cout, Cin, KH, KW]`` -> GEMM weight ``[Cout, KH*KW*Cin]``, (kh, kw, cin) order."""
    cout = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(cout, -1)


def im2col_nhwc(x: Tensor, kernel_size: int, stride: int, padding: int, pad_value: int) -> Tensor:
    """NHWC ``[B, H, W, C]`` -> patches ``[B*Ho*Wo, KH*KW*C]``, (kh, kw, cin) order, padded ``pad_value``."""
    xp = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding), value=pad_value)
    patches = xp.unfold(1, kernel_size, stride).unfold(2, kernel_size, stride)  # [B, Ho, Wo, C, KH, KW]
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, kernel_size * kernel_size * x.shape[-1])


def _check_conv(
    h: int, w: int, kernel_size: int, stride: int, padding: int, x_zero_point: int
) -> tuple[int, int]:
    """Validate the geometry and the padding value; returns ``(Ho, Wo)``."""
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(f"bad conv geometry: kernel {kernel_size}, stride {stride}, padding {padding}")
    if not -128 <= x_zero_point <= 127:
        raise ValueError(f"x_zero_point {x_zero_point} is not an int8 code (it is the padding value)")
    ho, wo = (conv_out_size(s, kernel_size, stride, padding) for s in (h, w))
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {h}x{w} too small for kernel {kernel_size}, padding {padding}")
    return ho, wo


def w4_conv2d_ref(
    x_codes: Tensor,
    w_packed: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    x_zero_point: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
) -> Tensor:
    """Reference of :func:`w4_conv2d`: explicit im2col, exact integer matmul, the GEMM epilogue."""
    b, h, w, c = x_codes.shape
    ho, wo = _check_conv(h, w, kernel_size, stride, padding, x_zero_point)
    cols = im2col_nhwc(x_codes, kernel_size, stride, padding, x_zero_point)
    k = kernel_size * kernel_size * c
    out = w4a8_linear_ref(cols, w_packed, k, w_step, zcorr, x_step, bias, out_dtype, out_quant, return_acc)
    return out.reshape(b, ho, wo, -1)


@triton.jit(do_not_specialize=["x_zp", "q_zp", "q_min", "q_max"])  # never a constexpr, even when == 1
def _w4_conv_kernel(
    x_ptr,
    b_ptr,
    out_ptr,
    zcorr_ptr,
    wstep_ptr,
    bias_ptr,
    M,
    N,
    K,
    KB,
    H,
    W,
    C,
    HO,
    WO,
    stride_xb,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    x_step,
    x_zp,
    q_step,
    q_zp,
    q_min,
    q_max,
    KW,
    CONV_STRIDE,
    PAD,
    HAS_BIAS: tl.constexpr,
    OUT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # output pixel (b, ho, wo) of each GEMM row, and the top-left input pixel of its window
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    x_row = x_ptr + (offs_m // (WO * HO)).to(tl.int64) * stride_xb
    h0 = ho * CONV_STRIDE - PAD
    w0 = wo * CONV_STRIDE - PAD
    offs_kb = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        kb = kt * (BLOCK_K // 2) + offs_kb
        b_bytes = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + kb[None, :] * stride_bk,
            mask=n_ok[:, None] & (kb[None, :] < KB),
            other=0,
        )
        b = tl.trans(unpack_rows(b_bytes, True))
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        cin = kk % C
        kw = (kk // C) % KW
        kh = kk // (C * KW)
        hi = h0[:, None] + kh[None, :]
        wi = w0[:, None] + kw[None, :]
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W) & m_ok[:, None] & (kk[None, :] < K)
        ptrs = x_row[:, None] + hi * stride_xh + wi * stride_xw + cin[None, :] * stride_xc
        a = tl.load(ptrs, mask=inside, other=0)
        a = tl.where(inside, a, x_zp.to(tl.int8))  # padding is the zero point (a real zero)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    zcorr = tl.load(zcorr_ptr + offs_n, mask=n_ok, other=0)
    w_step = tl.load(wstep_ptr + offs_n, mask=n_ok, other=0.0)
    bias = tl.load(bias_ptr + offs_n, mask=n_ok & HAS_BIAS, other=0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    store_epilogue(
        out_ptrs,
        m_ok[:, None] & n_ok[None, :],
        acc,
        zcorr,
        w_step,
        bias,
        x_step,
        q_step,
        q_zp,
        q_min,
        q_max,
        HAS_BIAS,
        OUT_MODE,
    )


_w4_conv_tuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["M", "N", "K", "OUT_MODE"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_w4_conv_kernel)


def w4_conv2d(
    x_codes: Tensor,
    w_packed: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    x_zero_point: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
) -> Tensor:
    """Triton conv: NHWC int8 codes ``[B, H, W, Cin]`` x packed int4 ``[Cout, ceil(KH*KW*Cin/2)]``.

    Square kernel ``kernel_size``, ``stride``, zero ``padding`` (filled with ``x_zero_point``). Returns
    ``[B, Ho, Wo, Cout]``: float ``out_dtype``, int8 ``out_quant`` codes, or int32 ``acc - zcorr``.
    """
    if x_codes.dtype != torch.int8 or x_codes.dim() != 4:
        raise ValueError(
            f"x_codes must be int8 NHWC [B, H, W, C], got {x_codes.dtype} {tuple(x_codes.shape)}"
        )
    b, h, w, c = x_codes.shape
    k = kernel_size * kernel_size * c
    ho, wo = _check_conv(h, w, kernel_size, stride, padding, x_zero_point)
    if kernel_size == 1 and stride == 1 and padding == 0:
        return w4a8_linear(
            x_codes, w_packed, k, w_step, zcorr, x_step, bias, out_dtype, out_quant, return_acc
        )
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.shape[1] != packed_len(k):
        raise ValueError(f"w_packed must be uint8 [Cout, {packed_len(k)}], got {tuple(w_packed.shape)}")
    check_device(_w4_conv_kernel, x_codes, w_packed)
    n, m = w_packed.shape[0], b * ho * wo
    mode, dtype = out_kind(out_dtype, out_quant, return_acc)
    ws, zc, bb = epilogue_args(n, w_step, zcorr, bias)
    q = out_quant or ActQuant(1.0, 0, -128, 127)
    out = torch.empty((b, ho, wo, n), dtype=dtype, device=x_codes.device)
    if m == 0 or n == 0:
        return out
    ptrs = (x_codes, w_packed, out, zc, ws, bb)
    sizes = (m, n, k, packed_len(k), h, w, c, ho, wo)
    strides = (*x_codes.stride(), *w_packed.stride(), n, 1)  # out is [M, N] contiguous
    scalars = (float(x_step), int(x_zero_point), float(q.step), int(q.zero_point), int(q.qmin), int(q.qmax))
    args = (*ptrs, *sizes, *strides, *scalars, kernel_size, stride, padding)
    flags = {"HAS_BIAS": bias is not None, "OUT_MODE": mode}
    if x_codes.is_cuda and not is_interpreted(_w4_conv_kernel):
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4_conv_tuned[grid](*args, **flags, **LAUNCH_OPTIONS)
    else:
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w4_conv_kernel[grid](*args, **flags, **cfg, **LAUNCH_OPTIONS)
    return out
