"""Rules of DETR's post-norm transformer (models/transformer.py): the transformer, its encoder and decoder,
and their layers. Sequence-first [L,B,D] as the model; dropout is the identity at inference; the graph
has no key-padding mask (padding is part of the canvas).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers, mark_lowered_tree
from qdetr_deploy.models.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from qdetr_deploy.quant.quantizers import ActQuantizer


@lowers(Transformer)
def transformer(ctx: LowerCtx, module: Transformer, src: str, pos: str, query_embed: torch.Tensor, *,
                sequence: bool = False) -> str:
    """src [B,D,h,w] (or already the sequence [hw,B,D] when ``sequence``), pos [hw,1,D], query_embed (the
    parameter, [Q,D]) -> hs of the last decoder layer, batch first [B,Q,D] (the heads read only that one:
    no auxiliary outputs)."""
    g = ctx.g
    query = query_embed.detach()[:, None, :]  # [Q,1,D], broadcast against the batch
    query_pos = g.const("query_embed.weight", query.numpy())
    tgt = g.const(f"{ctx.name(module.decoder)}.tgt", np.zeros(query.shape, np.float32))
    if sequence:
        memory = src
    else:
        src = g.node("Reshape", [src, g.const("transformer.flatten_shape", [0, 0, -1], np.int64)],
                     "transformer/flatten")
        memory = g.node("Transpose", [src], "transformer/to_sequence", perm=[2, 0, 1])  # [hw,B,D]
    memory = lower(ctx, module.encoder, memory, pos)
    first = first_self_attention(ctx, module.decoder.layers[0], query)
    hs = lower(ctx, module.decoder, tgt, memory, pos, query_pos, first_self=first)
    return g.node("Transpose", [hs], "transformer/to_batch_first", perm=[1, 0, 2])  # [B,Q,D]


def first_self_attention(ctx: LowerCtx, layer: nn.Module, query: torch.Tensor) -> str | None:
    """The first decoder layer's self-attention block, ``norm1(tgt + self_attn(tgt + query_pos, ..., tgt))``
    with tgt = 0, depends on no input: PyTorch computes it once here and the graph holds the result, a
    [Q,1,D] constant (onnxruntime folds it in a float graph itself, but never through Q/DQ nodes). None
    when a quantizer in it is uncalibrated or observing (its rule then says so)."""
    modules = [layer.self_attn, layer.norm1]
    acts = [m for top in modules for m in top.modules() if isinstance(m, ActQuantizer)]
    if any(not a.initialised or a.observer is not None for a in acts):
        return None
    with torch.no_grad():
        zeros = torch.zeros_like(query)  # [Q,1,D]
        q = zeros + query
        out = layer.norm1(zeros + layer.self_attn(q, q, zeros))
    mark_lowered_tree(ctx, *modules)
    return ctx.g.const(f"{ctx.name(layer)}.self_attn_block", out.numpy())


@lowers(TransformerEncoder, consumes=(nn.ModuleList,))
def encoder(ctx: LowerCtx, module: TransformerEncoder, src: str, pos: str) -> str:
    """The encoder layers in turn, then ``norm`` if any: [hw,B,D] -> memory [hw,B,D]."""
    for layer in module.layers:
        src = lower(ctx, layer, src, pos)
    return src if module.norm is None else lower(ctx, module.norm, src)


@lowers(TransformerDecoder, consumes=(nn.ModuleList,))
def decoder(ctx: LowerCtx, module: TransformerDecoder, tgt: str, memory: str, pos: str,
            query_pos: str, first_self: str | None = None) -> str:
    """The decoder layers in turn; the shared ``norm`` on the last one's output only: [Q,B,D].
    ``first_self``: the first layer's self-attention block as a constant (:func:`first_self_attention`)."""
    for i, layer in enumerate(module.layers):
        tgt = lower(ctx, layer, tgt, memory, pos, query_pos, self_out=first_self if i == 0 else None)
    return lower(ctx, module.norm, tgt)


def ffn(ctx: LowerCtx, layer: nn.Module, x: str) -> str:
    """linear1 -> ReLU (``activation``, a function) -> linear2."""
    y = lower(ctx, layer.linear1, x)
    y = ctx.g.node("Relu", [y], f"{ctx.name(layer)}.activation/Relu")
    return lower(ctx, layer.linear2, y)


def add_norm(ctx: LowerCtx, x: str, y: str, norm: nn.LayerNorm, name: str) -> str:
    """norm(x + y): a residual add (node ``name``) and its LayerNorm."""
    return lower(ctx, norm, ctx.g.node("Add", [x, y], name))


@lowers(TransformerEncoderLayer, consumes=(nn.Dropout,))
def encoder_layer(ctx: LowerCtx, layer: TransformerEncoderLayer, src: str, pos: str) -> str:
    """Post-norm: self-attention on (src + pos, src + pos, src), add & norm, FFN, add & norm."""
    name = ctx.name(layer)
    q = ctx.g.node("Add", [src, pos], f"{name}/with_pos_embed")
    src = add_norm(ctx, src, lower(ctx, layer.self_attn, q, q, src), layer.norm1, f"{name}/residual1")
    return add_norm(ctx, src, ffn(ctx, layer, src), layer.norm2, f"{name}/residual2")


@lowers(TransformerDecoderLayer, consumes=(nn.Dropout,))
def decoder_layer(ctx: LowerCtx, layer: TransformerDecoderLayer, tgt: str, memory: str, pos: str,
                  query_pos: str, self_out: str | None = None) -> str:
    """Post-norm: self-attention on tgt + query_pos, cross-attention of tgt + query_pos on memory + pos,
    FFN; add & norm after each. ``self_out``: the self-attention block's output (norm1's), given."""
    g, name = ctx.g, ctx.name(layer)
    if self_out is None:
        q = g.node("Add", [tgt, query_pos], f"{name}/with_query_pos")
        tgt = add_norm(ctx, tgt, lower(ctx, layer.self_attn, q, q, tgt), layer.norm1, f"{name}/residual1")
    else:
        tgt = self_out
    q = g.node("Add", [tgt, query_pos], f"{name}/cross_query_pos")
    k = g.node("Add", [memory, pos], f"{name}/cross_key_pos")
    tgt2 = lower(ctx, layer.multihead_attn, q, k, memory)
    tgt = add_norm(ctx, tgt, tgt2, layer.norm2, f"{name}/residual2")
    return add_norm(ctx, tgt, ffn(ctx, layer, tgt), layer.norm3, f"{name}/residual3")
