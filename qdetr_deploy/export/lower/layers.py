"""Rules of the plain layers: convolution (with the batch norm after it folded), linear, LayerNorm, ReLU,
max pooling, and ``nn.Sequential`` (its children in order, each conv taking the batch norm that follows).

The numeric rules (Q/DQ planning, weight containers, batch-norm folding, int32 biases) are
:mod:`qdetr_deploy.export.folding`'s; these rules only say which of them a module kind uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qdetr_deploy.export.folding import _np, act_quant, conv_norm, max_pool_node, weight_dq
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.models.backbone import FrozenBatchNorm2d
from qdetr_deploy.quant.int_bias import (
    IntBiasBatchNorm2d,
    IntBiasFrozenBatchNorm2d,
    QuantIntBiasBatchNorm2d,
    QuantIntBiasFrozenBatchNorm2d,
)
from qdetr_deploy.quant.modules import (
    QuantBatchNorm2d,
    QuantConv2d,
    QuantFrozenBatchNorm2d,
    QuantLinear,
    QuantMaxPool2d,
)
from qdetr_deploy.quant.quantizers import ActQuantizer, WeightQuantMixin

#: batch norms folded into the conv before them; the int-bias ones (QuantConfig.conv_bias="int32") carry
#: their shift on the int32 grid already (folding.norm_affine reads it through quant.int_bias)
NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d, QuantBatchNorm2d, QuantFrozenBatchNorm2d, IntBiasBatchNorm2d,
         IntBiasFrozenBatchNorm2d, QuantIntBiasBatchNorm2d, QuantIntBiasFrozenBatchNorm2d)


@lowers(nn.Conv2d, QuantConv2d, consumes=(ActQuantizer,))
def conv(ctx: LowerCtx, module: nn.Conv2d, x: str, norm: nn.Module | None = None, *,
         quantized_input: bool = False) -> str:
    """Conv2d [B,Cin,H,W] -> [B,Cout,h,w], quantized or float, with ``norm`` (the batch norm after it)
    folded in (:func:`~qdetr_deploy.export.folding.conv_norm`)."""
    return conv_norm(ctx, x, module, norm, ctx.name(module), quantized_input=quantized_input)


@lowers(nn.Sequential, consumes=(*NORMS, ActQuantizer))
def sequential(ctx: LowerCtx, module: nn.Sequential, x: str) -> str:
    """Children in order; a batch norm right after a conv is folded into it, then its output quantizer
    (``out_act``, a quantized downsample's identity) if any."""
    children = list(module)
    i = 0
    while i < len(children):
        child = children[i]
        norm = children[i + 1] if i + 1 < len(children) and type(children[i + 1]) in NORMS else None
        if isinstance(child, nn.Conv2d):
            x = lower(ctx, child, x, norm)
            if getattr(norm, "out_act", None) is not None:
                x = act_quant(ctx, x, norm.out_act, f"{ctx.name(norm)}.out_act", axis=1, rank=4, feeds="Add")
            i += 2 if norm is not None else 1
            continue
        x = lower(ctx, child, x)
        i += 1
    return x


@lowers(nn.ReLU)
def relu(ctx: LowerCtx, module: nn.ReLU, x: str) -> str:
    return ctx.g.node("Relu", [x], f"{ctx.name(module)}/Relu")


@lowers(nn.MaxPool2d)
def max_pool(ctx: LowerCtx, module: nn.MaxPool2d, x: str) -> str:
    return max_pool_node(ctx.g, x, module, f"{ctx.name(module)}/MaxPool")


@lowers(QuantMaxPool2d, consumes=(ActQuantizer,))
def quant_max_pool(ctx: LowerCtx, module: QuantMaxPool2d, x: str) -> str:
    """The stem's pooling with its output quantizer (QuantConfig.shared_block_input) on a float input; the
    backbone's body rule pools the codes instead where the stem runs as QLinearConv."""
    name = ctx.name(module)
    y = max_pool_node(ctx.g, x, module, f"{name}/MaxPool")
    return act_quant(ctx, y, module.out_act, f"{name}.out_act", axis=1, rank=4, feeds="Conv")


@lowers(nn.Linear, QuantLinear, consumes=(ActQuantizer,))
def linear(ctx: LowerCtx, module: nn.Linear, x: str) -> str:
    """Linear on [..., K]: MatMul with a [K,N] weight, then Add of a [1,N] bias."""
    return linear_as(ctx, x, module, ctx.name(module))


def linear_as(ctx: LowerCtx, x: str, lin: nn.Linear, name: str) -> str:
    """:func:`linear` with nodes named ``name``."""
    g = ctx.g
    if isinstance(lin, WeightQuantMixin):  # QuantLinear: with its input quantizer ``act``
        act = getattr(lin, "act", None)
        x = act_quant(ctx, x, act, f"{name}.act", axis=-1)
        codes, step, bits = lin.weight_qparams()
        w = weight_dq(ctx, _np(codes).T, _np(step), bits, name, axis=1, weight_only_gemm=act is None)
    else:
        w = g.const(f"{name}.weight", _np(lin.weight).T)
    return matmul_bias(ctx, x, w, lin.bias, name)


def matmul_bias(ctx: LowerCtx, x: str, w: str, bias: torch.Tensor | None, name: str) -> str:
    """MatMul with weight ``w`` [K,N], then the bias as a [1,N] initializer (a 1-D bias lets onnxruntime fuse
    MatMul+Add into a float Gemm before its Q/DQ fusion)."""
    y = ctx.g.node("MatMul", [x, w], f"{name}/MatMul")
    if bias is None:
        return y
    return ctx.g.node("Add", [y, ctx.g.const(f"{name}.bias", _np(bias).reshape(1, -1))], f"{name}/Add")


@lowers(nn.LayerNorm)
def layer_norm(ctx: LowerCtx, module: nn.LayerNorm, x: str) -> str:
    """LayerNorm over the last axis, float (nothing quantized around it).

    onnxruntime target: on the input flattened to 2-D [N, D] and reshaped back (the shape of ``x``, a
    constant that onnxruntime folds for a static input). The same arithmetic; it keeps onnxruntime from
    fusing the residual Add before it into SkipLayerNormalization (3-D inputs only), whose CPU kernel is 4-5x
    slower than an Add and a LayerNormalization at DETR's sizes (docs/BENCHMARKS.md)."""
    g, name = ctx.g, ctx.name(module)
    y = x
    if ctx.target == "onnxruntime":
        flat = g.const(f"{name}.flat_shape", np.array([-1, module.weight.shape[-1]], np.int64), np.int64)
        y = g.node("Reshape", [x, flat], f"{name}/flatten")
    y = g.node("LayerNormalization", [y, g.const(f"{name}.weight", _np(module.weight)),
                                      g.const(f"{name}.bias", _np(module.bias))],
               f"{name}/LayerNormalization", axis=-1, epsilon=float(module.eps))
    if ctx.target == "onnxruntime":
        y = g.node("Reshape", [y, g.node("Shape", [x], f"{name}/Shape")], f"{name}/unflatten")
    return y


def reduce(ctx: LowerCtx, op: str, x: str, axes: list[int], name: str, keepdims: int = 1) -> str:
    """Reduce* with axes as an input (opset 18+, ReduceSum 13+) or an attribute (older opsets)."""
    if ctx.g.opset >= 18 or (op == "ReduceSum" and ctx.g.opset >= 13):
        return ctx.g.node(op, [x, ctx.g.axes(f"{name}.axes", axes)], name, keepdims=keepdims)
    return ctx.g.node(op, [x], name, axes=axes, keepdims=keepdims)
