"""The released Q-DETR quantizer placement for SMCA-DETR (FIXTURE.md 4.2-4.8), applied in place.

- stem conv: ``stem_bits`` weights and input (RGB) quantizer; bottleneck conv1..3: ``w_bits`` weights and
  ``a_bits`` input quantizers (after the LearnableBias-PReLU-LearnableBias sandwich); downsample convs,
  ``input_proj``, point1/2/3 and the heads stay float;
- every attention: ``attn_bits`` q/k/v/softmax-output quantizers (per head when per channel);
  self-attention ``in_proj`` / ``out_proj``: ``w_bits`` weights only, no input quantizer; cross-attention
  projections stay float; DA (``norm_q``) in decoder self-attention (``QuantConfig.da``);
- FFN ``linear1`` / ``linear2``: ``w_bits`` weights and ``a_bits`` input quantizers.
Activation quantizers round after adding the zero point, as released (``ActQuantizer.round_after_shift``).
Per-channel steps sit on the intended axis: channels (conv dim 1, linear last dim) and heads (dim 1).
"""

from __future__ import annotations

import fnmatch

from torch import nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models.smca_attention import SMCAMultiheadAttention
from qdetr_deploy.models.smca_backbone import SMCABottleneck
from qdetr_deploy.models.smca_detr import SMCADETR
from qdetr_deploy.quant.align import DistributionAlignment
from qdetr_deploy.quant.config import QuantConfig
from qdetr_deploy.quant.modules import QuantConv2d, QuantLinear, WeightQuantLinear
from qdetr_deploy.quant.quantizers import ActQuantizer


def quantize_smca(model: SMCADETR, config: QuantConfig) -> SMCADETR:
    """Swap the layers of a float SMCA-DETR for the released placement's quantized ones, in place."""
    if config.residual_bits is not None:
        raise QDetrError("residual_bits is for torchvision ResNet blocks; SMCA-DETR has no such option")
    if config.conv_bias != "float":
        raise QDetrError("conv_bias int32 is for ResNet and tiny backbones; SMCA-DETR has no such option")
    per_ch = config.act_granularity == "channel"
    sign = config.act_sign

    def fp(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in config.fp_modules)

    body = model.backbone[0].body
    if not fp("backbone.0.body.conv1"):
        QuantConv2d.from_float(body.conv1, config.stem_bits, config.stem_bits, per_ch, "signed")
    for name, module in model.named_modules():
        if isinstance(module, SMCABottleneck) and not fp(name):
            for conv in (module.conv1, module.conv2, module.conv3):
                QuantConv2d.from_float(conv, config.w_bits, config.a_bits, per_ch, sign)
        elif isinstance(module, SMCAMultiheadAttention) and not fp(name):
            _quantize_attention(module, name, config, per_ch)
        elif name.endswith((".linear1", ".linear2")) and isinstance(module, nn.Linear) and not fp(name):
            QuantLinear.from_float(module, config.w_bits, config.a_bits, per_ch, sign)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.round_after_shift = True
            if config.act_zero_point == "zero":
                m.fix_zero_point()
    model.quant_config = config
    return model


def _quantize_attention(attn: SMCAMultiheadAttention, name: str, config: QuantConfig, per_ch: bool) -> None:
    dev = attn.in_proj.weight.device
    heads = attn.num_heads if per_ch else 1
    for slot in ("q_act", "k_act", "v_act", "attn_act"):  # [B,h,L,d]: heads on dim 1
        setattr(attn, slot, ActQuantizer(config.attn_bits, heads, 1, config.act_sign).to(dev))
    cross = name.endswith("multihead_attn")
    if not cross:  # released: self-attention projections quantize their weights only
        WeightQuantLinear.from_float(attn.in_proj, config.w_bits)
        WeightQuantLinear.from_float(attn.out_proj, config.w_bits)
    if ".decoder." in name and config.da_on("cross" if cross else "self"):
        attn.norm_q = DistributionAlignment(attn.head_dim).to(dev)
