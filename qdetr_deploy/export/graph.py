"""A small ONNX graph builder: initializers, nodes named after PyTorch modules, unique tensor names.

Node names are the PyTorch module name plus the op, e.g. ``transformer.encoder.layers.0.linear1/MatMul``;
every output tensor gets a unique name derived from its node. :class:`ActRecord` notes, for each activation
quantizer, which tensor holds its integer codes in the graph (the parity check exposes those as outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels.packing import pack_int4_np

FLOAT = TensorProto.FLOAT
INT_DTYPES = {  # ONNX integer element type -> (qmin, qmax)
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT8: (0, 255),
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
}
DTYPE_NAMES = {TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.INT4: "INT4",
               TensorProto.UINT4: "UINT4"}


@dataclass
class ActRecord:
    """Where one activation quantizer ended up in the graph.

    ``codes``: the tensor holding its integer codes (a QuantizeLinear output, or the Clip output of a
    float fake-quant subgraph); ``shift``: graph code minus PyTorch code (per channel when ``axis`` is
    set); ``layout``: "same", "kT" (the graph holds k transposed, [B,h,d,L]) or "seq" (a [B,C,h,w] activation
    held as the sequence [hw,B,C]); ``mode``: "qdq",
    "clip+qdq" (the codes need a Clip to their narrow range: on the float input, or on the codes after the Q
    for onnxruntime), "q+uint8 clip+dq" (a conv's uint8 output clipped) or "float" (fake-quant fallback,
    ``reason`` says why).
    """

    module: str
    codes: str
    shift: np.ndarray
    axis: int | None
    mode: str
    dtype: str
    layout: str = "same"
    reason: str = ""


@dataclass
class GraphBuilder:
    """Collects nodes, initializers and activation records of one graph."""

    opset: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    acts: list[ActRecord] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def unique(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... if taken."""
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    # -- initializers ------------------------------------------------------------------------------------
    def const(self, name: str, value: np.ndarray | float | int, dtype: type = np.float32) -> str:
        """A float32 (or ``dtype``) initializer; returns its unique name."""
        arr = np.asarray(value, dtype=dtype)
        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def const_int(self, name: str, codes: np.ndarray, elem_type: int) -> str:
        """An integer initializer of ONNX type ``elem_type``; INT4/UINT4 are packed two per byte, low
        nibble first, over the flattened tensor (ONNX's layout, as ``helper.make_tensor`` packs them)."""
        codes = np.asarray(codes).astype(np.int64)
        lo, hi = INT_DTYPES[elem_type]
        if codes.size and (codes.min() < lo or codes.max() > hi):
            raise ValueError(f"{name}: codes outside [{lo}, {hi}]")
        name = self.unique(name)
        if elem_type in (TensorProto.INT4, TensorProto.UINT4):
            raw = pack_int4_np(codes.reshape(-1)).tobytes()
            tensor = helper.make_tensor(name, elem_type, list(codes.shape), raw, raw=True)
        else:
            np_dtype = np.int8 if elem_type == TensorProto.INT8 else np.uint8
            tensor = numpy_helper.from_array(codes.astype(np_dtype), name)
        self.initializers.append(tensor)
        return name

    def axes(self, name: str, axes: list[int]) -> str:
        return self.const(name, np.asarray(axes, np.int64), np.int64)

    # -- nodes -------------------------------------------------------------------------------------------
    def node(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        """Add ``op_type`` named ``name`` (made unique); returns its output name (a list when n_out > 1)."""
        node_name = self.unique(name)
        outs = [self.unique(f"{node_name}_out{i}" if n_out > 1 else f"{node_name}_out") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs if n_out > 1 else outs[0]

    def rename_output(self, tensor: str, new: str) -> None:
        """Rename tensor ``tensor`` to ``new`` (a graph output name) in its producer and every consumer."""
        if new in self._names:
            raise KeyError(f"tensor name {new} is taken")
        self._names.add(new)
        for node in self.nodes:
            for i, name in enumerate(node.output):
                if name == tensor:
                    node.output[i] = new
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = new

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              graph_name: str = "qdetr") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        extra = sorted({n.domain for n in self.nodes} - {"", "ai.onnx"})  # com.microsoft (ort_fusion)
        opsets += [helper.make_opsetid(d, 1) for d in extra]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qdetr-deploy")
        model.ir_version = min(onnx.IR_VERSION, 10)
        return model
