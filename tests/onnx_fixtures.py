"""Small hand-built ONNX models that follow the "ONNX model" contract of docs/ARCHITECTURE.md.

They stand in for the real exporter in engine and bench tests: input ``images [B,3,H,W]``, a couple of real
ops (Conv -> Relu -> GlobalAveragePool -> Gemm heads), outputs ``pred_logits``/``pred_boxes`` or, with
``postprocess=True``, ``scores``/``labels``/``boxes`` in canvas pixels, and ``metadata_props["qdetr"]``.
``int8=True`` builds a Q/DQ variant whose layers exercise every branch of ``integer_kernel_report``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
FEATURES = 8
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class _Graph:
    """Tiny builder: collects nodes and initializers, hands out unique names."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> list[str]:
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs

    def qdq(self, x: str, name: str, scale: float = 0.05) -> str:
        """QuantizeLinear -> DequantizeLinear (int8, zero point 0) on an activation."""
        s = self.const(f"{name}_scale", np.float32(scale))
        z = self.const(f"{name}_zp", np.int8(0))
        (q,) = self.op("QuantizeLinear", [x, s, z], f"{name}_Q")
        return self.op("DequantizeLinear", [q, s, z], f"{name}_DQ")[0]

    def dq_weight(self, name: str, w: np.ndarray, axis: int = 0) -> str:
        """Per-channel symmetric int8 weight as an int8 initializer followed by DequantizeLinear."""
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=reduce_axes) / 127.0 + 1e-8).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        self.const(f"{name}_q", q)
        self.const(f"{name}_s", scale)
        self.const(f"{name}_z", np.zeros_like(scale, dtype=np.int8))
        return self.op("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], f"{name}_DQ",
                       axis=axis)[0]

    def weight(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * 0.5).astype(np.float32)


