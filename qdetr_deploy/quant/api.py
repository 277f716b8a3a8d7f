"""``quantize(model, config)``: swap a DETR's layers for quantized ones in place; ``calibrate`` sets steps.

Which layer gets what (QDETR_METHOD.md §1): the stem conv at ``stem_bits``; other backbone convs, the
transformer FFN linears and the attention projections at ``w_bits``/``a_bits``; q, k, v and the softmax
output at ``attn_bits``; layers matching ``config.fp_modules`` (downsample convs, input_proj, heads) stay
float, as do LayerNorm, softmax and residual adds (``config.residual_bits``: the residual branch of every
ResNet block whose last conv is quantized gets per-tensor quantizers on its last batch norm's output and
on its own output: both inputs of the next residual add; ``config.downsample_bits``: the downsample convs
quantized, their batch norm's output too under ``residual_bits``; ``config.input_proj_bits``: DETR's
input_proj quantized; ``config.shared_block_input``: each block's
first conv and downsample read the block input's codes, quantized once by the block before it or by the
stem's max pooling; ``config.conv_bias="int32"``: the batch norm after every bias-free quantized conv rounds
its folded bias onto the int32 grid, quant/int_bias.py).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models.attention import MultiheadAttention
from qdetr_deploy.models.backbone import FrozenBatchNorm2d
from qdetr_deploy.models.smca_detr import SMCADETR
from qdetr_deploy.quant.config import QuantConfig
from qdetr_deploy.quant.int_bias import quantize_bias
from qdetr_deploy.quant.modules import (
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    quantize_output,
    share_input_quantizer,
)
from qdetr_deploy.quant.quantizers import ActQuantizer, WeightQuantMixin
from qdetr_deploy.quant.smca import quantize_smca

CALIBRATION_METHODS = ("lsq+", "minmax", "percentile")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, ActQuantizer) for m in model.modules())


def _is_fp(name: str, config: QuantConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in config.fp_modules)


def _attention_kind(name: str) -> str:
    """'self' / 'cross' for decoder attention, 'encoder' otherwise."""
    if ".decoder." in f".{name}":
        return "cross" if name.endswith("multihead_attn") else "self"
    return "encoder"


def quantize(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the layers of a float DETR with quantized ones, in place; returns ``model``.

    Weight steps are initialised from the weights (LSQ+); activation steps on the first data they see,
    or by :func:`calibrate`. The config is kept as ``model.quant_config``.
    """
    if is_quantized(model):
        raise QDetrError("model is already quantized")
    if isinstance(model, SMCADETR):
        return quantize_smca(model, config)
    per_ch = config.act_granularity == "channel"
    sign = config.act_sign
    stem_done = False
    for name, module in list(model.named_modules()):
        if config.downsample_bits is not None and _is_downsample_conv(name, module):
            bits = config.downsample_bits
            QuantConv2d.from_float(module, bits, bits, per_ch, sign)
            continue
        if config.input_proj_bits is not None and name == "input_proj" and type(module) is nn.Conv2d:
            bits = config.input_proj_bits
            QuantConv2d.from_float(module, bits, bits, per_ch, sign)
            continue
        if not name or _is_fp(name, config) or isinstance(module, ActQuantizer):
            continue
        if isinstance(module, MultiheadAttention):
            kind = _attention_kind(name)
            da = kind != "encoder" and config.da_on(kind)
            QuantMultiheadAttention.from_float(module, config.w_bits, config.a_bits, config.attn_bits,
                                               per_ch, sign, da)
        elif isinstance(module, nn.Conv2d) and not isinstance(module, QuantConv2d):
            stem = not stem_done and module.in_channels == 3
            stem_done = stem_done or stem
            w, a = (config.stem_bits, config.stem_bits) if stem else (config.w_bits, config.a_bits)
            QuantConv2d.from_float(module, w, a, per_ch, "signed" if stem else sign)
        elif isinstance(module, nn.Linear) and not isinstance(module, QuantLinear):
            if name.startswith("transformer.") and not name.endswith("out_proj"):
                QuantLinear.from_float(module, config.w_bits, config.a_bits, per_ch, sign)
    if config.residual_bits is not None:
        for block in list(residual_blocks(model)):
            last = "3" if hasattr(block, "conv3") else "2"
            if isinstance(getattr(block, f"conv{last}"), QuantConv2d):
                quantize_output(getattr(block, f"bn{last}"), config.residual_bits, sign)
                quantize_output(block, config.residual_bits, sign)
            if block.downsample is not None and isinstance(block.downsample[0], QuantConv2d):
                quantize_output(block.downsample[1], config.residual_bits, sign)
    if config.shared_block_input:
        last = share_block_inputs(model, config.residual_bits, sign)
        if last is not None and isinstance(getattr(model, "input_proj", None), QuantConv2d):
            share_input_quantizer(model.input_proj, last)  # it reads the last block's codes
    if config.conv_bias == "int32":
        for conv, norm in list(conv_norm_pairs(model)):
            if isinstance(conv, QuantConv2d) and conv.bias is None and conv.act.channel_dim is None:
                quantize_bias(norm, conv)
    if config.act_zero_point == "zero":
        for _, q in act_quantizers(model):
            q.fix_zero_point()
    model.quant_config = config
    return model


