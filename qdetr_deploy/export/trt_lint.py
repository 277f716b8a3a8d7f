"""Static TensorRT lint of an ONNX graph, for one TensorRT version (pure onnx, no TensorRT needed).

Each rule names what a given TensorRT (10.3, JetPack 6's, the oldest supported, by default) would reject.
Sources (quoted where a rule relies on them):

- onnx-tensorrt ``docs/operators.md``: "TensorRT 10.0 supports operators in the inclusive range of opset 9
  to opset 20" (release/10.0 .. the 10.x copies before 10.15); "TensorRT 10.15 supports operators in the
  inclusive range of opset 9 to opset 24" (release/10.15). INT4 tensors need opset 21 (ONNX), so on a
  TensorRT whose documented range ends at 20 a graph has no INT4 at all.
- onnx-tensorrt ``docs/Changelog.md``: operators added after 10.0 (``DeformConv`` 10.1; the windows 10.4;
  ``STFT`` 10.5; ``RotaryEmbedding``, ``RMSNormalization``, ``TensorScatter`` 10.15); "Added support for
  parsing nodes with Quickly Deployable Plugins" (10.6).
- TensorRT 10.3 ``NvInfer.h`` (``IDequantizeLayer``) and the "Working with Quantized Types" guide:
  INT4 only as weight-only quantization of GEMM weights (a 2-D constant through DequantizeLinear feeding
  MatMul/Gemm, whose activation input is not quantized), and then block-quantized; block quantization only
  for INT4 (FP4 from 10.8); zero points 0; per-tensor activation scales; FP8 needs compute capability 8.9+
  (Ada, Hopper: Jetson Orin, sm_87, has none). NVIDIA/TensorRT#4262: INT4 weights behind INT8 activations
  are not a TensorRT kernel.
- ``tensorrt.plugin`` / onnx-tensorrt ``importerUtils.cpp`` ``createPlugin`` (release/10.16): from 10.9 a
  quickly deployable plugin with both ``impl`` and ``aot_impl`` needs the node attribute ``aot`` (or a
  ``PREFER_*_PYTHON_PLUGINS`` network flag), else "has both AOT and JIT implementations". The qdetr
  ``W4A8Linear`` node (``kernels/trt_plugins``) carries ``aot`` from 10.9 and not before.

Not false alarms any more: Clip bounds may be tensors (the 10.x Clip importer takes them), and zero points /
scales / axes may come from ``Constant`` nodes as well as initializers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from qdetr_deploy.errors import QDetrError

DEFAULT_TRT_VERSION = "10.3"
MIN_TRT = (10, 3)
TRT_OPSET_MIN = 9
#: (from version, last documented opset): the operators.md header of that release onwards
OPSET_MAX = ((10, 0, 20), (10, 15, 24))
INT4_OPSET = 21
#: block-quantizable types by version: INT4 from 10.0 (weight-only), FP4 (FLOAT4E2M1) from 10.8
BLOCK_TYPES = ((10, 0, {TensorProto.INT4}), (10, 8, {TensorProto.INT4, TensorProto.FLOAT4E2M1}))
FP8_SM = (8, 9)
AOT_PLUGINS = (10, 9)  # tensorrt.plugin registers impl and aot_impl: the node needs the aot attribute
PLUGIN_DOMAIN, PLUGIN_OP = "qdetr", "W4A8Linear"
PLUGIN_ATTRS = {"k": "INT", "x_step": "FLOAT", "x_zero_point": "INT", "qmin": "INT", "qmax": "INT",
                "plugin_namespace": "STRING"}
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round Scan ScaledTanh
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
#: operators the parser gained after 10.0 (onnx-tensorrt Changelog.md; Attention: in 10.15's operators.md)
OPS_SINCE = {"DeformConv": (10, 1), "BlackmanWindow": (10, 4), "HammingWindow": (10, 4),
             "HannWindow": (10, 4), "STFT": (10, 5), "RotaryEmbedding": (10, 15),
             "RMSNormalization": (10, 15), "TensorScatter": (10, 15), "Attention": (10, 15)}
ACT_QTYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
WEIGHT_QTYPES = ACT_QTYPES | {TensorProto.INT4}
_CONST_INPUTS = {"ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,)}
_GEMMS = ("MatMul", "Gemm")
_QDQ = ("DequantizeLinear",)


@dataclass(frozen=True)
class LintViolation:
    """One thing TensorRT would reject or run differently: the node, the rule, and what is wrong."""

    node: str
    rule: str
    message: str


def trt_version_key(version: str | tuple[int, ...]) -> tuple[int, int, int]:
    """``"10.3"`` / ``"10.3.0.26"`` -> (10, 3, 0); non-numeric parts count as 0."""
    parts = list(version) if isinstance(version, tuple) else \
        [int(p) if p.isdigit() else 0 for p in str(version).split(".")]
    parts = (parts + [0, 0, 0])[:3]
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_trt_version(version: str, what: str = "TensorRT") -> tuple[int, int, int]:
    """The version key, or a one-line QDetrError below 10.3 (on 8.6, ``create_network(0)`` means implicit
    batch; 10.3 is JetPack 6's and the oldest this project supports)."""
    key = trt_version_key(version)
    if key[:2] < MIN_TRT:
        raise QDetrError(f"{what} {version} is not supported: TensorRT 10.3 or newer is needed (JetPack 6+)")
    return key


def opset_range(version: str) -> tuple[int, int]:
    """The ONNX opsets ``version``'s parser documents (operators.md)."""
    key = trt_version_key(version)
    return TRT_OPSET_MIN, max(hi for (ma, mi, hi) in OPSET_MAX if key[:2] >= (ma, mi))


def block_types(version: str) -> set[int]:
    key = trt_version_key(version)
    return set().union(*(t for (ma, mi, t) in BLOCK_TYPES if key[:2] >= (ma, mi)))


def lint_tensorrt(model: onnx.ModelProto | str, trt_version: str = DEFAULT_TRT_VERSION,
                  compute_capability: tuple[int, int] | None = None) -> list[LintViolation]:
    """Every incompatibility of ``model`` (a ModelProto or a path) with TensorRT ``trt_version`` (on a GPU of
    ``compute_capability`` when given: FP8), one per node and rule."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    key = check_trt_version(trt_version)
    g = _Graph(model.graph)
    found: list[LintViolation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    lo, hi = opset_range(trt_version)
    if not lo <= opset <= hi:
        found.append(LintViolation("<model>", "opset", f"opset {opset} is outside TensorRT {trt_version}'s "
                                   f"documented {lo}..{hi}"))
    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.domain == PLUGIN_DOMAIN and node.op_type == PLUGIN_OP:
            found += _lint_plugin(node, name, key)
            continue
        since = OPS_SINCE.get(node.op_type, (10, 0) if node.op_type in SUPPORTED_OPS else None)
        if node.domain not in ("", "ai.onnx") or since is None or key[:2] < since:
            op = f"{node.domain or 'ai.onnx'}:{node.op_type}"
            found.append(LintViolation(name, "unsupported-op", f"{op} is not in TensorRT {trt_version}'s "
                                       "ONNX operator list"))
            continue
        for i in _CONST_INPUTS.get(node.op_type, ()):
            if len(node.input) > i and node.input[i] and g.const(node.input[i]) is None:
                found.append(LintViolation(name, "constant-input", f"input {i} of {node.op_type} must be "
                                           "constant"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found += _lint_qdq(g, node, name, trt_version, compute_capability)
    return found


class _Graph:
    """Constants (initializers and ``Constant`` node outputs), producers and consumers of one graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> onnx.TensorProto | None:
        if name in self.inits:
            return self.inits[name]
        node = self.constants.get(name)
        attr = next((a for a in node.attribute if a.name == "value"), None) if node is not None else None
        return attr.t if attr is not None else None


def _attr(node: onnx.NodeProto, key: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == key), default)


