"""Rules of attention: ``MultiheadAttention`` (float) and ``QuantMultiheadAttention`` (quantized projections,
8-bit q/k/v/softmax, optional DA), and distribution alignment.

Sequence-first [L,B,E] as the model: project, split heads, DA(q) -> Q8(q), Q8(k^T), scores * scaling
(folded into k's dequantization scale where k is quantized per tensor), softmax, Q8(attn), @ Q8(v), merge
heads, out_proj. k is quantized already transposed ([B,h,d,L]) so its DequantizeLinear feeds the MatMul
directly. The graph has no key-padding mask (the canvas is the input).
"""

from __future__ import annotations

import numpy as np

from qdetr_deploy.export.folding import _np, act_quant, weight_dq
from qdetr_deploy.export.lower.layers import matmul_bias, reduce
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.models.attention import MultiheadAttention
from qdetr_deploy.quant.align import DistributionAlignment
from qdetr_deploy.quant.modules import QuantMultiheadAttention
from qdetr_deploy.quant.quantizers import ActQuantizer

PARTS = ("query", "key", "value")


def in_proj(ctx: LowerCtx, x: str, mha: MultiheadAttention, part: int) -> str:
    """One third (q, k or v) of the packed in_proj [L,B,E] -> [L,B,E]: its input quantizer, MatMul, bias;
    nodes named ``<attn>.{query,key,value}_proj``."""
    name, suffix = ctx.name(mha), PARTS[part]
    e, sl = mha.embed_dim, slice(part * mha.embed_dim, (part + 1) * mha.embed_dim)
    if isinstance(mha, QuantMultiheadAttention):
        x = act_quant(ctx, x, getattr(mha, f"{suffix}_act"), f"{name}.{suffix}_act", axis=-1)
        codes, step, bits = mha.weight_qparams()
        w = weight_dq(ctx, _np(codes[sl]).reshape(e, e).T, _np(step[sl]), bits, f"{name}.{suffix}_proj", 1)
    else:
        w = ctx.g.const(f"{name}.{suffix}_proj.weight", _np(mha.in_proj_weight[sl]).T)
    return matmul_bias(ctx, x, w, mha.in_proj_bias[sl], f"{name}.{suffix}_proj")


def split_heads(ctx: LowerCtx, x: str, heads: str, name: str, perm: list[int], tag: str) -> str:
    """[L,B,E] -> Reshape(``heads``: [0,0,h,d]) -> Transpose(perm): [B,h,L,d] (q, v) or [B,h,d,L] (k
    transposed)."""
    g = ctx.g
    x = g.node("Reshape", [x, heads], f"{name}/{tag}/Reshape")
    return g.node("Transpose", [x], f"{name}/{tag}/Transpose", perm=perm)


def merge_heads(ctx: LowerCtx, out: str, mha: MultiheadAttention) -> str:
    """[B,h,Lq,d] -> [Lq,B,E]."""
    g, name = ctx.g, ctx.name(mha)
    out = g.node("Transpose", [out], f"{name}/merge/Transpose", perm=[2, 0, 1, 3])
    merge = g.const(f"{name}.merge_shape", np.array([0, 0, mha.embed_dim], np.int64), np.int64)
    return g.node("Reshape", [out, merge], f"{name}/merge/Reshape")


