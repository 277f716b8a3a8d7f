"""W4A8 and W4A4 GEMM in Triton, with the integer reference and the one epilogue formula.

Operands (all row-major, see ``kernels/packing.py`` for the nibble order):

- A, W4A8: int8 activation codes ``[M, K]``; W4A4: packed int4 codes uint8 ``[M, ceil(K/2)]``, signed
  (-8..7) or unsigned (0..15) nibbles;
- B: packed signed int4 weight codes uint8 ``[N, ceil(K/2)]`` (per output channel, K-contiguous).

The kernel unpacks nibbles to int8 with shifts and accumulates ``tl.dot`` of int8 tiles in int32 (int4
MMA is emulated on Hopper, so int8 MMA is the fast path on every GPU Triton targets). The epilogue is
:func:`epilogue_ref`::

    acc[m, n] = sum_k xq[m, k] * w[n, k]                               (int32)
    out[m, n] = float32(acc[m, n] - zcorr[n]) * (x_step * w_step[n]) + bias[n]

with ``zcorr[n] = z_act * sum_k w[n, k]`` (so ``acc - zcorr = sum_k (xq - z_act) * w``), every operation
rounded in float32 in that order (no FMA), then cast to the output dtype or quantized to int8 codes
for the next layer (``kernels.quantize_act``).
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
from kernels.packing import packed_len, unpack_int4
from kernels.quantize_act import ActQuant, check_act_quant, quantize_act_ref

__all__ = [
    "epilogue_ref",
    "int_matmul_ref",
    "w4a4_linear",
    "w4a4_linear_ref",
    "w4a8_linear",
    "w4a8_linear_ref",
]

OUT_FLOAT, OUT_ACC, OUT_QUANT = 0, 1, 2
# One small tile for the CPU interpreter (slow: every program is NumPy); the GPU autotunes below.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


GPU_CONFIGS = [
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 64, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(64, 256, 128, 8, 3),
    _cfg(32, 64, 256, 4, 4),
    _cfg(16, 64, 256, 4, 3),
    _cfg(16, 128, 128, 4, 4),
]


# ----------------------------------------------------------------------------- reference
def epilogue_ref(acc: Tensor, zcorr: Tensor, x_step: float, w_step: Tensor, bias: Tensor | None) -> Tensor:
    """float32 ``[M, N]`` = ``float32(acc - zcorr[n]) * (x_step * w_step[n]) + bias[n]``, rounded in order.

    ``acc`` int32/int64 ``[M, N]``, ``zcorr`` int32 ``[N]``, ``w_step`` float32 ``[N]``, ``bias`` ``[N]``.
    """
    v = (acc.to(torch.int32) - zcorr.to(torch.int32)).to(torch.float32)
    scale = torch.full((), x_step, dtype=torch.float32, device=v.device) * w_step.to(torch.float32)
    v = v * scale
    if bias is not None:
        v = v + bias.to(torch.float32)
    return v


def int_matmul_ref(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a [M, K] @ b[N, K]^T`` of integer codes as int64: an int64 matmul on CPU; on CUDA (no
    int64 matmul) a float64 one, exact because every partial sum is an integer below 2^53."""
    if a.is_cuda:
        return torch.matmul(a.to(torch.float64), b.to(torch.float64).t()).round().to(torch.int64)
    return torch.matmul(a.to(torch.int64), b.to(torch.int64).t())


def _finish_ref(
    acc: Tensor,
    zcorr: Tensor,
    x_step: float,
    w_step: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    out_quant: ActQuant | None,
    return_acc: bool,
) -> Tensor:
    if return_acc:
        return (acc - zcorr.to(torch.int64)).to(torch.int32)
    v = epilogue_ref(acc, zcorr, x_step, w_step, bias)
    if out_quant is not None:
        return quantize_act_ref(v, *out_quant)
    return v.to(out_dtype)


def w4a8_linear_ref(
    x_codes: Tensor,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
) -> Tensor:
    """Reference of :func:`w4a8_linear`: unpack, exact integer matmul, :func:`epilogue_ref`."""
    lead = x_codes.shape[:-1]
    acc = int_matmul_ref(x_codes.reshape(-1, k), unpack_int4(w_packed, k, signed=True))
    out = _finish_ref(acc, zcorr, x_step, w_step, bias, out_dtype, out_quant, return_acc)
    return out.reshape(*lead, -1)


def w4a4_linear_ref(
    x_packed: Tensor,
    act_signed: bool,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
) -> Tensor:
    """Reference of :func:`w4a4_linear`: unpack the activations, then :func:`w4a8_linear_ref`."""
    x_codes = unpack_int4(x_packed, k, signed=act_signed)
    return w4a8_linear_ref(
        x_codes, w_packed, k, w_step, zcorr, x_step, bias, out_dtype, out_quant, return_acc
    )