def _is_downsample_conv(name: str, module: nn.Module) -> bool:
    """A ResNet block's downsample 1x1 conv (``layerN.M.downsample.0``), not yet quantized."""
    return (type(module) is nn.Conv2d and name.endswith(".downsample.0")
            and fnmatch.fnmatchcase(name, "backbone.*.layer*.*.downsample.0"))


def share_block_inputs(model: nn.Module, bits: int, sign: str) -> ActQuantizer | None:
    """``QuantConfig.shared_block_input``: in every ResNet body, the stem's max pooling gets a ``bits``-bit
    output quantizer, and each block's first conv (and quantized downsample) reads the codes of the quantizer
    that made its input (the pooling's, then the previous block's ``out_act``) instead of its own. Blocks
    after one without an output quantizer keep their own input quantizers. Returns the quantizer of the
    last body's output (None if it has none)."""
    device = next(model.parameters()).device
    source = None
    for body in model.modules():
        if not (isinstance(getattr(body, "maxpool", None), nn.MaxPool2d) and hasattr(body, "layer1")):
            continue
        source = quantize_output(body.maxpool, bits, sign, device).out_act
        for block in (b for n, layer in body.named_children() if n.startswith("layer") for b in layer):
            if source is None or not isinstance(block.conv1, QuantConv2d):
                source = None
                break
            share_input_quantizer(block.conv1, source)
            if block.downsample is not None and isinstance(block.downsample[0], QuantConv2d):
                share_input_quantizer(block.downsample[0], source)
            source = getattr(block, "out_act", None)
    return source


def residual_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """torchvision ResNet blocks (BasicBlock: conv1, conv2; Bottleneck: conv1..conv3) of ``model``."""
    for m in model.modules():
        if hasattr(m, "downsample") and hasattr(m, "conv2") and hasattr(m, "bn2"):
            yield m


def conv_norm_pairs(model: nn.Module) -> Iterator[tuple[nn.Conv2d, nn.Module]]:
    """(conv, the batch norm right after it) of ``model``: siblings named ``convN``/``bnN`` (ResNet, stem)
    or consecutive in a Sequential (the tiny backbone's ``layerN.0``/``layerN.1``, downsample ``0``/``1``)."""
    for parent in model.modules():
        children = dict(parent.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.Conv2d):
                continue
            if name.startswith("conv"):
                norm = children.get(f"bn{name[4:]}")
            else:
                norm = children.get(str(int(name) + 1)) if name.isdigit() else None
            if isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                yield child, norm


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def weight_quantized_layers(model: nn.Module) -> Iterator[tuple[str, WeightQuantMixin]]:
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantMixin):
            yield name, m


def _as_inputs(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    images, mask = batch[0], batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    return images, mask


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: str = "lsq+", percentile: float = 99.99,
              progress: bool = True) -> nn.Module:
    """Initialise every step and zero point of a quantized model from calibration batches.

    ``batches`` yields image tensors [B,3,H,W] or (images, mask[, targets]) tuples. Activation statistics
    are collected on the float model (quantizers transparent) over all batches, then each quantizer is set
    by ``method``: "lsq+" (released-code rule on mean|x| and min x), "minmax" or "percentile". Weight steps
    follow the same method.
    """
    if method not in CALIBRATION_METHODS:
        raise QDetrError(f"calibration method {method!r} is not one of {list(CALIBRATION_METHODS)}")
    if not is_quantized(model):
        raise QDetrError("calibrate needs a quantized model: call quantize(model, config) first")
    was_training = model.training
    model.eval()
    quantizers = [q for _, q in act_quantizers(model)]
    for q in quantizers:
        q.start_observing(percentile if method == "percentile" else None)
    seen = 0
    try:
        for batch in tqdm(batches, desc=f"calibrate ({method})", disable=not progress, unit="batch"):
            images, mask = _as_inputs(batch)
            model(images, mask)
            seen += 1
    finally:
        for q in quantizers:
            q.finish_observing(method) if seen else setattr(q, "observer", None)
    if seen == 0:
        raise QDetrError("no calibration batches: the calibration image set is empty")
    for _, layer in weight_quantized_layers(model):
        layer.init_weight_step(method, percentile)
    model.train(was_training)
    return model
