"""ONNX rewrite for the 4-bit TensorRT plugins (pure onnx + numpy: no TensorRT needed).

Each 4-bit linear of a qdetr export (``qdetr_deploy/export/folding.py``)::

    x -> [Clip] -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> MatMul <- DequantizeLinear(W [K,N],
                                                                     | Add [1,N] bias      scale [N], axis 1)

(W INT4, or INT8 with codes in [-8, 7]: the TensorRT export's int8 container)
(or a ``Gemm`` with ``transB``, its bias as input C) becomes one node ``qdetr::W4A8Linear``::

    W4A8Linear(x_q, w_packed, w_step, zcorr, bias) -> y, scratch0, scratch1

- ``x_q``: the QuantizeLinear's input (after the Clip that restores a narrow code range, which stays);
- ``w_packed``: INT32 ``[N, ceil(ceil(K/2)/4)]``, each row the int4 codes of output channel n packed two per
  byte (``kernels/packing.py``), zero-padded to whole int32 words, little-endian (TensorRT takes int32
  constants anywhere, uint8 ones hardly);
- ``w_step`` float32 ``[N]``; ``zcorr`` int32 ``[N]`` = ``z * sum_k w[n, k]``; ``bias`` float32 ``[N]`` (zeros
  when the layer has none);
- attributes ``k``, ``x_step`` (float32), ``x_zero_point``, ``qmin``, ``qmax``: the activation quantizer as
  int8 codes (UINT8 codes and zero point shifted by -128, as ``kernels/quantize_act.py``), and
  ``plugin_namespace`` = "qdetr" (TensorRT's ONNX parser looks the plugin up by op type and namespace);
  ``aot`` (TensorRT 10.9+ only, :func:`aot_attribute`): 1 asks for the ahead-of-time implementation. From
  10.9 ``tensorrt.plugin`` registers both ``impl`` and ``aot_impl``, and onnx-tensorrt's ``createPlugin``
  (``importerUtils.cpp``, release/10.16) then needs the node attribute ``aot`` (or a network flag
  ``PREFER_AOT/JIT_PYTHON_PLUGINS``); before 10.9 there is no AOT and the attribute is left out;
- ``scratch0/1``: one-element dummy outputs (see ``kernels/trt_plugins/fused.py``).

INT4 weights of convolutions (no plugin) become INT8 initializers with the same codes, which TensorRT's
int8 convolutions take. Layers that do not match (per-channel activation scales, float fake-quant inputs,
weights not INT4) are left as they are and reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from kernels.packing import pack_int4_np, unpack_int4_np, zero_point_correction

DOMAIN = "qdetr"
OP_TYPE = "W4A8Linear"
INPUTS = ("x", "w_packed", "w_step", "zcorr", "bias")
N_SCRATCH = 2
NOT_INT4 = "weight is not an INT4/INT8 initializer through DequantizeLinear"
NOT_4_BIT = "INT8 weight codes do not fit 4 bits"
WEIGHT_TYPES = (TensorProto.INT4, TensorProto.INT8)
_CODE_RANGES = {TensorProto.INT8: (-128, 127, 0), TensorProto.UINT8: (0, 255, -128),
                TensorProto.INT4: (-8, 7, 0), TensorProto.UINT4: (0, 15, 0)}


@dataclass
class RewriteReport:
    """What :func:`rewrite_int4_linears` did: plugin nodes made, convs converted, layers skipped (why)."""

    plugins: list[str] = field(default_factory=list)
    int8_convs: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def pack_plugin_weight(codes: np.ndarray) -> np.ndarray:
    """int4 codes ``[N, K]`` -> the plugin's INT32 rows ``[N, ceil(ceil(K/2)/4)]`` (little-endian bytes)."""
    packed = pack_int4_np(np.asarray(codes).astype(np.int8))
    pad = (-packed.shape[1]) % 4
    packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view("<i4")


