"""Quantization: ``QuantConfig``, LSQ+ quantizers, distribution alignment, ``quantize`` and ``calibrate``."""

from qdetr_deploy.quant.align import DistributionAlignment
from qdetr_deploy.quant.api import (
    CALIBRATION_METHODS,
    act_quantizers,
    calibrate,
    is_quantized,
    quantize,
    weight_quantized_layers,
)
from qdetr_deploy.quant.config import QuantConfig
from qdetr_deploy.quant.lsq import fake_quant_act, fake_quant_weight, int_range
from qdetr_deploy.quant.modules import QuantConv2d, QuantLinear, QuantMultiheadAttention
from qdetr_deploy.quant.quantizers import ActQParams, ActQuantizer

__all__ = [
    "CALIBRATION_METHODS",
    "ActQParams",
    "ActQuantizer",
    "DistributionAlignment",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantMultiheadAttention",
    "act_quantizers",
    "calibrate",
    "fake_quant_act",
    "fake_quant_weight",
    "int_range",
    "is_quantized",
    "quantize",
    "weight_quantized_layers",
]