@lowers(MultiheadAttention, QuantMultiheadAttention, consumes=(ActQuantizer,))
def attention(ctx: LowerCtx, mha: MultiheadAttention, query: str, key: str, value: str) -> str:
    """query [Lq,B,E], key/value [Lk,B,E] -> [Lq,B,E] (MultiheadAttention.project / attend / merge /
    out_proj)."""
    g, name = ctx.g, ctx.name(mha)
    quant = isinstance(mha, QuantMultiheadAttention)
    qa = (lambda n: getattr(mha, n)) if quant else (lambda n: None)
    heads = g.const(f"{name}.heads_shape", np.array([0, 0, mha.num_heads, mha.head_dim], np.int64), np.int64)
    q = split_heads(ctx, in_proj(ctx, query, mha, 0), heads, name, [1, 2, 0, 3], "q")
    kt = split_heads(ctx, in_proj(ctx, key, mha, 1), heads, name, [1, 2, 3, 0], "kT")
    v = split_heads(ctx, in_proj(ctx, value, mha, 2), heads, name, [1, 2, 0, 3], "v")
    if quant and mha.norm_q is not None:
        q = lower(ctx, mha.norm_q, q)
    q = act_quant(ctx, q, qa("q_act"), f"{name}.q_act", axis=1, rank=4)
    if quant and mha.k_act.channel_dim is None:  # the scaling joins k's dequantization scale (one Mul less)
        kt = act_quant(ctx, kt, mha.k_act, f"{name}.k_act", axis=1, rank=4, layout="kT",
                       dq_gain=float(np.float32(mha.scaling)))
        scores = g.node("MatMul", [q, kt], f"{name}/scores/MatMul")
    else:
        kt = act_quant(ctx, kt, qa("k_act"), f"{name}.k_act", axis=1, rank=4, layout="kT")
        scores = g.node("MatMul", [q, kt], f"{name}/scores/MatMul")
        scores = g.node("Mul", [scores, g.const(f"{name}.scaling", np.float32(mha.scaling))],
                        f"{name}/scaling")
    attn = g.node("Softmax", [scores], f"{name}/Softmax", axis=-1)
    attn = act_quant(ctx, attn, qa("attn_act"), f"{name}.attn_act", axis=1, rank=4)
    v = act_quant(ctx, v, qa("v_act"), f"{name}.v_act", axis=1, rank=4)
    out = merge_heads(ctx, g.node("MatMul", [attn, v], f"{name}/context/MatMul"), mha)
    return lower(ctx, mha.out_proj, out)


@lowers(DistributionAlignment)
def distribution_alignment(ctx: LowerCtx, da: DistributionAlignment, q: str) -> str:
    """DA (quant/align.py), float, on q [B,h,L,d]: scale * (q - mean) / sqrt(unbiased var + eps) + bias over
    the last axis. Opset >= 17: one LayerNormalization, the unbiased variance folded into its constants
    (``var_u = var * d / (d-1)``: epsilon ``eps * (d-1) / d``, scale ``scale * sqrt((d-1) / d)``); older
    opsets spell it out."""
    g, name, d = ctx.g, ctx.name(da), da.scale.shape[-1]
    if g.opset >= 17:
        ratio = (d - 1) / d
        gamma = (_np(da.scale).reshape(-1).astype(np.float64) * np.sqrt(ratio)).astype(np.float32)
        return g.node("LayerNormalization", [q, g.const(f"{name}.scale", gamma),
                                             g.const(f"{name}.bias", _np(da.bias).reshape(-1))],
                      f"{name}/LayerNormalization", axis=-1, epsilon=float(da.eps * ratio))
    centred = g.node("Sub", [q, reduce(ctx, "ReduceMean", q, [-1], f"{name}/ReduceMean")], f"{name}/Sub")
    sq = g.node("Mul", [centred, centred], f"{name}/Square")
    var = g.node("Div", [reduce(ctx, "ReduceSum", sq, [-1], f"{name}/ReduceSum"),
                         g.const(f"{name}.dof", float(d - 1))], f"{name}/Var")
    std = g.node("Sqrt", [g.node("Add", [var, g.const(f"{name}.eps", float(da.eps))], f"{name}/AddEps")],
                 f"{name}/Sqrt")
    normed = g.node("Div", [centred, std], f"{name}/Div")
    scaled = g.node("Mul", [g.const(f"{name}.scale", _np(da.scale)), normed], f"{name}/Mul")
    return g.node("Add", [scaled, g.const(f"{name}.bias", _np(da.bias))], f"{name}/Add")
