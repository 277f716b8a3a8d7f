"""Rules of the detector: DETR itself (backbone, input_proj, transformer, heads, as ``DETR.forward``), the
MLP box head, and the post-processing of models/postprocess.py in the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from qdetr_deploy.export.lower.layers import reduce
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.models.detr import DETR, MLP


@lowers(DETR, consumes=(nn.Embedding,))
def detr(ctx: LowerCtx, model: DETR, images: str) -> tuple[str, str]:
    """images [B,3,H,W] -> (class logits [B,Q,C+1], sigmoid boxes [B,Q,4] cx,cy,w,h) of the last decoder
    layer. ``query_embed`` is a constant of the transformer's rule."""
    features, pos = lower(ctx, model.backbone, images, nxt=model.input_proj)
    proj = ctx.name(model.input_proj)
    # quantized by the backbone's last conv, or the last ResNet block's codes (QuantConfig.shared_block_input)
    pre = (getattr(model.input_proj, "shared_input", False)
           or any(r.module == f"{proj}.act" for r in ctx.g.acts))
    src = lower(ctx, model.input_proj, features, quantized_input=pre)
    hs = lower(ctx, model.transformer, src, pos, model.query_embed.weight)
    logits = lower(ctx, model.class_embed, hs)
    boxes = lower(ctx, model.bbox_embed, hs)
    return logits, ctx.g.node("Sigmoid", [boxes], f"{ctx.name(model.bbox_embed)}/Sigmoid")


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
