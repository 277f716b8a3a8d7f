"""Conv biases on the int32 grid (``QuantConfig.conv_bias="int32"``), carried by the quantized model itself.

ONNX Runtime's QLinearConv adds an INT32 bias on the grid ``x_step * w_step`` to its integer accumulator.
After a batch norm is folded into a bias-free quantized conv, the deployed bias is the norm's shift and the
deployed weight step ``w_step * gamma/sigma`` (export/folding.py), so the grid is
``x_step * w_step * gamma/sigma`` per output channel. With this option the batch norm after such a conv
fake-quantizes its folded shift onto that grid in the forward pass (calibration, distillation, evaluation),
so the export's rounding moves nothing and the graph equals the model exactly (folding records bias deltas
of 0).

- The norm keeps upstream's class name in its state (``bn1.weight``, ...); it is re-classed in place
  (:class:`IntBiasFrozenBatchNorm2d`, :class:`IntBiasBatchNorm2d`, and the ``out_act`` variants of
  ``QuantConfig.residual_bits``) and holds its conv as ``bias_conv`` outside ``_modules`` (no new state).
- Eval mode: ``y * scale + round(shift / grid) * grid`` (the folded form, as deployed). A BatchNorm2d in
  training mode keeps its batch statistics and adds the rounding ``round(shift/grid)*grid - shift`` of the
  running-statistics fold as a constant (a straight-through estimate).
- Gradient: straight through the rounding to the shift (batch-norm weight and bias); the grid is detached,
  so the learned steps get no gradient from the bias.
- The rounding applies only while the conv's input quantizer is calibrated and per tensor and every
  ``gamma/sigma > 0`` (otherwise the export keeps the norm as a float Mul + Add and so does the model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdetr_deploy.models.backbone import FrozenBatchNorm2d, batchnorm_affine
from qdetr_deploy.quant.lsq import positive_step, round_ste
from qdetr_deploy.quant.modules import (
    QuantBatchNorm2d,
    QuantConv2d,
    QuantFrozenBatchNorm2d,
    _OutputQuantMixin,
)


def _affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) of the eval-mode norm, float32, with gradients; the arithmetic of
    ``models.backbone.batchnorm_affine`` (which detaches)."""
    eps = getattr(norm, "eps", 1e-5)
    w = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    b = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_var)
    scale = w.float() * (norm.running_var.float() + eps).rsqrt()
    return scale, b.float() - norm.running_mean.float() * scale


def bias_grid(norm: nn.Module) -> Tensor | None:
    """The int32 grid ``x_step * (w_step * gamma/sigma)`` [C] of ``norm.bias_conv``'s folded bias, or None
    where the bias is not rounded (input quantizer observing, uncalibrated or per channel; a norm scale
    <= 0). The same float32 products as the export's ``bias_scale``."""
    conv: QuantConv2d = norm.bias_conv
    act = conv.act
    if act.observer is not None or not act.initialised or act.channel_dim is not None:
        return None
    scale = _affine(norm)[0].detach()
    if not bool((scale > 0).all()):
        return None
    w_step = positive_step(conv.alpha.detach()).reshape(-1) * scale
    return positive_step(act.alpha.detach()).reshape(()) * w_step


def deployed_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale, shift) per channel, float32, detached, that a deployment folds for ``norm``: the shift on its
    int32 grid for an int-bias norm, else ``batchnorm_affine``. Export and the GPU-engine packer call it."""
    if not isinstance(norm, _IntBiasMixin):
        return batchnorm_affine(norm)
    with torch.no_grad():
        scale, shift = _affine(norm)
        grid = bias_grid(norm)
        return scale, shift if grid is None else torch.round(shift / grid) * grid


class _IntBiasMixin:
    """A batch norm whose folded shift is fake-quantized on the int32 grid of its conv (``bias_conv``)."""

    bias_conv: QuantConv2d
    training: bool

    def forward(self, x: Tensor) -> Tensor:
        grid = bias_grid(self)
        if grid is None:
            return super().forward(x)  # type: ignore[misc]
        scale, shift = _affine(self)
        bias = round_ste(shift / grid) * grid  # straight through to the shift
        if self.training and isinstance(self, nn.BatchNorm2d):  # batch statistics: add the rounding only
            return super().forward(x) + (bias - shift).detach().reshape(1, -1, 1, 1)  # type: ignore[misc]
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class IntBiasFrozenBatchNorm2d(_IntBiasMixin, FrozenBatchNorm2d):
    """FrozenBatchNorm2d after a quantized conv, its folded bias on the int32 grid."""


class IntBiasBatchNorm2d(_IntBiasMixin, nn.BatchNorm2d):
    """BatchNorm2d after a quantized conv, its folded bias on the int32 grid."""


class QuantIntBiasFrozenBatchNorm2d(_OutputQuantMixin, _IntBiasMixin, FrozenBatchNorm2d):
    """A residual-branch FrozenBatchNorm2d (quantized output) with its folded bias on the int32 grid."""


class QuantIntBiasBatchNorm2d(_OutputQuantMixin, _IntBiasMixin, nn.BatchNorm2d):
    """A residual-branch BatchNorm2d (quantized output) with its folded bias on the int32 grid."""


_INT_BIAS = {FrozenBatchNorm2d: IntBiasFrozenBatchNorm2d, nn.BatchNorm2d: IntBiasBatchNorm2d,
             QuantFrozenBatchNorm2d: QuantIntBiasFrozenBatchNorm2d, QuantBatchNorm2d: QuantIntBiasBatchNorm2d}


def quantize_bias(norm: nn.Module, conv: QuantConv2d) -> nn.Module:
    """Make ``norm`` (the batch norm right after the bias-free ``conv``) carry its folded bias on the int32
    grid, in place."""
    if type(norm) not in _INT_BIAS:
        raise TypeError(f"cannot put the bias of a {type(norm).__name__} on the int32 grid")
    if conv.bias is not None:
        raise TypeError("conv_bias='int32' needs a bias-free conv before the batch norm")
    norm.__class__ = _INT_BIAS[type(norm)]
    object.__setattr__(norm, "bias_conv", conv)  # not a submodule: no new state_dict keys
    return norm