def _lint_plugin(node: onnx.NodeProto, name: str, key: tuple[int, int, int]) -> list[LintViolation]:
    """The qdetr::W4A8Linear node of the ``--bits 4`` rewrite: its attributes, and ``aot`` by version."""
    out = []
    attrs = {a.name: a for a in node.attribute}
    for attr, kind in PLUGIN_ATTRS.items():
        if attr not in attrs or onnx.AttributeProto.AttributeType.Name(attrs[attr].type) != kind:
            out.append(LintViolation(name, "plugin", f"{PLUGIN_OP} needs the {kind} attribute {attr}"))
    if "plugin_namespace" in attrs and attrs["plugin_namespace"].s.decode() != PLUGIN_DOMAIN:
        out.append(LintViolation(name, "plugin", f"plugin_namespace is not {PLUGIN_DOMAIN!r}"))
    version = ".".join(map(str, key))
    if key[:2] >= AOT_PLUGINS and "aot" not in attrs:
        out.append(LintViolation(name, "plugin-aot", f"TensorRT {version} registers both implementations of "
                                 "tensorrt.plugin ops: the node needs the attribute aot"))
    if key[:2] < AOT_PLUGINS and "aot" in attrs:
        out.append(LintViolation(name, "plugin-aot", f"TensorRT {version} has no AOT plugins: drop the "
                                 "attribute aot"))
    return out


