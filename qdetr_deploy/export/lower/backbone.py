"""Rules of the backbone: the Joiner (features and the sine position embedding), the ResNet / tiny bodies
(torchvision's IntermediateLayerGetter over conv1, bn1, relu, maxpool, layer1..), and ResNet blocks.

With ``conv_bias="int32"`` (onnxruntime) a conv whose ReLU output only feeds the next quantized conv becomes
QLinearConv (:func:`~qdetr_deploy.export.folding.conv_relu_quant`); the rules that know which conv comes
next (a block, the tiny body's chain) pass it on.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.folding import act_quant, conv_relu_quant, residual_branch
from qdetr_deploy.export.lower.layers import NORMS
from qdetr_deploy.export.lower.registry import LowerCtx, lower, lowers
from qdetr_deploy.models.backbone import Backbone, Joiner, TinyBackbone, output_size
from qdetr_deploy.models.position_encoding import PositionEmbeddingSine
from qdetr_deploy.quant.modules import QuantBasicBlock, QuantBottleneck, QuantConv2d, QuantMaxPool2d
from qdetr_deploy.quant.quantizers import ActQuantizer


@lowers(Joiner)
def joiner(ctx: LowerCtx, module: Joiner, images: str, nxt: nn.Module | None = None) -> tuple[str, str]:
    """images [B,3,H,W] -> (features [B,C,h,w], position embedding [hw,1,D]). ``nxt``: the layer reading
    the features (DETR's input_proj), for conv_bias="int32"."""
    features = lower(ctx, module[0], images, nxt=nxt)
    size = output_size(module[0].body, ctx.image_size)
    if size[0] < 1 or size[1] < 1:
        raise QDetrError(f"input size {ctx.image_size[0]}x{ctx.image_size[1]} is too small for this backbone")
    return features, lower(ctx, module[1], size)


@lowers(PositionEmbeddingSine)
def position_embedding(ctx: LowerCtx, module: PositionEmbeddingSine, size: tuple[int, int]) -> str:
    """With no mask input (padding is part of the canvas) the embedding is a constant of the feature size
    (h, w): the module's own forward on an all-False mask, stored sequence-first [hw,1,D]."""
    pos = module(torch.zeros(1, *size, dtype=torch.bool))  # [1,D,h,w]
    pos = pos.flatten(2).permute(2, 0, 1).contiguous()  # [hw,1,D]
    return ctx.g.const(f"{ctx.name(module)}.pos_embed", pos.numpy())


@lowers(Backbone, TinyBackbone)
def backbone(ctx: LowerCtx, module: nn.Module, images: str, nxt: nn.Module | None = None) -> str:
    """BackboneBase: its body's returned layer (the mask is not an input of the graph)."""
    return lower(ctx, module.body, images, nxt=nxt)


@lowers(IntermediateLayerGetter, consumes=NORMS)
def body(ctx: LowerCtx, module: IntermediateLayerGetter, images: str, nxt: nn.Module | None = None) -> str:
    """conv1 (+ bn1), relu, [maxpool], layer1.. in order -> the last layer's features [B,C,h,w].

    The tiny body with conv_bias="int32" is one chain of convs each feeding only the next (the last: ``nxt``)
    (:func:`tiny_chain`)."""
    if _is_tiny(module) and ctx.conv_bias == "int32" and ctx.target == "onnxruntime":
        return tiny_chain(ctx, module, images, nxt)
    x, done = stem(ctx, module, images)
    for child_name, child in module.named_children():
        if child_name not in done:
            x = lower(ctx, child, x)
    return x


def stem(ctx: LowerCtx, body: nn.Module, images: str) -> tuple[str, tuple[str, ...]]:
    """conv1 + bn1 (-> relu -> maxpool): (output, the children lowered). With a quantized pooling output
    (QuantConfig.shared_block_input) and conv_bias="int32" the stem runs as QLinearConv whose uint8 codes
    are pooled (:func:`~qdetr_deploy.export.folding.conv_relu_quant`)."""
    name, pool = ctx.name(body), getattr(body, "maxpool", None)
    if isinstance(pool, QuantMaxPool2d):
        x, quantized = conv_relu_quant(ctx, images, body.conv1, body.bn1, f"{name}.conv1", f"{name}.bn1",
                                       pool.out_act, f"{name}.maxpool.out_act", f"{name}.relu/Relu",
                                       pool=pool)
        ctx.mark_lowered(body.conv1, body.relu)
        if quantized:
            ctx.mark_lowered(pool)
            return x, ("conv1", "bn1", "relu", "maxpool")
        return x, ("conv1", "bn1", "relu")
    if ctx.conv_bias == "int32":
        ctx.int_convs[ctx.name(body.conv1)] = "its output also feeds the float residual path of layer1.0"
    return lower(ctx, body.conv1, images, body.bn1), ("conv1", "bn1")


def _is_tiny(module: nn.Module) -> bool:
    layers = [layer for n, layer in module.named_children() if n.startswith("layer")]
    return not hasattr(module, "maxpool") and all(isinstance(layer[0], nn.Conv2d) for layer in layers)


def tiny_chain(ctx: LowerCtx, module: nn.Module, x: str, nxt: nn.Module | None) -> str:
    """TinyBackbone with conv_bias="int32": stem and layers (Conv2d, BatchNorm2d, ReLU each) as a chain in
    which each conv's ReLU output feeds only the next conv (the last one: ``nxt``, the input_proj)."""
    name = ctx.name(module)
    stages = [(module.conv1, module.bn1, f"{name}.conv1", f"{name}.bn1", f"{name}.relu/Relu")]
    stages += [(layer[0], layer[1], f"{name}.{n}.0", f"{name}.{n}.1", f"{name}.{n}.2/Relu")
               for n, layer in module.named_children() if n.startswith("layer")]
    layers = [layer for n, layer in module.named_children() if n.startswith("layer")]
    ctx.mark_lowered(module.conv1, module.relu, *(m for layer in layers for m in (layer, layer[0], layer[2])))
    nxt_name = ctx.name(nxt) if nxt is not None else ""
    quantized = False
    for i, (conv, norm, cname, nname, relu) in enumerate(stages):
        after, after_name = (stages[i + 1][0], stages[i + 1][2]) if i + 1 < len(stages) else (nxt, nxt_name)
        after_act = after.act if isinstance(after, QuantConv2d) else None
        x, quantized = conv_relu_quant(ctx, x, conv, norm, cname, nname, after_act, f"{after_name}.act", relu,
                                       quantized_input=quantized)
    return x


@lowers(BasicBlock, Bottleneck, QuantBasicBlock, QuantBottleneck,
        consumes=(nn.Conv2d, QuantConv2d, *NORMS, nn.ReLU, ActQuantizer))
def resnet_block(ctx: LowerCtx, block: nn.Module, x: str) -> str:
    """torchvision BasicBlock / Bottleneck: convs with their norms and ReLUs, the downsample, add, ReLU,
    then the block's own output quantizer if any.

    With conv_bias="int32", every conv but the last (its output only feeds the next conv) goes through
    conv_relu_quant; the last one meets the residual add: it runs as QLinearConv only when its batch norm
    quantizes the residual branch (``out_act``, QuantConfig.residual_bits), and so does a quantized
    downsample (QuantConfig.downsample_bits) whose batch norm quantizes the identity. The block's
    ``out_act`` (same option) quantizes its output after the final ReLU. Under
    QuantConfig.shared_block_input ``x`` already is the dequantized codes that conv1 and the downsample
    read (quantized by the stem's pooling or the previous block)."""
    g, name = ctx.g, ctx.name(block)
    convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]
    y, quantized = x, bool(getattr(block.conv1, "shared_input", False))
    for i, c in enumerate(convs):
        conv, norm = getattr(block, c), getattr(block, f"bn{c[-1]}")
        if i < len(convs) - 1:
            nxt = getattr(block, convs[i + 1])
            nxt_act = nxt.act if isinstance(nxt, QuantConv2d) else None
            y, quantized = conv_relu_quant(ctx, y, conv, norm, f"{name}.{c}", f"{name}.bn{c[-1]}", nxt_act,
                                           f"{name}.{convs[i + 1]}.act", f"{name}.relu{i + 1}/Relu",
                                           quantized_input=quantized)
        else:
            y = residual_branch(ctx, y, conv, norm, f"{name}.{c}", f"{name}.bn{c[-1]}", quantized)
    identity = x if block.downsample is None else downsample(ctx, block.downsample, x)
    out = g.node("Relu", [g.node("Add", [y, identity], f"{name}/Add")], f"{name}.relu/Relu")
    # the block's own output quantizer (QuantConfig.residual_bits): the next block's identity input; with
    # a quantized branch, onnxruntime fuses DQ, DQ -> Add -> Relu -> Q into QLinearAdd (zero point 0)
    return act_quant(ctx, out, getattr(block, "out_act", None), f"{name}.out_act", axis=1, rank=4,
                     feeds="Add")


def downsample(ctx: LowerCtx, module: nn.Sequential, x: str) -> str:
    """A block's downsample (conv, batch norm): float through the Sequential rule, or quantized
    (QuantConfig.downsample_bits) as a residual branch: its norm's ``out_act`` quantizes the identity."""
    conv, norm = module[0], module[1] if len(module) > 1 else None
    if not isinstance(conv, QuantConv2d) or type(norm) not in NORMS or len(module) != 2:
        return lower(ctx, module, x)
    name = ctx.name(module)
    ctx.mark_lowered(module, conv, norm)
    return residual_branch(ctx, x, conv, norm, f"{name}.0", f"{name}.1", conv.shared_input)
