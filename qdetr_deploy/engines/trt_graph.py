"""The graph ``build-engine --backend tensorrt`` hands to TensorRT's parser (pure onnx + numpy).

``--bits 8``: every INT4/UINT4 initializer becomes INT8 with the same values (:func:`int4_to_int8`): the
4-bit weights then run on TensorRT's INT8 kernels exactly, as the int8 container export does. A block-
quantized INT4 weight becomes per-channel again when its blocks share one step per column (TensorRT 10.3
block-quantizes only INT4). What has no exact INT8 form is refused in one line: 4-bit activation
quantizers (an ``onnxruntime``-target export; INT8 would saturate elsewhere) and blocks with distinct steps.
``--bits 4``: ``kernels.trt_plugins.rewrite_int4_linears`` (the plugins) instead.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdetr_deploy.errors import QDetrError

FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


def int4_to_int8(model: onnx.ModelProto, path: str | os.PathLike = "<model>") -> list[str]:
    """Rewrite ``model`` in place so that no INT4/UINT4 tensor is left; returns the converted weights'
    DequantizeLinear names. QDetrError (naming ``path``) where no exact INT8 form exists."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    converted: list[str] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = [inits.get(i) if i else None for i in node.input] + [None] * 3
        four = [t for t in ins[:3] if t is not None and t.data_type in FOUR_BIT]
        q_type = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        name = node.name or node.output[0]
        if node.op_type == "QuantizeLinear" and (four or q_type in FOUR_BIT):
            raise QDetrError(f"{name} quantizes an activation to 4 bits, which has no exact INT8 form: "
                             "re-export with --target tensorrt", path)
        if not four:
            continue
        if ins[0] is None:
            raise QDetrError(f"{name} dequantizes a non-constant 4-bit tensor: re-export with --target "
                             "tensorrt", path)
        for t in four:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int8), t.name))
        _unblock(node, inits, name, path)
        converted.append(name)
    return converted


def _unblock(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], name: str,
             path: str | os.PathLike) -> None:
    """A block-quantized DequantizeLinear -> per-channel (one step per column along the other axis)."""
    block = next((a for a in node.attribute if a.name == "block_size"), None)
    if block is None or not block.i:
        return
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    scale = numpy_helper.to_array(inits[node.input[1]])
    first = np.take(scale, [0], axis=axis)
    if scale.ndim != 2 or np.any(scale != first) or (len(node.input) > 2 and node.input[2]):
        raise QDetrError(f"{name} is block-quantized with distinct block steps, which INT8 (per channel "
                         "only on TensorRT 10.3) cannot hold: build with --bits 4", path)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(first.reshape(-1), node.input[1]))
    attrs = [a for a in node.attribute if a.name not in ("block_size", "axis")]
    del node.attribute[:]
    node.attribute.extend(attrs + [helper.make_attribute("axis", 1 - axis % 2)])