def _lint_qdq(g: _Graph, node: onnx.NodeProto, name: str, version: str,
              cc: tuple[int, int] | None) -> list[LintViolation]:
    out: list[LintViolation] = []
    scale = g.const(node.input[1])
    has_zp = len(node.input) > 2 and bool(node.input[2])
    zp = g.const(node.input[2]) if has_zp else None
    if has_zp and zp is None:
        out.append(LintViolation(name, "zero-point", "zero point is not a constant"))
    x = g.const(node.input[0])
    weight = node.op_type == "DequantizeLinear" and x is not None
    if node.op_type == "QuantizeLinear":
        dtype = zp.data_type if zp is not None else _attr(node, "output_dtype", 0) or TensorProto.UINT8
    else:
        dtype = zp.data_type if zp is not None else (x.data_type if weight else 0)
    if zp is not None and np.any(numpy_helper.to_array(zp).astype(np.float64) != 0):
        out.append(LintViolation(name, "zero-point", "zero point is not 0 (TensorRT needs symmetric Q/DQ)"))
    allowed = (WEIGHT_QTYPES | block_types(version)) if weight else ACT_QTYPES
    type_name = TensorProto.DataType.Name(dtype) if dtype else "?"
    if dtype and dtype not in allowed:
        kind = "weight" if weight else "activation"
        names = "/".join(TensorProto.DataType.Name(t) for t in sorted(allowed))
        out.append(LintViolation(name, "qdq-dtype", f"{kind} Q/DQ type {type_name} is not accepted "
                                 f"({names})"))
    if dtype == TensorProto.FLOAT8E4M3FN and cc is not None and tuple(cc) < FP8_SM:
        out.append(LintViolation(name, "fp8", f"FP8 needs compute capability 8.9+, this GPU is "
                                 f"sm_{cc[0]}{cc[1]}"))
    block = _attr(node, "block_size", 0)
    if block and dtype not in block_types(version):
        ok = "/".join(TensorProto.DataType.Name(t) for t in sorted(block_types(version)))
        out.append(LintViolation(name, "block-quantization", f"TensorRT {version} block-quantizes only {ok}, "
                                 f"not {type_name}"))
    if dtype == TensorProto.INT4:
        out += _lint_int4(g, node, name, weight, x, block)
    if scale is None:
        out.append(LintViolation(name, "scale", "scale is not a constant"))
        return out
    s = numpy_helper.to_array(scale)
    if np.any(s.astype(np.float32) <= 0):
        out.append(LintViolation(name, "scale", "scale is not positive"))
    if not weight and s.size > 1:
        out.append(LintViolation(name, "per-channel-activation", f"activation scale has {s.size} values "
                                 "(TensorRT takes per-tensor activation scales)"))
    return out


def _lint_int4(g: _Graph, node: onnx.NodeProto, name: str, weight: bool, x: onnx.TensorProto | None,
               block: int) -> list[LintViolation]:
    """INT4: a weight-only, block-quantized, 2-D GEMM weight (input B of MatMul/Gemm, float input A)."""
    def bad(why: str) -> list[LintViolation]:
        return [LintViolation(name, "int4-placement", f"INT4 {why} (TensorRT takes INT4 only as weight-only "
                              "block-quantized 2-D GEMM weights)")]

    if not weight:
        return bad("on an activation")
    if len(x.dims) != 2:
        return bad(f"weight of rank {len(x.dims)}")
    users = g.consumers.get(node.output[0], [])
    if not users or any(u.op_type not in _GEMMS or list(u.input).index(node.output[0]) != 1 for u in users):
        ops = ", ".join(sorted({u.op_type for u in users})) or "nothing"
        return bad(f"weight feeding {ops}, not the B input of MatMul/Gemm")
    quantized_a = [u for u in users if getattr(g.producer.get(u.input[0]), "op_type", "") in _QDQ]
    if quantized_a:
        return bad(f"weight of {quantized_a[0].name or quantized_a[0].output[0]} whose activation input is "
                   "quantized too (not weight-only)")
    if not block:
        return bad("weight without block quantization (block_size)")
    return []
