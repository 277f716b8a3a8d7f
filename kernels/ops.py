"""Custom ops over the kernels: ``torch.ops.qdetr.{quantize_act, w4a8_linear, w4a4_linear, w4_conv2d}``.

CUDA tensors run the Triton kernels, CPU tensors the pure-PyTorch references (so a CPU model runs and
can be compared with the GPU one bit for bit). Each op has a fake (meta) implementation, so it traces
under ``torch.compile`` and is captured by CUDA graphs. Output options shared by the three GEMM ops:

- ``out_step`` None: float ``out_dtype`` (float16/float32) =
  ``float32(acc - zcorr[n]) * (x_step * w_step[n]) + bias[n]`` (``kernels.gemm_w4a8.epilogue_ref``);
- ``out_step`` given: int8 codes ``clamp(round_half_even(out / out_step) + out_zero_point, out_qmin,
  out_qmax)`` for the next layer (fused quantization; ``out_dtype`` is ignored).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import conv_int4, gemm_w4a8
from kernels import quantize_act as qa
from kernels.conv_int4 import conv_out_size
from kernels.quantize_act import ActQuant

__all__ = ["quantize_act", "w4_conv2d", "w4a4_linear", "w4a8_linear"]


def _out_quant(out_step: float | None, zp: int, qmin: int, qmax: int) -> ActQuant | None:
    return None if out_step is None else ActQuant(float(out_step), int(zp), int(qmin), int(qmax))


def _out_dtype(out_dtype: torch.dtype, out_step: float | None) -> torch.dtype:
    return out_dtype if out_step is None else torch.int8


@torch.library.custom_op("qdetr::quantize_act", mutates_args=())
def quantize_act(x: Tensor, step: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """float ``x`` (any shape) -> int8 codes ``clamp(round_half_even(x / step) + zero_point, qmin, qmax)``."""
    fn = qa.quantize_act if x.is_cuda else qa.quantize_act_ref
    return fn(x, step, zero_point, qmin, qmax)


@quantize_act.register_fake
def _(x: Tensor, step: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("qdetr::w4a8_linear", mutates_args=())
def w4a8_linear(
    x_codes: Tensor,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_step: float | None = None,
    out_zero_point: int = 0,
    out_qmin: int = -128,
    out_qmax: int = 127,
) -> Tensor:
    """int8 codes ``[..., K]`` x packed int4 weights ``[N, ceil(K/2)]`` -> ``[..., N]`` (module docstring)."""
    fn = gemm_w4a8.w4a8_linear if x_codes.is_cuda else gemm_w4a8.w4a8_linear_ref
    q = _out_quant(out_step, out_zero_point, out_qmin, out_qmax)
    return fn(x_codes, w_packed, k, w_step, zcorr, x_step, bias, out_dtype, q)


@w4a8_linear.register_fake
def _(
    x_codes,
    w_packed,
    k,
    w_step,
    zcorr,
    x_step,
    bias=None,
    out_dtype=torch.float32,
    out_step=None,
    out_zero_point=0,
    out_qmin=-128,
    out_qmax=127,
):
    shape = (*x_codes.shape[:-1], w_packed.shape[0])
    return x_codes.new_empty(shape, dtype=_out_dtype(out_dtype, out_step))


@torch.library.custom_op("qdetr::w4a4_linear", mutates_args=())
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
    out_step: float | None = None,
    out_zero_point: int = 0,
    out_qmin: int = -128,
    out_qmax: int = 127,
) -> Tensor:
    """packed int4 activations uint8 ``[..., ceil(K/2)]`` (signed or unsigned nibbles) -> ``[..., N]``."""
    fn = gemm_w4a8.w4a4_linear if x_packed.is_cuda else gemm_w4a8.w4a4_linear_ref
    q = _out_quant(out_step, out_zero_point, out_qmin, out_qmax)
    return fn(x_packed, act_signed, w_packed, k, w_step, zcorr, x_step, bias, out_dtype, q)


@w4a4_linear.register_fake
def _(
    x_packed,
    act_signed,
    w_packed,
    k,
    w_step,
    zcorr,
    x_step,
    bias=None,
    out_dtype=torch.float32,
    out_step=None,
    out_zero_point=0,
    out_qmin=-128,
    out_qmax=127,
):
    shape = (*x_packed.shape[:-1], w_packed.shape[0])
    return x_packed.new_empty(shape, dtype=_out_dtype(out_dtype, out_step))


@torch.library.custom_op("qdetr::w4_conv2d", mutates_args=())
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
    out_step: float | None = None,
    out_zero_point: int = 0,
    out_qmin: int = -128,
    out_qmax: int = 127,
) -> Tensor:
    """NHWC int8 codes ``[B, H, W, Cin]`` x packed ``[Cout, ceil(k*k*Cin/2)]`` ((kh, kw, cin) order) ->
    NHWC ``[B, Ho, Wo, Cout]``; padding takes the value ``x_zero_point``."""
    fn = conv_int4.w4_conv2d if x_codes.is_cuda else conv_int4.w4_conv2d_ref
    q = _out_quant(out_step, out_zero_point, out_qmin, out_qmax)
    return fn(
        x_codes,
        w_packed,
        kernel_size,
        stride,
        padding,
        w_step,
        zcorr,
        x_step,
        x_zero_point,
        bias,
        out_dtype,
        q,
    )


@w4_conv2d.register_fake
def _(
    x_codes,
    w_packed,
    kernel_size,
    stride,
    padding,
    w_step,
    zcorr,
    x_step,
    x_zero_point,
    bias=None,
    out_dtype=torch.float32,
    out_step=None,
    out_zero_point=0,
    out_qmin=-128,
    out_qmax=127,
):
    b, h, w, _ = x_codes.shape
    ho, wo = (conv_out_size(s, kernel_size, stride, padding) for s in (h, w))
    return x_codes.new_empty((b, ho, wo, w_packed.shape[0]), dtype=_out_dtype(out_dtype, out_step))
