"""Rules of the released Q-DETR SMCA-DETR (models/smca_*.py): attention with an additive bias, the encoder and
SMCA decoder layers, the Gaussian log-prior, the transformer and the detector, and its sigmoid top-k
post-processing.

No mask input: the canvas is the image, so the unpadded size that scales the reference point
(``targets['size']`` in the released code, FIXTURE.md 4.7) is the canvas size, and the reference logits
(layer 0's ``point1`` on ``query_embed`` alone) are constants that ONNX Runtime folds. The Gaussian grid is
the feature map's cells (a constant [HW,2]).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qdetr_deploy.export.folding import _np, act_quant, weight_dq
from qdetr_deploy.export.lower.attention import PARTS, merge_heads, split_heads
from qdetr_deploy.export.lower.heads import POSTPROCESS, SCORING, to_pixels
from qdetr_deploy.export.lower.layers import linear, linear_as, matmul_bias
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.export.lower.transformer import add_norm, ffn
from qdetr_deploy.models.backbone import output_size
from qdetr_deploy.models.smca_attention import SMCAMultiheadAttention
from qdetr_deploy.models.smca_detr import SMCADETR
from qdetr_deploy.models.smca_transformer import (
    REF_STRIDE,
    GaussianPrior,
    SMCADecoder,
    SMCADecoderLayer,
    SMCAEncoderLayer,
    SMCATransformer,
    token_grid,
)
from qdetr_deploy.quant.modules import WeightQuantLinear
from qdetr_deploy.quant.quantizers import ActQuantizer, WeightQuantMixin

I64 = np.int64


lowers(WeightQuantLinear)(linear)


@lowers(nn.Identity)
def identity(ctx: LowerCtx, module: nn.Identity, x: str) -> str:
    return x


def _in_proj(ctx: LowerCtx, x: str, attn: SMCAMultiheadAttention, part: int) -> str:
    """Rows part*E:(part+1)*E of ``in_proj`` on x [L,B,E] (weights quantized or float, float input)."""
    name, e = ctx.name(attn), attn.embed_dim
    sl, proj = slice(part * e, (part + 1) * e), attn.in_proj
    if isinstance(proj, WeightQuantMixin):
        codes, step, bits = proj.weight_qparams()
        w = weight_dq(ctx, _np(codes[sl]).T, _np(step[sl]), bits, f"{name}.{PARTS[part]}_proj", 1,
                      weight_only_gemm=True)  # float input (TensorRT: INT4 blocks where it allows)
    else:
        w = ctx.g.const(f"{name}.{PARTS[part]}_proj.weight", _np(proj.weight[sl]).T)
    return matmul_bias(ctx, x, w, proj.bias[sl], f"{name}.{PARTS[part]}_proj")


def _act(ctx: LowerCtx, slot: nn.Module, x: str, name: str, layout: str = "same") -> str:
    """An attention quantizer slot on [B,h,L,d] (heads on axis 1): an ActQuantizer, or an nn.Identity."""
    if isinstance(slot, nn.Identity):
        return x
    return act_quant(ctx, x, slot, name, axis=1, rank=4, layout=layout)


@lowers(SMCAMultiheadAttention, consumes=(nn.Linear, WeightQuantLinear, nn.Identity, ActQuantizer))
def smca_attention(ctx: LowerCtx, attn: SMCAMultiheadAttention, query: str, key: str, value: str,
                   attn_bias: str | None = None) -> str:
    """query [Lq,B,E], key/value [Lk,B,E] -> [Lq,B,E]: q, k, v from slices of ``in_proj``; q_act(norm_q(q)),
    k_act(k^T); (q k^T) * scaling + attn_bias [B,h,Lq,Lk]; attn_act(softmax); @ v_act(v); ``out_proj``."""
    g, name = ctx.g, ctx.name(attn)
    heads = g.const(f"{name}.heads_shape", np.array([0, 0, attn.num_heads, attn.head_dim], I64), I64)
    q = split_heads(ctx, _in_proj(ctx, query, attn, 0), heads, name, [1, 2, 0, 3], "q")
    kt = split_heads(ctx, _in_proj(ctx, key, attn, 1), heads, name, [1, 2, 3, 0], "kT")
    v = split_heads(ctx, _in_proj(ctx, value, attn, 2), heads, name, [1, 2, 0, 3], "v")
    if not isinstance(attn.norm_q, nn.Identity):
        q = lower(ctx, attn.norm_q, q)
    q = _act(ctx, attn.q_act, q, f"{name}.q_act")
    kt = _act(ctx, attn.k_act, kt, f"{name}.k_act", layout="kT")
    scores = g.node("MatMul", [q, kt], f"{name}/scores/MatMul")
    scores = g.node("Mul", [scores, g.const(f"{name}.scaling", np.float32(attn.scaling))], f"{name}/scaling")
    if attn_bias is not None:
        scores = g.node("Add", [scores, attn_bias], f"{name}/attn_bias")
    p = _act(ctx, attn.attn_act, g.node("Softmax", [scores], f"{name}/Softmax", axis=-1), f"{name}.attn_act")
    v = _act(ctx, attn.v_act, v, f"{name}.v_act")
    out = merge_heads(ctx, g.node("MatMul", [p, v], f"{name}/context/MatMul"), attn)
    return linear_as(ctx, out, attn.out_proj, ctx.name(attn.out_proj))


@lowers(SMCAEncoderLayer, consumes=(nn.Dropout,))
def smca_encoder_layer(ctx: LowerCtx, layer: SMCAEncoderLayer, src: str, pos: str) -> str:
    """src = norm1(src + self_attn(src + pos, src + pos, src)); src = norm2(src + FFN(src))."""
    name = ctx.name(layer)
    q = ctx.g.node("Add", [src, pos], f"{name}/with_pos_embed")
    src = add_norm(ctx, src, lower(ctx, layer.self_attn, q, q, src), layer.norm1, f"{name}/residual1")
    return add_norm(ctx, src, ffn(ctx, layer, src), layer.norm2, f"{name}/residual2")


@lowers(GaussianPrior)
def gaussian_prior(ctx: LowerCtx, prior: GaussianPrior, ref: str, offset: str, scale_sqrt: str,
                   grid: str) -> str:
    """ref [Nq,B,2], offset and scale_sqrt [Nq,B,2h], grid [HW,2] -> G [B,h,Nq,HW]
    = -| sx (Px - gx)^2 + sy (Py - gy)^2 | / smooth, (sx, sy) = scale_sqrt^2, P = ref + offset."""
    g, name, h = ctx.g, ctx.name(prior), prior.nheads
    per_head = g.const(f"{name}.head_shape", np.array([0, 0, h, 2], I64), I64)
    ref = g.node("Unsqueeze", [ref, g.const(f"{name}.axis2", [2], I64)], f"{name}/ref/Unsqueeze")
    centre = g.node("Add", [ref, g.node("Reshape", [offset, per_head], f"{name}/offset/Reshape")],
                    f"{name}/centre")  # [Nq,B,h,2]
    centre = g.node("Unsqueeze", [centre, g.const(f"{name}.axis3", [3], I64)], f"{name}/centre/Unsqueeze")
    diff = g.node("Sub", [centre, grid], f"{name}/diff")  # [Nq,B,h,HW,2]
    scale = g.node("Mul", [scale_sqrt, scale_sqrt], f"{name}/scale")
    scale = g.node("Reshape", [scale, g.const(f"{name}.scale_shape", np.array([0, 0, h, 1, 2], I64), I64)],
                   f"{name}/scale/Reshape")
    dist = g.node("Mul", [scale, g.node("Mul", [diff, diff], f"{name}/square")], f"{name}/dist")
    total = g.node("ReduceSum", [dist, g.axes(f"{name}.axes", [-1])], f"{name}/ReduceSum", keepdims=0)
    neg = g.node("Neg", [g.node("Abs", [total], f"{name}/Abs")], f"{name}/Neg")
    out = g.node("Div", [neg, g.const(f"{name}.smooth", np.float32(prior.smooth))], f"{name}/smooth")
    return g.node("Transpose", [out], f"{name}/Transpose", perm=[1, 2, 0, 3])  # [B,h,Nq,HW]


@lowers(SMCADecoderLayer, consumes=(nn.Dropout,))
def smca_decoder_layer(ctx: LowerCtx, layer: SMCADecoderLayer, tgt: str, memory: str, pos: str,
                       query_pos: str, grid: str, ref: str | None) -> tuple[str, str | None, str]:
    """tgt [Nq,B,D], memory and pos [HW,B,D] -> (tgt, r (layer 0: point1's reference logits), ref)."""
    g, name = ctx.g, ctx.name(layer)
    q = g.node("Add", [tgt, query_pos], f"{name}/with_query_pos")
    o = lower(ctx, layer.norm4, q)
    offset = lower(ctx, layer.point2, o)  # [Nq,B,2h]
    tgt = add_norm(ctx, tgt, lower(ctx, layer.self_attn, q, q, tgt), layer.norm1, f"{name}/residual1")
    r = None
    if ref is None:
        r = lower(ctx, layer.point1, o)  # [Nq,B,2]
        wh = np.array(ctx.image_size[::-1], np.float32) / np.float32(REF_STRIDE)  # canvas (W, H) / 32
        ref = g.node("Mul", [g.node("Sigmoid", [r], f"{name}/reference/Sigmoid"),
                             g.const(f"{name}.reference_scale", wh)], f"{name}/reference")
    bias = lower(ctx, layer.prior, ref, offset, lower(ctx, layer.point3, o), grid)
    q = g.node("Add", [tgt, query_pos], f"{name}/cross_query_pos")
    k = g.node("Add", [memory, pos], f"{name}/cross_key_pos")
    tgt = add_norm(ctx, tgt, lower(ctx, layer.multihead_attn, q, k, memory, attn_bias=bias), layer.norm2,
                   f"{name}/residual2")
    return add_norm(ctx, tgt, ffn(ctx, layer, tgt), layer.norm3, f"{name}/residual3"), r, ref


@lowers(SMCADecoder, consumes=(nn.ModuleList,))
def smca_decoder(ctx: LowerCtx, module: SMCADecoder, tgt: str, memory: str, pos: str, query_pos: str,
                 grid: str) -> tuple[str, str]:
    """The layers in turn (layer 0's reference reused by the others) -> (norm(last tgt) [Nq,B,D], r)."""
    ref = r0 = None
    for layer in module.layers:
        tgt, r, ref = lower(ctx, layer, tgt, memory, pos, query_pos, grid, ref)
        r0 = r if r is not None else r0
    return lower(ctx, module.norm, tgt), r0


@lowers(SMCATransformer, consumes=(nn.Module, nn.ModuleList))
def smca_transformer(ctx: LowerCtx, module: SMCATransformer, src: str, pos: str, query_embed: torch.Tensor,
                     size: tuple[int, int]) -> tuple[str, str]:
    """src [B,D,h,w], pos [hw,1,D], query_embed [Nq,2D] (query_pos | initial tgt), size (h, w) -> hs of the
    last decoder layer [B,Nq,D] and the reference logits r [1,Nq,2]."""
    g, d = ctx.g, module.d_model
    qe = query_embed.detach()[:, None, :]  # [Nq,1,2D]
    query_pos = g.const("query_embed.query_pos", qe[..., :d].numpy())
    tgt = g.const("query_embed.tgt", qe[..., d:].numpy())
    flat = g.const("transformer.flatten_shape", [0, 0, -1], I64)
    src = g.node("Reshape", [src, flat], "transformer/flatten")
    memory = g.node("Transpose", [src], "transformer/to_sequence", perm=[2, 0, 1])  # [hw,B,D]
    for layer in module.encoder.layers:
        memory = lower(ctx, layer, memory, pos)
    grid = g.const(f"{ctx.name(module.decoder)}.grid", token_grid(*size, torch.zeros(())).numpy())
    hs, r = lower(ctx, module.decoder, tgt, memory, pos, query_pos, grid)
    hs = g.node("Transpose", [hs], "transformer/to_batch_first", perm=[1, 0, 2])  # [B,Nq,D]
    return hs, g.node("Transpose", [r], "transformer/reference_to_batch_first", perm=[1, 0, 2])


@lowers(SMCADETR, consumes=(nn.Embedding,))
def smca_detr(ctx: LowerCtx, model: SMCADETR, images: str) -> tuple[str, str]:
    """images [B,3,H,W] -> (logits [B,Nq,C+1], boxes [B,Nq,4] = sigmoid(bbox_embed(hs) + [r, 0])) of the
    last decoder layer."""
    g = ctx.g
    features, pos = lower(ctx, model.backbone, images)
    src = lower(ctx, model.input_proj, features)
    size = output_size(model.backbone[0].body, ctx.image_size)
    hs, r = lower(ctx, model.transformer, src, pos, model.query_embed.weight, size)
    logits = lower(ctx, model.class_embed, hs)
    box = lower(ctx, model.bbox_embed, hs)
    r = g.node("Pad", [r, g.const("reference.pads", [0, 0, 0, 0, 0, 2], I64)], "reference/Pad")  # [1,Nq,4]
    box = g.node("Add", [box, r], "bbox_embed/add_reference")
    return logits, g.node("Sigmoid", [box], "bbox_embed/Sigmoid")


def sigmoid_topk(ctx: LowerCtx, model: SMCADETR, logits: str, boxes: str, size: tuple[int, int]
                 ) -> tuple[str, str, str]:
    """models/postprocess.py ``sigmoid_topk`` in the graph: sigmoid over every slot, top-k (sorted) of the
    flattened [Q*C] scores, label = index % C, the box of query index // C as xyxy in canvas pixels.
    k = Q, the number of queries (the released code's). Returns scores [B,k], labels [B,k] int64, boxes
    [B,k,4]."""
    g, name = ctx.g, "postprocess"
    c, k = model.class_embed.out_features, model.num_queries
    prob = g.node("Sigmoid", [logits], f"{name}/Sigmoid")
    prob = g.node("Reshape", [prob, g.const(f"{name}.flat_shape", [0, -1], I64)], f"{name}/flatten")
    scores, index = g.node("TopK", [prob, g.const(f"{name}.k", [k], I64)], f"{name}/TopK", n_out=2, axis=-1,
                           largest=1, sorted=1)
    classes = g.const(f"{name}.num_classes", np.array(c, I64), I64)
    labels = g.node("Mod", [index, classes], f"{name}/labels")
    query = g.node("Div", [index, classes], f"{name}/query")
    query = g.node("Unsqueeze", [query, g.const(f"{name}.last", [-1], I64)], f"{name}/query/Unsqueeze")
    picked = g.node("GatherND", [boxes, query], f"{name}/GatherND", batch_dims=1)  # [B,k,4]
    ctx.topk_index = index
    return scores, labels, to_pixels(ctx, picked, size, name)


POSTPROCESS[SMCADETR] = sigmoid_topk
SCORING[SMCADETR] = "sigmoid"