# ----------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["q_zp", "q_min", "q_max"])  # never a constexpr, even when == 1
def _w4_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    zcorr_ptr,
    wstep_ptr,
    bias_ptr,
    M,
    N,
    K,
    KB,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    x_step,
    q_step,
    q_zp,
    q_min,
    q_max,
    A_INT4: tl.constexpr,
    A_SIGNED: tl.constexpr,
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
    offs_kb = tl.arange(0, BLOCK_K // 2)  # packed bytes within a K tile
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        kb = kt * (BLOCK_K // 2) + offs_kb
        # B tile [BLOCK_N, BLOCK_K/2] bytes (K contiguous) -> int8 [BLOCK_N, BLOCK_K] -> [BLOCK_K, BLOCK_N]
        b_bytes = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + kb[None, :] * stride_bk,
            mask=n_ok[:, None] & (kb[None, :] < KB),
            other=0,
        )
        b = tl.trans(unpack_rows(b_bytes, True))
        if A_INT4:
            a_bytes = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kb[None, :] * stride_ak,
                mask=m_ok[:, None] & (kb[None, :] < KB),
                other=0,
            )
            a = unpack_rows(a_bytes, A_SIGNED)
        else:
            kk = kt * BLOCK_K + offs_k
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=m_ok[:, None] & (kk[None, :] < K),
                other=0,
            )
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


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles much larger than the problem (M = 1 needs no 256-row tile); always keeps one config."""
    m_cap = max(16, triton.next_power_of_2(int(named_args["M"])))
    n_cap = max(64, triton.next_power_of_2(int(named_args["N"])))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]
    return keep or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))]


_w4_gemm_tuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["M", "N", "K", "A_INT4", "OUT_MODE"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_w4_gemm_kernel)


def out_kind(out_dtype: torch.dtype, out_quant: ActQuant | None, return_acc: bool) -> tuple[int, torch.dtype]:
    """The kernel's OUT_MODE and the output tensor dtype for these options."""
    if return_acc:
        return OUT_ACC, torch.int32
    if out_quant is not None:
        check_act_quant(*out_quant)
        return OUT_QUANT, torch.int8
    # (no bfloat16: the interpreter truncates float32 -> bfloat16, so the CPU check could not be exact)
    if out_dtype not in (torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be float16 or float32, got {out_dtype}")
    return OUT_FLOAT, out_dtype


def epilogue_args(
    n: int, w_step: Tensor, zcorr: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Check and convert the per-channel epilogue tensors: float32 w_step, int32 zcorr, float32 bias."""
    for name, t in (("w_step", w_step), ("zcorr", zcorr), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    ws = w_step.to(torch.float32).contiguous()
    zc = zcorr.to(torch.int32).contiguous()
    b = ws if bias is None else bias.to(torch.float32).contiguous()  # a dummy pointer when absent
    return ws, zc, b


def launch_gemm(
    a: Tensor,
    a_int4: bool,
    a_signed: bool,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    out_quant: ActQuant | None,
    return_acc: bool,
) -> Tensor:
    """Launch the GEMM on 2-D ``a`` (``[M, K]`` int8 or ``[M, ceil(K/2)]`` uint8); returns ``[M, N]``."""
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.shape[1] != packed_len(k):
        raise ValueError(
            f"w_packed must be uint8 [N, {packed_len(k)}], got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    check_device(_w4_gemm_kernel, a, w_packed)
    m, n = a.shape[0], w_packed.shape[0]
    mode, dtype = out_kind(out_dtype, out_quant, return_acc)
    ws, zc, b = epilogue_args(n, w_step, zcorr, bias)
    q = out_quant or ActQuant(1.0, 0, -128, 127)
    out = torch.empty((m, n), dtype=dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    ptrs = (a, w_packed, out, zc, ws, b)
    strides = (*a.stride(), *w_packed.stride(), *out.stride())
    scalars = (float(x_step), float(q.step), int(q.zero_point), int(q.qmin), int(q.qmax))
    args = (*ptrs, m, n, k, packed_len(k), *strides, *scalars)
    flags = {"A_INT4": a_int4, "A_SIGNED": a_signed, "HAS_BIAS": bias is not None, "OUT_MODE": mode}
    if a.is_cuda and not is_interpreted(_w4_gemm_kernel):
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4_gemm_tuned[grid](*args, **flags, **LAUNCH_OPTIONS)
    else:
        c = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _w4_gemm_kernel[grid](*args, **flags, **c, **LAUNCH_OPTIONS)
    return out


def w4a8_linear(
    x_codes: Tensor,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
) -> Tensor:
    """Triton W4A8 linear: int8 ``x_codes [..., K]`` x packed int4 ``w_packed [N, ceil(K/2)]`` -> ``[.., N]``.

    Output: float ``out_dtype`` (the module-docstring epilogue); int8 codes of ``out_quant`` (step,
    zero point, qmin, qmax of the next layer) when given; int32 ``acc - zcorr`` when ``return_acc``.
    """
    if x_codes.dtype != torch.int8 or x_codes.shape[-1] != k:
        raise ValueError(f"x_codes must be int8 [..., {k}], got {x_codes.dtype} {tuple(x_codes.shape)}")
    lead = x_codes.shape[:-1]
    out = launch_gemm(
        x_codes.reshape(-1, k),
        False,
        True,
        w_packed,
        k,
        w_step,
        zcorr,
        x_step,
        bias,
        out_dtype,
        out_quant,
        return_acc,
    )
    return out.reshape(*lead, -1)


def w4a4_linear(
    x_packed: Tensor,
    act_signed: bool,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
) -> Tensor:
    """Triton W4A4 linear: packed int4 activations uint8 ``[..., ceil(K/2)]`` (``act_signed``: -8..7,
    else 0..15) x packed int4 weights ``[N, ceil(K/2)]`` -> ``[..., N]``; outputs as :func:`w4a8_linear`."""
    if x_packed.dtype != torch.uint8 or x_packed.shape[-1] != packed_len(k):
        raise ValueError(
            f"x_packed must be uint8 [..., {packed_len(k)}], got {x_packed.dtype} {tuple(x_packed.shape)}"
        )
    lead = x_packed.shape[:-1]
    out = launch_gemm(
        x_packed.reshape(-1, packed_len(k)),
        True,
        act_signed,
        w_packed,
        k,
        w_step,
        zcorr,
        x_step,
        bias,
        out_dtype,
        out_quant,
        return_acc,
    )
    return out.reshape(*lead, -1)
