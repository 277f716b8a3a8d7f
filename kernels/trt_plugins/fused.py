"""The W4A8 linear of the TensorRT plugin as ONE Triton kernel (for the ahead-of-time plugin form).

TensorRT's AOT plugins launch a single precompiled kernel with the arguments ``(input pointers..., int32
scalars..., output pointers...)``, so quantizing the activations (``kernels.quantize_act``) and the GEMM
(``kernels.gemm_w4a8``) become one kernel here, built from the same tested device helpers
(``kernels._triton``): each A tile is loaded as float, quantized with ``quantize_tile`` (correctly
rounded division, round half to even), multiplied with the unpacked int4 weights in int8 MMA, and stored
through ``store_epilogue``. The activation step is passed as the int32 bit pattern of its float32 value
(TensorRT's scalar arguments are int32), so one compiled kernel serves every layer.

Triton 3.3+ appends hidden pointer parameters (global and profile scratch) after the last user argument;
the plugin declares :data:`HIDDEN_OUTPUTS` one-element dummy outputs so that TensorRT passes a pointer for
each of them (Triton versions with fewer hidden parameters ignore the surplus).

:func:`w4a8_fused_linear` launches the kernel on torch tensors (GPU, or CPU under ``TRITON_INTERPRET=1``)
for tests; :func:`compile_w4a8_fused` compiles it to PTX for a given GPU (no GPU needed).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import LAUNCH_OPTIONS, quantize_tile, store_epilogue, swizzle_pid, unpack_rows
from kernels.packing import packed_len

__all__ = [
    "AOT_TILE",
    "HIDDEN_OUTPUTS",
    "compile_w4a8_fused",
    "float_bits",
    "fused_signature",
    "w4a8_fused_kernel",
    "w4a8_fused_linear",
]

AOT_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
AOT_OPTIONS = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}
HIDDEN_OUTPUTS = 2
_SCALARS = ("M", "N", "K", "KB", "stride_bn", "x_step_bits", "x_zp", "q_min", "q_max")


def float_bits(x: float) -> int:
    """The float32 bit pattern of ``x`` as a signed int32 (how the kernel receives the activation step)."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


@triton.jit(do_not_specialize=["x_zp", "q_min", "q_max", "x_step_bits"])
def w4a8_fused_kernel(
    x_ptr, b_ptr, wstep_ptr, zcorr_ptr, bias_ptr,  # inputs, in the plugin's order
    M, N, K, KB, stride_bn, x_step_bits, x_zp, q_min, q_max,  # int32 scalars
    out_ptr,  # output
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out[M, N] = epilogue(quantize(x[M, K]) @ unpack(b[N, KB])^T)`` (x, out contiguous rows)."""
    x_step = x_step_bits.to(tl.float32, bitcast=True)
    pid_m, pid_n = swizzle_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        kb = kt * (BLOCK_K // 2) + offs_kb
        b_bytes = tl.load(b_ptr + offs_n[:, None] * stride_bn + kb[None, :],
                          mask=n_ok[:, None] & (kb[None, :] < KB), other=0)
        b = tl.trans(unpack_rows(b_bytes, True))  # zero beyond K, so A's padding codes add nothing
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        a = quantize_tile(x, x_step, x_zp, q_min, q_max)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    zcorr = tl.load(zcorr_ptr + offs_n, mask=n_ok, other=0)
    w_step = tl.load(wstep_ptr + offs_n, mask=n_ok, other=0.0)
    bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    store_epilogue(out_ptrs, m_ok[:, None] & n_ok[None, :], acc, zcorr, w_step, bias, x_step,
                   1.0, 0, -128, 127, True, 0)


def w4a8_fused_linear(x: Tensor, w_packed: Tensor, k: int, w_step: Tensor, zcorr: Tensor, bias: Tensor,
                      x_step: float, x_zp: int, qmin: int, qmax: int, out: Tensor | None = None) -> Tensor:
    """Launch :func:`w4a8_fused_kernel` on torch tensors: float ``x [..., K]``, packed weight rows
    ``w_packed`` (uint8 ``[N, >= ceil(K/2)]``, or the plugin's int32 rows viewed as bytes) -> ``[..., N]``."""
    if w_packed.dtype != torch.uint8:
        w_packed = w_packed.contiguous().view(torch.uint8)
    n, kb = w_packed.shape[0], packed_len(k)
    xc = x.reshape(-1, k).contiguous()
    m = xc.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m and n:
        grid = (triton.cdiv(m, AOT_TILE["BLOCK_M"]) * triton.cdiv(n, AOT_TILE["BLOCK_N"]),)
        w4a8_fused_kernel[grid](xc, w_packed, w_step, zcorr, bias, m, n, k, kb, w_packed.stride(0),
                                float_bits(x_step), x_zp, qmin, qmax, out, **AOT_TILE, **LAUNCH_OPTIONS)
    return out


def fused_signature(float_type: str) -> dict[str, str]:
    """Triton signature of the kernel for ``float_type`` ("fp32" or "fp16") activations and output."""
    ptrs = {"x_ptr": f"*{float_type}", "b_ptr": "*u8", "wstep_ptr": "*fp32", "zcorr_ptr": "*i32",
            "bias_ptr": "*fp32"}
    return {**ptrs, **dict.fromkeys(_SCALARS, "i32"), "out_ptr": f"*{float_type}"}


def compile_w4a8_fused(float_type: str, capability: int) -> triton.compiler.CompiledKernel:
    """Compile the kernel for ``sm_<capability>`` (e.g. 90, 87) with :data:`AOT_TILE`; no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = fused_signature(float_type)
    src = ASTSource(w4a8_fused_kernel, {**sig, **dict.fromkeys(AOT_TILE, "constexpr")}, dict(AOT_TILE))
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(AOT_OPTIONS))
