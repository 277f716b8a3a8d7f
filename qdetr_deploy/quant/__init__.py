"""Quantization: ``QuantConfig``, LSQ+ quantizers, distribution alignment, ``quantize`` and ``calibrate``."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it; imported on first use (PEP 562), so that importing a
# torch-free submodule such as ``config`` does not import torch (the CLI's --help runs without it)
_EXPORTS = {
    "ActQParams": "quantizers",
    "ActQuantizer": "quantizers",
    "CALIBRATION_METHODS": "api",
    "DistributionAlignment": "align",
    "QuantConfig": "config",
    "QuantConv2d": "modules",
    "QuantLinear": "modules",
    "QuantMultiheadAttention": "modules",
    "act_quantizers": "api",
    "calibrate": "api",
    "fake_quant_act": "lsq",
    "fake_quant_weight": "lsq",
    "int_range": "lsq",
    "is_quantized": "api",
    "quantize": "api",
    "weight_quantized_layers": "api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