def unpack_plugin_weight(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_plugin_weight`: INT32 rows -> int8 codes ``[N, K]``."""
    raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)
    return unpack_int4_np(raw[:, : (k + 1) // 2], k, signed=True)


class _Graph:
    """Producer/consumer/initializer lookups over one graph, updated as nodes are removed."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.outputs = {o.name for o in graph.output}

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if name in n.input]

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def dtype(self, name: str) -> int | None:
        t = self.inits.get(name)
        return None if t is None else t.data_type

    def add_init(self, name: str, value: np.ndarray) -> str:
        name = self.unique(name)
        t = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def unique(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        return name


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight(g: _Graph, name: str, trans_b: bool) -> tuple[np.ndarray, np.ndarray, onnx.NodeProto] | str:
    """(codes [N, K], step [N], the DequantizeLinear) of a 4-bit weight input, or why it is not one: INT4, or
    INT8 (the TensorRT export's int8 container) whose codes all lie in [-8, 7]."""
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or g.dtype(dq.input[0]) not in WEIGHT_TYPES:
        return NOT_INT4
    codes = g.array(dq.input[0]).astype(np.int8)
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        return NOT_4_BIT
    zp = g.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if codes.ndim != 2 or (zp is not None and np.any(zp.astype(np.int8) != 0)):
        return "4-bit weight is not 2-D with zero point 0"
    step = g.array(dq.input[1]).astype(np.float32)
    block = int(_attr(dq, "block_size", 0))
    if block:  # blocks along K (axis 0 of [K, N]): one step per output channel when the rows are equal
        if trans_b or int(_attr(dq, "axis", 1)) % 2 != 0 or np.any(step != step[:1]):
            return "block-quantized weight is not per output channel"
        step = step[0]
    codes = codes if trans_b else codes.T  # -> [N, K]
    step = step.reshape(-1)
    axis = 1 if block else int(_attr(dq, "axis", 1))
    if step.size not in (1, codes.shape[0]) or (step.size > 1 and axis % 2 != (0 if trans_b else 1)):
        return "weight scale is not per output channel"
    return codes, np.broadcast_to(step, (codes.shape[0],)).copy(), dq


def _activation(g: _Graph, name: str) -> tuple[str, float, int, int, int, list[onnx.NodeProto]] | str:
    """(quantizer input, step, zero point, qmin, qmax as int8 codes, [DQ, Q]) of a Q/DQ'd activation."""
    dq = g.producer.get(name)
    q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return "activation input is not QuantizeLinear -> DequantizeLinear (float fake-quant or none)"
    step, zp = g.array(q.input[1]), g.array(q.input[2]) if len(q.input) > 2 else np.zeros(1, np.int8)
    if step is None or zp is None or step.size != 1 or zp.size != 1:
        return "activation scale is not one constant per tensor"
    if list(dq.input[1:]) != list(q.input[1:]):
        return "QuantizeLinear and DequantizeLinear scales differ"
    ztype = g.dtype(q.input[2]) if len(q.input) > 2 else TensorProto.UINT8
    if ztype not in _CODE_RANGES:
        return f"activation type {TensorProto.DataType.Name(ztype)} is not an integer the plugin takes"
    lo, hi, shift = _CODE_RANGES[ztype]
    z = int(zp.astype(np.int64).reshape(-1)[0])
    x_step = float(step.astype(np.float32).reshape(-1)[0])
    return q.input[0], x_step, z + shift, lo + shift, hi + shift, [dq, q]


def _bias(g: _Graph, out: str, n: int) -> tuple[np.ndarray | None, onnx.NodeProto | None]:
    """A constant bias Add that is the only consumer of ``out`` -> (bias [N], the Add)."""
    users = g.consumers(out)
    if len(users) != 1 or users[0].op_type != "Add" or out in g.outputs:
        return None, None
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    b = g.array(other)
    if b is None or b.size != n or (b.ndim > 1 and b.shape[-1] != n):
        return None, None
    return b.astype(np.float32).reshape(-1), add


def _match(g: _Graph, node: onnx.NodeProto) -> dict | str:
    """Everything the plugin node needs from a MatMul/Gemm, or why it does not match."""
    trans_b = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                   or _attr(node, "beta", 1.0) != 1.0):
        return "Gemm with transA, alpha or beta"
    w = _weight(g, node.input[1], trans_b)
    if isinstance(w, str):
        return w
    act = _activation(g, node.input[0])
    if isinstance(act, str):
        return act
    codes, step, wdq = w
    bias, add = None, None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = g.array(node.input[2])
        if bias is None or bias.size != codes.shape[0]:
            return "Gemm bias is not a constant [N]"
        bias = bias.astype(np.float32).reshape(-1)
    elif node.op_type == "MatMul":
        bias, add = _bias(g, node.output[0], codes.shape[0])
    return {"codes": codes, "step": step, "act": act, "bias": bias, "add": add, "wdq": wdq}


def _plugin_node(g: _Graph, node: onnx.NodeProto, m: dict, aot: bool) -> onnx.NodeProto:
    x, x_step, z, qmin, qmax, _ = m["act"]
    codes, base = m["codes"], node.name or node.output[0]
    n, k = codes.shape
    bias = m["bias"] if m["bias"] is not None else np.zeros(n, np.float32)
    zcorr = zero_point_correction(torch.from_numpy(codes), z).numpy()
    inputs = [x, g.add_init(f"{base}.w_packed", pack_plugin_weight(codes)),
              g.add_init(f"{base}.w_step", m["step"].astype(np.float32)),
              g.add_init(f"{base}.zcorr", zcorr.astype(np.int32)), g.add_init(f"{base}.bias", bias)]
    y = (m["add"] or node).output[0]
    outputs = [y] + [g.unique(f"{base}.scratch{i}") for i in range(N_SCRATCH)]
    attrs = {"k": int(k), "x_step": float(x_step), "x_zero_point": int(z), "qmin": int(qmin),
             "qmax": int(qmax), "plugin_namespace": DOMAIN}
    if aot:
        attrs["aot"] = 1
    return helper.make_node(OP_TYPE, inputs, outputs, name=f"{base}/{OP_TYPE}", domain=DOMAIN, **attrs)


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody uses, then initializers nobody reads."""
    graph = model.graph
    keep = {o.name for o in graph.output}
    alive: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if node.domain == DOMAIN or any(o in keep for o in node.output):
            alive.append(node)
            keep.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _int4_convs_to_int8(g: _Graph, report: RewriteReport) -> None:
    for node in g.graph.node:
        if node.op_type != "Conv":
            continue
        dq = g.producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or g.dtype(dq.input[0]) != TensorProto.INT4:
            continue
        for i in (0, 2):  # the codes and the zero point: same values, INT8 container
            if len(dq.input) > i and dq.input[i]:
                t = g.inits[dq.input[i]]
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int8), t.name))
        report.int8_convs.append(node.name or node.output[0])


def plugin_form_for(trt_version: str) -> str:
    """The plugin form ``kernels.trt_plugins.register_plugins`` picks on TensorRT ``trt_version``: "v3"
    (Python IPluginV3, 10.3-10.5), "qdp" (``tensorrt.plugin``, 10.6-10.8), "qdp-aot" (10.9+)."""
    parts = [int(p) if p.isdigit() else 0 for p in str(trt_version).split(".")[:2]] + [0, 0]
    key = (parts[0], parts[1])
    return "qdp-aot" if key >= (10, 9) else "qdp" if key >= (10, 6) else "v3"


def aot_attribute(form: str) -> int | None:
    """The node attribute ``aot`` for a plugin form: 1 for "qdp-aot" (the engine runs without Python), none
    otherwise (TensorRT before 10.9 has no AOT plugins)."""
    return 1 if form == "qdp-aot" else None


def rewrite_int4_linears(model: onnx.ModelProto, aot: bool = False, int8_convs: bool = True) -> RewriteReport:
    """Replace every matching 4-bit MatMul/Gemm of ``model`` (in place) by a ``qdetr::W4A8Linear`` node
    (with ``aot=1`` when ``aot``: TensorRT 10.9+, :func:`aot_attribute`)."""
    g = _Graph(model.graph)
    report = RewriteReport()
    for node in list(model.graph.node):
        if node.op_type in ("MatMul", "Gemm"):
            m = _match(g, node)
            if isinstance(m, dict):
                plugin = _plugin_node(g, node, m, aot)
                node.CopyFrom(plugin)  # in place keeps the topological order
                if m["add"] is not None:
                    m["add"].ClearField("output")  # its output now comes from the plugin
                report.plugins.append(plugin.name)
            elif m not in (NOT_INT4, NOT_4_BIT):  # float and 8-bit layers are not worth reporting
                report.skipped[node.name or node.output[0]] = m
    if int8_convs:
        _int4_convs_to_int8(g, report)
    _drop_dead(model)
    if report.plugins and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return report


def rewrite_file(src: str | os.PathLike, aot: bool = False) -> tuple[bytes, RewriteReport]:
    """Load ``src`` (with external data), rewrite it, and return the serialized model and the report."""
    model = onnx.load(str(Path(src)))
    report = rewrite_int4_linears(model, aot=aot)
    return model.SerializeToString(), report
