"""Rules of the detector: DETR itself (backbone, input_proj, transformer, heads, as ``DETR.forward``), the
MLP box head, and the post-processing of models/postprocess.py in the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from qdetr_deploy.export.folding import _np, act_quant, weight_dq
from qdetr_deploy.export.lower.layers import matmul_bias, reduce
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.models.detr import DETR, MLP
from qdetr_deploy.quant.modules import QuantConv2d


@lowers(DETR, consumes=(nn.Embedding,))
def detr(ctx: LowerCtx, model: DETR, images: str) -> tuple[str, str]:
    """images [B,3,H,W] -> (class logits [B,Q,C+1], sigmoid boxes [B,Q,4] cx,cy,w,h) of the last decoder
    layer. ``query_embed`` is a constant of the transformer's rule."""
    features, pos = lower(ctx, model.backbone, images, nxt=model.input_proj)
    proj = ctx.name(model.input_proj)
    # quantized by the backbone's last conv, or the last ResNet block's codes (QuantConfig.shared_block_input)
    pre = (getattr(model.input_proj, "shared_input", False)
           or any(r.module == f"{proj}.act" for r in ctx.g.acts))
    seq = input_proj_sequence(ctx, model.input_proj, features, pre)
    src = seq or lower(ctx, model.input_proj, features, quantized_input=pre)
    hs = lower(ctx, model.transformer, src, pos, model.query_embed.weight, sequence=seq is not None)
    logits = lower(ctx, model.class_embed, hs)
    boxes = lower(ctx, model.bbox_embed, hs)
    return logits, ctx.g.node("Sigmoid", [boxes], f"{ctx.name(model.bbox_embed)}/Sigmoid")


def input_proj_sequence(ctx: LowerCtx, proj: nn.Module, features: str, pre: bool) -> str | None:
    """The quantized 1x1 ``input_proj`` as a MatMul on the sequence for onnxruntime: features [B,C,h,w] ->
    [hw,B,D], the transformer's input (its flatten and transpose done here, on the codes). A Conv whose
    output is not quantized gets no QLinearConv: onnxruntime would run its DequantizeLinears and a float
    Conv; as DequantizeLinear -> MatMul it is a MatMulIntegerToFloat. None: keep the Conv (other targets, a
    float or per-channel-input projection)."""
    if (ctx.target != "onnxruntime" or not isinstance(proj, QuantConv2d) or proj.kernel_size != (1, 1)
            or proj.stride != (1, 1) or proj.groups != 1 or proj.padding != (0, 0)):
        return None
    g, name = ctx.g, ctx.name(proj)
    to_seq = g.const(f"{name}.flatten_shape", [0, 0, -1], np.int64)
    if pre:  # the codes of the quantizer before: move them, then dequantize next to the MatMul
        dq = next((n for n in g.nodes if features in n.output), None)
        if dq is None or dq.op_type != "DequantizeLinear" or any(a.name == "axis" for a in dq.attribute):
            return None
        codes = g.node("Reshape", [dq.input[0], to_seq], f"{name}/flatten")
        codes = g.node("Transpose", [codes], f"{name}/to_sequence", perm=[2, 0, 1])  # [hw,B,C]
        x = g.node("DequantizeLinear", [codes, *dq.input[1:]], f"{name}.act/DequantizeLinear")
        if not any(features in n.input for n in g.nodes):
            g.nodes.remove(dq)  # the Conv form's dequantization, now read by nothing
    else:
        if proj.act is None or proj.act.channel_dim is not None:
            return None
        x = g.node("Reshape", [features, to_seq], f"{name}/flatten")
        x = g.node("Transpose", [x], f"{name}/to_sequence", perm=[2, 0, 1])
        x = act_quant(ctx, x, proj.act, f"{name}.act", axis=-1, layout="seq")
    codes_w, step, bits = proj.weight_qparams()
    w = weight_dq(ctx, _np(codes_w).reshape(codes_w.shape[0], -1).T, _np(step).reshape(-1), bits, name,
                  axis=1)
    return matmul_bias(ctx, x, w, proj.bias, name)  # [hw,B,D]


@lowers(MLP, consumes=(nn.ModuleList,))
def mlp(ctx: LowerCtx, module: MLP, x: str) -> str:
    """The layers in turn with a ReLU between them (none after the last)."""
    for i, layer in enumerate(module.layers):
        x = lower(ctx, layer, x)
        if i < module.num_layers - 1:
            x = ctx.g.node("Relu", [x], f"{ctx.name(layer)}/Relu")
    return x


def postprocess(ctx: LowerCtx, model: DETR, logits: str, boxes: str, size: tuple[int, int]
                ) -> tuple[str, str, str]:
    """models/postprocess.py in the graph: softmax, drop no-object, max/argmax over classes, cxcywh ->
    xyxy in pixels of the (H, W) canvas. Returns scores [B,Q], labels [B,Q] int64, boxes [B,Q,4]."""
    g, name = ctx.g, "postprocess"
    i64 = np.int64
    prob = g.node("Softmax", [logits], f"{name}/Softmax", axis=-1)
    prob = g.node("Slice", [prob, g.const(f"{name}.start", [0], i64), g.const(f"{name}.end", [-1], i64),
                            g.const(f"{name}.axis", [-1], i64)], f"{name}/drop_no_object")
    scores = reduce(ctx, "ReduceMax", prob, [-1], f"{name}/ReduceMax", keepdims=0)
    labels = g.node("ArgMax", [prob], f"{name}/ArgMax", axis=-1, keepdims=0)
    return scores, labels, to_pixels(ctx, boxes, size, name)


def to_pixels(ctx: LowerCtx, boxes: str, size: tuple[int, int], name: str) -> str:
    """Boxes [..., 4] normalised cx,cy,w,h -> x0,y0,x1,y1 in pixels of the (H, W) canvas (box_ops)."""
    g, i64 = ctx.g, np.int64
    split = g.const(f"{name}.split", [2, 2], i64)
    cxcy, wh = g.node("Split", [boxes, split], f"{name}/Split", n_out=2, axis=-1)
    half = g.node("Mul", [wh, g.const(f"{name}.half", np.float32(0.5))], f"{name}/half_wh")
    lo = g.node("Sub", [cxcy, half], f"{name}/xy0")
    hi = g.node("Add", [cxcy, half], f"{name}/xy1")
    xyxy = g.node("Concat", [lo, hi], f"{name}/Concat", axis=-1)
    h, w = size
    scale = g.const(f"{name}.canvas_scale", np.array([w, h, w, h], np.float32))
    return g.node("Mul", [xyxy, scale], f"{name}/to_pixels")


#: post-processing in the graph by detector class: (ctx, model, logits, boxes, (H, W)) -> scores, labels,
#: boxes (xyxy pixels)
POSTPROCESS: dict[type, Callable[..., tuple[str, str, str]]] = {DETR: postprocess}
#: how the detector's logits become class probabilities: the export metadata's ``scoring`` (bench and
#: predict read it for raw outputs) and the parity check's
SCORING: dict[type, str] = {DETR: "softmax"}
