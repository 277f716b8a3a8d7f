"""TensorRT's one INT4 form: weight-only, block-quantized GEMM weights (``folding.weight_dq``).

TensorRT takes INT4 only for weight-only quantization ("Working with Quantized Types": "INT4 (signed 4-bit
integer, weight-only quantization)"), block-quantized, on a 2-D GEMM weight whose activation input is not
quantized; behind INT8 activations there is no kernel (NVIDIA/TensorRT#4262). ONNX has INT4 tensors and
``block_size`` from opset 21. Everything else of the tensorrt target is INT8.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qdetr_deploy.export.graph import GraphBuilder

BLOCK_SIZES = (128, 64, 32, 16)  # blocks along K, largest that divides it
INT4_OPSET = 21


def int4_block(codes: np.ndarray, bits: int, axis: int, weight_only_gemm: bool, container: str,
               opset: int) -> int:
    """Block size for a weight ``codes`` [K,N] (``axis`` 1: its output channels), or 0 (INT8): a <= 4-bit
    weight-only GEMM weight, the container "int4", opset 21+, and a block size that divides K."""
    if bits > 4 or not weight_only_gemm or container != "int4" or opset < INT4_OPSET:
        return 0
    if codes.ndim != 2 or axis != 1:
        return 0
    return next((b for b in BLOCK_SIZES if codes.shape[0] % b == 0), 0)


def blocked_int4_dq(g: GraphBuilder, codes: np.ndarray, step: np.ndarray, name: str, block: int) -> str:
    """INT4 [K,N] with a block-quantized DequantizeLinear (axis 0, ``block_size``): the per-output-channel
    step repeated over the K/block blocks, so the values are exactly the per-channel ones."""
    w = g.const_int(f"{name}.weight_quantized", np.rint(codes).astype(np.int64), TensorProto.INT4)
    scale = np.broadcast_to(step.astype(np.float32).reshape(1, -1), (codes.shape[0] // block, codes.shape[1]))
    s = g.const(f"{name}.weight_scale", np.ascontiguousarray(scale))
    return g.node("DequantizeLinear", [w, s], f"{name}/weight/DequantizeLinear", axis=0, block_size=block)
