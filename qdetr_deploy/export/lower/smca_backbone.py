"""Rules of the released Q-DETR backbone (models/smca_backbone.py): LearnableBias, PReLU and the bottleneck
with its LearnableBias-PReLU-LearnableBias sandwiches (no ReLU anywhere).

Each conv's input quantizer sits after its sandwich (the QuantConv2d's ``act``, lowered with the conv);
block input, output, identity and the full-precision downsample path stay float. The convs' outputs go
through a batch norm into a sandwich, never straight into the next conv's quantizer, so none can take an
int32 bias (``conv_bias="int32"`` records why).
"""

from __future__ import annotations

from torch import nn

from qdetr_deploy.export.folding import _np
from qdetr_deploy.export.lower.backbone import backbone
from qdetr_deploy.export.lower.layers import NORMS
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.models.smca_backbone import LearnableBias, SMCABackbone, SMCABottleneck
from qdetr_deploy.quant.modules import QuantConv2d

lowers(SMCABackbone)(backbone)

NO_INT32 = "its output feeds a LearnableBias-PReLU sandwich, not a ReLU into the next conv's quantizer"


@lowers(LearnableBias)
def learnable_bias(ctx: LowerCtx, module: LearnableBias, x: str) -> str:
    """x [B,C,H,W] + bias [1,C,1,1]."""
    name = ctx.name(module)
    return ctx.g.node("Add", [x, ctx.g.const(f"{name}.bias", _np(module.bias))], f"{name}/Add")


@lowers(nn.PReLU)
def prelu(ctx: LowerCtx, module: nn.PReLU, x: str) -> str:
    """x if x >= 0 else slope_c * x, the slope per channel of NCHW (one shared slope: a scalar)."""
    name, slope = ctx.name(module), _np(module.weight)
    slope = slope.reshape(-1, 1, 1) if slope.size > 1 else slope.reshape(())
    return ctx.g.node("PRelu", [x, ctx.g.const(f"{name}.weight", slope)], f"{name}/PRelu")


def sandwich(ctx: LowerCtx, block: SMCABottleneck, i: int, x: str) -> str:
    """LB ``bias{i}2``(PReLU ``prelu{i}``(LB ``bias{i}1``(x)))."""
    x = lower(ctx, getattr(block, f"bias{i}1"), x)
    x = lower(ctx, getattr(block, f"prelu{i}"), x)
    return lower(ctx, getattr(block, f"bias{i}2"), x)


@lowers(SMCABottleneck, consumes=NORMS)
def smca_bottleneck(ctx: LowerCtx, block: SMCABottleneck, x: str) -> str:
    """u = bn_k(conv_k(sandwich_k(u))) for k = 1..3 from u = x; y = sandwich_0(u + identity), identity
    = x or the (float) downsample of x."""
    g, name = ctx.g, ctx.name(block)
    u = x
    for k in (1, 2, 3):
        conv = getattr(block, f"conv{k}")
        if ctx.conv_bias == "int32":
            ctx.int_convs[ctx.name(conv)] = NO_INT32 if isinstance(conv, QuantConv2d) else "float conv"
        u = lower(ctx, conv, sandwich(ctx, block, k, u), getattr(block, f"bn{k}"))
    identity = x if block.downsample is None else lower(ctx, block.downsample, x)
    return sandwich(ctx, block, 0, g.node("Add", [u, identity], f"{name}/Add"))
