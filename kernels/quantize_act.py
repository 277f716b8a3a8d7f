"""Per-tensor activation quantization: float16/float32 ``x`` -> int8 codes (Triton kernel + reference).

``q = clamp(round_half_even(x / step) + zero_point, qmin, qmax)``, computed in float32 with a true
(correctly rounded) division, bit-exact with the reference below and with ONNX ``QuantizeLinear``.
Codes are stored as int8, so ``-128 <= qmin <= qmax <= 127``; an unsigned 8-bit quantizer (0..255, zero
point ``z``) is stored shifted by -128 (codes ``q - 128``, zero point ``z - 128``), which leaves every
``q - z`` and so every GEMM result unchanged. NaN inputs give unspecified codes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton import LAUNCH_OPTIONS, check_device, quantize_tile

__all__ = ["ActQuant", "check_act_quant", "quantize_act", "quantize_act_ref"]

BLOCK = 1024


class ActQuant(NamedTuple):
    """Per-tensor activation quantizer: float step, integer zero point and the code range."""

    step: float
    zero_point: int
    qmin: int
    qmax: int


def check_act_quant(step: float, zero_point: int, qmin: int, qmax: int) -> None:
    """Reject parameters that int8 codes cannot hold or that make the division meaningless."""
    if not step > 0.0:
        raise ValueError(f"step must be > 0, got {step}")
    if not -128 <= qmin <= qmax <= 127:
        raise ValueError(f"code range [{qmin}, {qmax}] must lie in int8 [-128, 127]")
    if not -(2**15) <= zero_point <= 2**15:  # keeps the kernel's |x / step| <= 2^24 shortcut exact
        raise ValueError(f"zero point {zero_point} out of range [-32768, 32768]")


def quantize_act_ref(x: Tensor, step: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """Reference: int8 ``clamp(round_half_even(x / step) + zero_point, qmin, qmax)``, same shape as ``x``.

    The divisor is a tensor on ``x``'s device: CUDA PyTorch turns division by a Python scalar into a
    multiplication by its reciprocal, which is not the correctly rounded quotient.
    """
    check_act_quant(step, zero_point, qmin, qmax)
    divisor = torch.full((), step, dtype=torch.float32, device=x.device)
    q = torch.round(x.to(torch.float32) / divisor) + float(zero_point)
    return torch.clamp(q, float(qmin), float(qmax)).to(torch.int8)


@triton.jit(do_not_specialize=["zero_point", "qmin", "qmax"])  # never a constexpr, even when == 1
def _quantize_act_kernel(x_ptr, q_ptr, numel, step, zero_point, qmin, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(q_ptr + offs, quantize_tile(x, step, zero_point, qmin, qmax), mask=mask)


def quantize_act(x: Tensor, step: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """Triton: float16/float32 ``x`` (any shape) -> int8 codes of the same shape (see module docstring)."""
    check_act_quant(step, zero_point, qmin, qmax)
    if x.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise TypeError(f"quantize_act needs a float tensor, got {x.dtype}")
    check_device(_quantize_act_kernel, x)
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    n = xc.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        _quantize_act_kernel[grid](
            xc, q, n, float(step), int(zero_point), int(qmin), int(qmax), BLOCK=BLOCK, **LAUNCH_OPTIONS
        )
    return q
