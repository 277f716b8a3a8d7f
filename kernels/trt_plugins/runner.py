"""What the Python-side plugin forms run: TensorRT's raw device pointers as torch tensors, then the tested
kernels (``kernels.quantize_act`` + ``kernels.gemm_w4a8``) on TensorRT's stream.

No cupy or cuda-python: :class:`DeviceArray` exposes a pointer through ``__cuda_array_interface__`` (the
protocol TensorRT's own Python plugin samples rely on), which ``torch.as_tensor(..., device="cuda")`` wraps
without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.int32: "<i4", torch.int8: "|i1",
            torch.uint8: "|u1"}


@dataclass(frozen=True)
class PluginAttrs:
    """The ``qdetr::W4A8Linear`` attributes (see ``onnx_rewrite.py``)."""

    k: int
    x_step: float
    x_zero_point: int
    qmin: int
    qmax: int


class DeviceArray:
    """A device pointer with shape and dtype, for ``torch.as_tensor`` (``__cuda_array_interface__`` v2)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.__cuda_array_interface__ = {"shape": tuple(int(s) for s in shape), "typestr": _TYPESTR[dtype],
                                         "data": (int(ptr), False), "version": 2, "strides": None}


def as_tensor(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CUDA tensor over memory TensorRT owns (no copy; valid during the enqueue call only)."""
    return torch.as_tensor(DeviceArray(ptr, shape, dtype), device="cuda")


def w4a8_forward(x: Tensor, w_words: Tensor, w_step: Tensor, zcorr: Tensor, bias: Tensor, attrs: PluginAttrs,
                 out: Tensor) -> None:
    """``out[..., N] = W4A8Linear(x[..., K])`` with the two tested Triton kernels, on the current stream."""
    from kernels.gemm_w4a8 import w4a8_linear
    from kernels.packing import packed_len
    from kernels.quantize_act import quantize_act

    codes = quantize_act(x, attrs.x_step, attrs.x_zero_point, attrs.qmin, attrs.qmax)
    w_packed = w_words.contiguous().view(torch.uint8)[:, : packed_len(attrs.k)]
    y = w4a8_linear(codes, w_packed, attrs.k, w_step, zcorr, attrs.x_step, bias, out_dtype=out.dtype)
    out.copy_(y)


def run_on_stream(stream: int, fn, *args) -> None:  # noqa: ANN001
    """Run ``fn(*args)`` with TensorRT's CUDA stream (a raw handle) as torch's current stream."""
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        fn(*args)
