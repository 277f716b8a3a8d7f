"""Static TensorRT lint of an ONNX graph (pure onnx, no TensorRT needed).

Rules, from ONNX-TensorRT's operators.md (TensorRT 10.x):

- opset in [13, 24]: the TensorRT 10.15 parser takes opsets 9..24 (10.0: 9..20); per-axis Q/DQ needs 13,
  INT4 initializers 21 (so INT4 weights need TensorRT 10.x with an opset-21 parser);
- QuantizeLinear / DequantizeLinear: zero point 0 (absent or all zeros), scales constant and positive;
  activations per-tensor (a Q/DQ on a non-constant tensor has a scalar scale);
- Q/DQ types: activations INT8 or FP8 (FLOAT8E4M3FN); INT4 for constant weights only; no UINT8, UINT4,
  INT2, INT16 activations;
- operators: the ONNX-TensorRT support list below, default domain only; Clip bounds and Reduce* axes
  constant.

Not checked: TensorRT runs INT4 as weight-only GEMM quantization, so INT4 conv weights (allowed by the
rules above) need ``--weight-container int8`` or ``kernels/trt_plugins/onnx_rewrite.py`` (it makes them
INT8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TRT_OPSET_RANGE = (13, 24)
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
ACT_QTYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
WEIGHT_QTYPES = ACT_QTYPES | {TensorProto.INT4}
_CONST_INPUTS = {"Clip": (1, 2), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,)}


@dataclass(frozen=True)
class LintViolation:
    """One thing TensorRT would reject or run differently: the node, the rule, and what is wrong."""

    node: str
    rule: str
    message: str


def lint_tensorrt(model: onnx.ModelProto | str) -> list[LintViolation]:
    """Every TensorRT incompatibility of ``model`` (a ModelProto or a path), one per node and rule."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    found: list[LintViolation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    lo, hi = TRT_OPSET_RANGE
    if not lo <= opset <= hi:
        found.append(LintViolation("<model>", "opset", f"opset {opset} is outside TensorRT's {lo}..{hi}"))
    for node in graph.node:
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            found.append(LintViolation(name, "unsupported-op", f"{node.domain or 'ai.onnx'}:{node.op_type} "
                                       "is not in the ONNX-TensorRT operator list"))
            continue
        for i in _CONST_INPUTS.get(node.op_type, ()):
            if len(node.input) > i and node.input[i] and node.input[i] not in inits:
                found.append(LintViolation(name, "constant-input", f"input {i} of {node.op_type} must be an "
                                           "initializer"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found += _lint_qdq(node, name, inits)
    return found


def _attr(node: onnx.NodeProto, key: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == key), default)


def _lint_qdq(node: onnx.NodeProto, name: str, inits: dict[str, onnx.TensorProto]) -> list[LintViolation]:
    out: list[LintViolation] = []
    scale = inits.get(node.input[1])
    zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and zp is None:
        out.append(LintViolation(name, "zero-point", "zero point is not an initializer"))
    weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
    if node.op_type == "QuantizeLinear":
        dtype = zp.data_type if zp is not None else _attr(node, "output_dtype", 0) or TensorProto.UINT8
    else:
        dtype = zp.data_type if zp is not None else (inits[node.input[0]].data_type if weight else 0)
    if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
        out.append(LintViolation(name, "zero-point", "zero point is not 0 (TensorRT needs symmetric Q/DQ)"))
    allowed = WEIGHT_QTYPES if weight else ACT_QTYPES
    if dtype and dtype not in allowed:
        kind = "weight" if weight else "activation"
        out.append(LintViolation(name, "qdq-dtype", f"{kind} Q/DQ type {TensorProto.DataType.Name(dtype)} "
                                 f"is not accepted ({'INT8/FP8/INT4' if weight else 'INT8/FP8'})"))
    if scale is None:
        out.append(LintViolation(name, "scale", "scale is not an initializer"))
        return out
    s = numpy_helper.to_array(scale)
    if np.any(s <= 0):
        out.append(LintViolation(name, "scale", "scale is not positive"))
    if not weight and s.size > 1:
        out.append(LintViolation(name, "per-channel-activation", f"activation scale has {s.size} values "
                                 "(TensorRT takes per-tensor activation scales)"))
    return out
