"""Shared Triton device helpers (round half to even, quantize, int4 unpack, the dequant epilogue).

Every helper here has a pure-PyTorch twin beside the kernel that uses it, and the tests compare them
bit for bit. Bit-exactness on the GPU rests on three choices:

- ``tl.div_rn`` (IEEE round-to-nearest division) instead of ``/`` (Triton lowers fp32 ``/`` to the
  approximate ``div.full.f32``);
- round half to even written with ``floor`` (``libdevice.rint`` does not run in the interpreter);
- kernels are launched with ``enable_fp_fusion=False`` so ``a * b + c`` is not contracted to an FMA
  (PyTorch's reference rounds the product and the sum separately).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Launch options every kernel uses (see the module docstring).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was defined under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    while not isinstance(kernel, (JITFunction, InterpretedFunction)) and hasattr(kernel, "fn"):
        kernel = kernel.fn  # an Autotuner or Heuristics wrapper
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel: object, *tensors: Tensor | None) -> None:
    """Raise a clear error when CPU tensors meet a compiled (not interpreted) Triton kernel."""
    on_cpu = any(t is not None and not t.is_cuda for t in tensors)
    if on_cpu and not is_interpreted(kernel):
        raise RuntimeError(
            "Triton kernels got CPU tensors but were compiled for the GPU: set TRITON_INTERPRET=1 before "
            "importing kernels.*, or use the *_ref functions (kernels.ops dispatches CPU tensors to them)"
        )


@triton.jit
def rint_half_even(y):
    """Round float32 ``y`` to the nearest integer, ties to even (as ``torch.round``); inf stays inf."""
    f = tl.floor(y)
    d = y - f  # exact: the fraction of a float32 is representable
    half = f * 0.5
    odd = (half - tl.floor(half)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def quantize_tile(x, step, zero_point, qmin, qmax):
    """int8 codes ``clamp(round_half_even(x / step) + zero_point, qmin, qmax)``, all in float32."""
    y = tl.div_rn(x.to(tl.float32), step)
    # Beyond 2^24 every float32 is an integer that clamps the same way; this also turns +-inf finite.
    y = tl.minimum(tl.maximum(y, -16777216.0), 16777216.0)
    # `+ 0.0` promotes int scalars to float32 (and works when Triton specialised one to a constexpr).
    q = rint_half_even(y) + (zero_point + 0.0)
    q = tl.minimum(tl.maximum(q, qmin + 0.0), qmax + 0.0)
    return q.to(tl.int8)


@triton.jit
def unpack_rows(packed, SIGNED: tl.constexpr):
    """uint8 ``[R, C]`` (two int4 codes a byte, low nibble first) -> int8 ``[R, 2C]``."""
    if SIGNED:
        s = packed.to(tl.int8, bitcast=True)
        lo = (s << 4) >> 4  # arithmetic shift sign-extends the low nibble
        hi = s >> 4
    else:
        lo = (packed & 0xF).to(tl.int8)
        hi = (packed >> 4).to(tl.int8)
    r: tl.constexpr = packed.shape[0]
    c: tl.constexpr = packed.shape[1]
    return tl.join(lo, hi).reshape(r, 2 * c)


@triton.jit
def dequant_tile(acc, zcorr, w_step, bias, x_step, HAS_BIAS: tl.constexpr):
    """float32 ``float(acc - zcorr[n]) * (x_step * w_step[n]) + bias[n]`` (see ``epilogue_ref``)."""
    v = (acc - zcorr[None, :]).to(tl.float32)
    scale = x_step * w_step
    v = v * scale[None, :]
    if HAS_BIAS:
        v = v + bias[None, :]
    return v


@triton.jit
def store_epilogue(
    out_ptrs,
    mask,
    acc,
    zcorr,
    w_step,
    bias,
    x_step,
    q_step,
    q_zp,
    q_min,
    q_max,
    HAS_BIAS: tl.constexpr,
    OUT_MODE: tl.constexpr,
):
    """Store one output tile: OUT_MODE 0 float (the out dtype), 1 int32 ``acc - zcorr``, 2 int8 codes."""
    if OUT_MODE == 1:
        tl.store(out_ptrs, acc - zcorr[None, :], mask=mask)
    else:
        v = dequant_tile(acc, zcorr, w_step, bias, x_step, HAS_BIAS)
        if OUT_MODE == 2:
            tl.store(out_ptrs, quantize_tile(v, q_step, q_zp, q_min, q_max), mask=mask)
        else:
            tl.store(out_ptrs, v.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def swizzle_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles (GROUP_M row-blocks share their B columns in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
