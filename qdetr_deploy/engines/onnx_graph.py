"""What an ONNX graph is, read from the graph itself: its precision, and its input contract when
qdetr-deploy did not write it.

``graph_precision`` labels a graph by what it contains (quantization ops, integer weight initializers,
activation quantizer types), not by the metadata it carries: an ONNX Runtime ``quantize_static`` output
keeps the fp32 export's metadata, and is int8 all the same. ``foreign_metadata`` stands in for the
``qdetr`` metadata of a DETR-style ONNX file written by another tool.

No runtime and no torch here: ``onnx`` protobufs and ONNX Runtime session descriptions only.
"""

from __future__ import annotations

import os
from typing import Any

from qdetr_deploy.deploy_format import IMAGENET_MEAN, IMAGENET_STD
from qdetr_deploy.errors import QDetrError

#: quantized-arithmetic ops (any domain); every op whose name starts with "QLinear" counts too
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QGemm", "QAttention"}
# op type -> input positions that hold an integer weight when they are initializers (DequantizeLinear: when
# it feeds a layer below, not e.g. a quantized Add constant)
_WEIGHT_INPUTS = {"DequantizeLinear": (0,), "QLinearConv": (3,), "QLinearMatMul": (0, 3), "QGemm": (3,),
                  "MatMulInteger": (0, 1), "ConvInteger": (0, 1)}
_LAYERS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}
_PASS_THROUGH = {"Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Identity", "Flatten"}
_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32}
DETR_OUTPUTS = ({"scores", "labels", "boxes"}, {"pred_logits", "pred_boxes"})


def _dtype(elem_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _numel(t: Any) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _count(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


def _activation_type(node: Any, inits: dict[str, Any]) -> str:
    """Integer type a QuantizeLinear writes: its zero point's, else ``output_dtype``, else uint8."""
    if node.op_type == "DynamicQuantizeLinear":
        return "uint8"
    if len(node.input) > 2 and node.input[2] in inits:
        return _dtype(inits[node.input[2]].data_type)
    for a in node.attribute:
        if a.name == "output_dtype" and a.i:
            return _dtype(a.i)
    return "uint8"


def _feeds_layer(name: str, consumers: dict[str, list], hops: int = 3) -> bool:
    """Whether tensor ``name`` reaches a Conv/MatMul/Gemm input, through at most ``hops`` reshaping ops."""
    for node in consumers.get(name, []):
        if node.op_type in _LAYERS:
            return True
        if hops and node.op_type in _PASS_THROUGH and _feeds_layer(node.output[0], consumers, hops - 1):
            return True
    return False


def graph_precision(model: Any) -> dict:
    """``{"label", "ops": {op: n}, "weights": {dtype: n}, "activations": {dtype: n}}`` of an ONNX
    ``ModelProto``: quantization ops counted, integer weight initializers by type (``MatMulNBits`` by its
    ``bits``), activation quantizers by the type they write. The label: "fp32"/"fp16" for a float graph,
    else e.g. "int4 weights, int8 activations" (the narrowest weight type; "float" where none)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    ops: dict[str, int] = {}
    weights: dict[str, int] = {}
    acts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in QUANT_OPS or node.op_type.startswith("QLinear"):
            _count(ops, node.op_type)
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            _count(acts, _activation_type(node, inits))
        if node.op_type == "MatMulNBits" and len(node.input) > 1 and node.input[1] in inits:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            _count(weights, f"int{bits}")
        if node.op_type == "DequantizeLinear" and not _feeds_layer(node.output[0], consumers):
            continue
        for i in _WEIGHT_INPUTS.get(node.op_type, ()):
            t = inits.get(node.input[i]) if i < len(node.input) else None
            if t is not None and _dtype(t.data_type) in _BITS and _numel(t) > 1:
                _count(weights, _dtype(t.data_type))
    floats: dict[str, int] = {}
    for t in graph.initializer:
        if _dtype(t.data_type) in ("float", "float16") and _numel(t) > 1:
            _count(floats, _dtype(t.data_type))
    if not ops and not weights:
        label = "fp16" if floats.get("float16", 0) > floats.get("float", 0) else "fp32"
    else:
        w = min(weights, key=lambda k: _BITS[k]) if weights else "float"
        a = min(acts, key=lambda k: _BITS.get(k, 99)) if acts else "float"
        label = f"{w} weights, {a} activations"
    return {"label": label, "ops": dict(sorted(ops.items())), "weights": weights, "activations": acts}


def is_quantized_label(bits: str | None) -> bool | None:
    """Whether a bits string ("fp32", "4-4-8", a graph label) means quantized; None when unknown."""
    if bits is None:
        return None
    return bits not in ("fp32", "fp16", "float32", "float16")


def reconcile_bits(metadata_bits: str | None, graph: dict | None) -> str | None:
    """What to call an engine's precision: the metadata's bits when the graph agrees (quantized or not),
    else the graph's label and what the metadata claimed."""
    if graph is None:
        return metadata_bits
    if metadata_bits is None:
        return graph["label"]
    if is_quantized_label(metadata_bits) == is_quantized_label(graph["label"]):
        return metadata_bits
    return f"{graph['label']} (from the graph; its metadata says {metadata_bits})"


def foreign_metadata(inputs: list[Any], outputs: list[Any], path: str | os.PathLike,
                     input_size: tuple[int, int] | None = None) -> dict:
    """Metadata for a DETR-style ONNX file without ``qdetr`` metadata, from its ONNX Runtime input and
    output descriptions (``NodeArg``: ``name``, ``shape``, ``type``). The input must be one float32
    ``[B,3,H,W]``; ``H, W`` come from the graph when fixed, else from ``input_size``. Preprocessing is
    DETR's (RGB, ImageNet mean/std, letterbox). Detections only when the outputs are DETR's
    (``outputs_recognised``); their labels are taken as category ids (DETR's COCO heads index classes by
    COCO category id)."""
    need = "float32 [B,3,H,W] (RGB in [0,1] normalised with the ImageNet mean/std, zero-padded bottom/right)"
    if len(inputs) != 1:
        raise QDetrError(f"no qdetr metadata and {len(inputs)} inputs "
                         f"({', '.join(i.name for i in inputs)}): bench and predict run one input, {need}",
                         path)
    inp = inputs[0]
    shape = list(inp.shape)
    if inp.type != "tensor(float)" or len(shape) != 4 or isinstance(shape[1], int) and shape[1] != 3:
        raise QDetrError(f"no qdetr metadata and its input '{inp.name}' is {inp.type} {shape}: "
                         f"it needs {need}", path)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape[2:]]
    if input_size is not None:
        size = [int(input_size[0]), int(input_size[1])]
        if any(f is not None and f != s for f, s in zip(fixed, size)):
            raise QDetrError(f"--input-size {size[0]} {size[1]} does not fit its input '{inp.name}' {shape}",
                             path)
    elif None in fixed:
        raise QDetrError(f"no qdetr metadata and its input '{inp.name}' {shape} has no fixed height and "
                         f"width: pass --input-size H W (it needs {need})", path)
    else:
        size = [int(fixed[0]), int(fixed[1])]
    names = {o.name for o in outputs}
    recognised = any(want <= names for want in DETR_OUTPUTS)
    return {"format": None, "input_size": size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "class_names": None, "category_ids": None, "postprocess": DETR_OUTPUTS[0] <= names, "bits": None,
            "foreign": True, "outputs_recognised": recognised, "output_names": sorted(names)}
