"""Graph rewrites for the onnxruntime target that onnxruntime's own optimiser does not make.

``DequantizeLinear(codes) -> MatMul <- DequantizeLinear(int8 weight)`` followed by ``Add(bias)`` becomes one
``com.microsoft.MatMulIntegerToFloat`` with its bias input. onnxruntime's QDQ fusion makes the same kernel
from the Q/DQ pattern but leaves the bias as a separate float Add (one more kernel per linear layer, a few
percent of a small model's time). The kernel and its arithmetic are the ones onnxruntime picks itself
(int32 accumulation, then ``a_scale * b_scale`` and the bias in float), so the outputs are bit-identical.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qdetr_deploy.export.graph import GraphBuilder

MS_DOMAIN = "com.microsoft"
_8BIT = (TensorProto.UINT8, TensorProto.INT8)


def fuse_matmul_bias(g: GraphBuilder) -> int:
    """Rewrite every fusable MatMul + bias Add of ``g`` in place; returns how many were fused.

    Fusable: both MatMul inputs are DequantizeLinear outputs, the activation's per tensor from an 8-bit
    tensor, the weight's an INT8 initializer (the INT4 container is left alone: the kernel takes 8-bit
    weights); the MatMul output feeds only an Add of a constant [1,N] or [N] bias.
    """
    inits = {t.name: t for t in g.initializers}
    producer = {o: n for n in g.nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in g.nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    add_of = {n.input[0]: n for n in g.nodes if n.op_type == "Add" and len(n.input) == 2}
    fused, drop = {}, set()
    for n in g.nodes:
        if n.op_type != "MatMul":
            continue
        a, b = producer.get(n.input[0]), producer.get(n.input[1])
        add = add_of.get(n.output[0])
        if not (_act_dq(a, inits) and _weight_dq(b, inits) and add is not None and readers[n.output[0]] == 1
                and add.input[1] in inits):
            continue
        bias = numpy_helper.to_array(inits[add.input[1]])
        n_out = inits[b.input[0]].dims[-1]
        if bias.size != n_out or bias.dtype != np.float32:
            continue
        bias_1d = g.const(f"{add.input[1]}_1d", bias.reshape(-1))
        zp = [a.input[2] if len(a.input) > 2 else "", b.input[2] if len(b.input) > 2 else ""]
        # the MatMul's name (its module's) stays; the Add's output name stays for its readers
        inputs = [a.input[0], b.input[0], a.input[1], b.input[1], *zp, bias_1d]
        fused[id(n)] = helper.make_node("MatMulIntegerToFloat", inputs, [add.output[0]], name=n.name,
                                        domain=MS_DOMAIN)
        drop.add(id(add))
        for dq in (a, b):
            if readers[dq.output[0]] == 1:
                drop.add(id(dq))
    if fused:
        g.nodes[:] = [fused.get(id(n), n) for n in g.nodes if id(n) not in drop]
        used = {i for n in g.nodes for i in n.input}
        g.initializers[:] = [t for t in g.initializers if t.name in used]
    return len(fused)


def _act_dq(node, inits: dict) -> bool:
    """A per-tensor DequantizeLinear of computed 8-bit codes."""
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] in inits:
        return False
    scale = inits.get(node.input[1])
    zp = inits.get(node.input[2]) if len(node.input) > 2 else None
    return (scale is not None and len(scale.dims) == 0 and zp is not None and zp.data_type in _8BIT
            and len(zp.dims) == 0)


def _weight_dq(node, inits: dict) -> bool:
    """A DequantizeLinear of an INT8 [K,N] weight initializer, per tensor or per column (axis 1)."""
    if node is None or node.op_type != "DequantizeLinear":
        return False
    w = inits.get(node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return w is not None and w.data_type == TensorProto.INT8 and len(w.dims) == 2 and axis in (1, -1)