def default_metadata(*, input_size: tuple[int, int], num_classes: int, postprocess: bool, dynamic_batch: bool,
                     batch: int | None, class_names: list[str] | None, category_ids: list[int] | None,
                     bits: str) -> dict:
    return {
        "format": "qdetr-onnx/1",
        "input_size": list(input_size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "class_names": class_names or [f"class{i}" for i in range(num_classes)],
        "category_ids": category_ids,
        "num_classes": num_classes,
        "postprocess": postprocess,
        "dynamic_batch": dynamic_batch,
        "batch": None if dynamic_batch else batch,
        "bits": bits,
        "quant_config": None,
        "target": "onnxruntime",
        "source": {"path": "tests/onnx_fixtures.py", "sha256": None},
    }


def _backbone(g: _Graph, int8: bool, share_q: bool) -> str:
    """images -> [B, FEATURES] pooled features."""
    w1, w2 = g.weight(FEATURES, 3, 3, 3), g.weight(FEATURES, 3, 3, 3)
    b1 = g.const("conv1_b", np.zeros(FEATURES, np.float32))
    if not int8:
        (x,) = g.op("Conv", ["images", g.const("conv1_w", w1), b1], "conv1", pads=[1, 1, 1, 1])
    else:
        xq = g.qdq("images", "images_q")
        (c1,) = g.op("Conv", [xq, g.dq_weight("conv1_w", w1), b1], "conv1", pads=[1, 1, 1, 1])
        c1 = g.qdq(c1, "conv1_q")  # Q after -> QLinearConv
        xq2 = xq if share_q else g.qdq("images", "images_q2")
        (c2,) = g.op("Conv", [xq2, g.dq_weight("conv2_w", w2)], "conv2", pads=[1, 1, 1, 1])  # no Q after
        (x,) = g.op("Add", [c1, c2], "add_branches")
    (x,) = g.op("Relu", [x], "relu")
    (x,) = g.op("GlobalAveragePool", [x], "pool")
    return g.op("Flatten", [x], "flatten", axis=1)[0]


def _heads(g: _Graph, feats: str, num_queries: int, num_classes: int, int8: bool,
           share_q: bool) -> tuple[str, str]:
    """[B, F] -> pred_logits [B,Q,C+1], pred_boxes [B,Q,4] (sigmoid)."""
    n_logits, n_boxes = num_queries * (num_classes + 1), num_queries * 4
    wl, wb = g.weight(FEATURES, n_logits), g.weight(FEATURES, n_boxes)
    bl = g.const("cls_b", (g.rng.standard_normal(n_logits) * 0.5).astype(np.float32))
    bb = g.const("box_b", (g.rng.standard_normal((num_queries, 4)) * 0.5).astype(np.float32))
    shape_l = g.const("shape_logits", np.array([0, num_queries, num_classes + 1], np.int64))
    shape_b = g.const("shape_boxes", np.array([0, num_queries, 4], np.int64))
    if not int8:
        (logits,) = g.op("Gemm", [feats, g.const("cls_w", wl), bl], "class_embed")
        (boxes,) = g.op("Gemm", [feats, g.const("box_w", wb)], "bbox_embed")
    else:
        fq = g.qdq(feats, "feats_q")
        (mm,) = g.op("MatMul", [fq, g.dq_weight("cls_w", wl, axis=1)], "class_embed")
        mm = g.qdq(mm, "class_embed_q", scale=0.1)  # Q after -> QLinearMatMul
        (logits,) = g.op("Add", [mm, bl], "class_bias")
        fq2 = fq if share_q else g.qdq(feats, "feats_q2")
        (mb,) = g.op("MatMul", [fq2, g.dq_weight("box_w", wb, axis=1)], "bbox_embed")  # MatMulIntegerToFloat
        wf = g.const("box_float_w", g.weight(FEATURES, n_boxes) * 0.1)
        (mf,) = g.op("Gemm", [feats, wf], "bbox_float")  # float weight and activation: stays float
        (mb,) = g.op("Reshape", [mb, shape_b], "reshape_boxes_int8")  # no Add right after the MatMul
        (mf,) = g.op("Reshape", [mf, shape_b], "reshape_boxes_float")
        (boxes,) = g.op("Add", [mb, mf], "bbox_sum")
    (logits,) = g.op("Reshape", [logits, shape_l], "reshape_logits")
    if not int8:
        (boxes,) = g.op("Reshape", [boxes, shape_b], "reshape_boxes")
    (boxes,) = g.op("Add", [boxes, bb], "bbox_bias")  # rank-3 bias: no MatMul+Add -> Gemm fusion
    (boxes,) = g.op("Sigmoid", [boxes], "box_sigmoid")
    return logits, boxes


def _postprocess(g: _Graph, logits: str, boxes: str, input_size: tuple[int, int], num_classes: int):
    """softmax, drop no-object, max/argmax over classes, cxcywh -> xyxy in canvas pixels."""
    (prob,) = g.op("Softmax", [logits], "pp_softmax", axis=-1)
    starts = g.const("pp_s", np.array([0], np.int64))
    ends = g.const("pp_e", np.array([num_classes], np.int64))
    (prob,) = g.op("Slice", [prob, starts, ends, g.const("pp_axes", np.array([2], np.int64))], "pp_slice")
    (scores,) = g.op("ReduceMax", [prob], "pp_max", axes=[2], keepdims=0)
    (labels,) = g.op("ArgMax", [prob], "pp_argmax", axis=2, keepdims=0)
    cx, cy, w, h = g.op("Split", [boxes], "pp_split", n_out=4, axis=2)
    half = g.const("pp_half", np.float32(0.5))
    (hw,) = g.op("Mul", [w, half], "pp_hw")
    (hh,) = g.op("Mul", [h, half], "pp_hh")
    corners = [g.op(o, [c, d], f"pp_{n}")[0] for o, c, d, n in
               (("Sub", cx, hw, "x0"), ("Sub", cy, hh, "y0"), ("Add", cx, hw, "x1"), ("Add", cy, hh, "y1"))]
    (xyxy,) = g.op("Concat", corners, "pp_concat", axis=2)
    H, W = input_size
    (xyxy,) = g.op("Mul", [xyxy, g.const("pp_wh", np.array([W, H, W, H], np.float32))], "pp_scale")
    for src, dst in ((scores, "scores"), (labels, "labels"), (xyxy, "boxes")):
        g.op("Identity", [src], f"out_{dst}")
        g.nodes[-1].output[0] = dst


def build_fixture_model(path: str | Path, *, postprocess: bool = False, dynamic_batch: bool = False,
                        batch: int = 1, input_size: tuple[int, int] = (64, 64), num_queries: int = 10,
                        num_classes: int = 80, class_names: list[str] | None = None,
                        category_ids: list[int] | None = None, int8: bool = False, share_q: bool = False,
                        seed: int = 0, metadata: dict | None = None) -> Path:
    """Write a contract-following model to ``path`` and return it. ``metadata=None`` -> default metadata;
    ``metadata={}`` -> no "qdetr" metadata at all (a plain ONNX file). ``int8=True``: Q/DQ graph with one
    Q/DQ pair per consumer (``share_q=True``: one int8 Q shared by two layers, which ORT CPU cannot fuse)."""
    g = _Graph(seed)
    H, W = input_size
    bdim: int | str = "batch" if dynamic_batch else batch
    feats = _backbone(g, int8, share_q)
    logits, boxes = _heads(g, feats, num_queries, num_classes, int8, share_q)
    if postprocess:
        _postprocess(g, logits, boxes, input_size, num_classes)
        outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [bdim, num_queries]),
                   helper.make_tensor_value_info("labels", TensorProto.INT64, [bdim, num_queries]),
                   helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [bdim, num_queries, 4])]
    else:
        _rename_output(g, logits, "pred_logits")
        _rename_output(g, boxes, "pred_boxes")
        outputs = [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT,
                                                 [bdim, num_queries, num_classes + 1]),
                   helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, [bdim, num_queries, 4])]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [bdim, 3, H, W])]
    graph = helper.make_graph(g.nodes, "qdetr_fixture", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qdetr-tests")
    model.ir_version = 8
    if metadata is None:
        metadata = default_metadata(input_size=input_size, num_classes=num_classes, postprocess=postprocess,
                                    dynamic_batch=dynamic_batch, batch=batch, class_names=class_names,
                                    category_ids=category_ids, bits="8-8-8" if int8 else "fp32")
    if metadata:
        helper.set_model_props(model, {"qdetr": json.dumps(metadata)})
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, path)
    return path


def _rename_output(g: _Graph, old: str, new: str) -> None:
    for node in g.nodes:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]


def coco_categories(ann_file: str | Path) -> tuple[list[str], list[int]]:
    """(class_names, category_ids) sorted by category id, from a COCO annotation file."""
    cats = sorted(json.loads(Path(ann_file).read_text())["categories"], key=lambda c: c["id"])
    return [c["name"] for c in cats], [c["id"] for c in cats]
