"""LSQ+ fake quantization (QDETR_METHOD.md §1), bit-exact with ONNX QuantizeLinear/DequantizeLinear.

The arithmetic lives in three functions that export, kernels and tests all call:

- :func:`int_range` - the integer range [Qn, Qp] of a b-bit signed or unsigned code;
- :func:`fake_quant_weight` - ``w_hat = clamp(round(w / a), Qn, Qp) * a`` (symmetric, per output channel);
- :func:`fake_quant_act` - ``q = clamp(round(x / a) + z, Qn, Qp)``, ``x_hat = (q - z) * a`` with integer z.

``round`` is round-half-to-even (``torch.round``, as ONNX QuantizeLinear). Rounding uses a straight-through
estimator and the steps an LSQ gradient scale ``g = 1 / sqrt(numel * Qp)``; both are custom autograd
functions so that the forward value is *exactly* the quantized value (the ``x + (r - x).detach()`` trick is
off by an ulp now and then, which would break bit-exact export).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.packing import int_range  # the one integer-range rule, shared with the kernels

__all__ = ["act_codes", "fake_quant_act", "fake_quant_act_shifted", "fake_quant_weight", "grad_scale",
           "int_range", "lsq_grad_scale", "positive_step", "round_ste", "weight_codes"]


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.scale, None


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; gradient passes straight through."""
    return _RoundSTE.apply(x)


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` (LSQ)."""
    return _GradScale.apply(x, scale)


def lsq_grad_scale(numel: int, qp: int) -> float:
    """LSQ gradient scale g = 1 / sqrt(numel * Qp)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qp, 1))


def positive_step(alpha: Tensor) -> Tensor:
    """The step actually used: |alpha| floored at 1e-8, so a step driven through zero stays valid."""
    return alpha.abs().clamp_min(1e-8)


def fake_quant_weight(w: Tensor, alpha: Tensor, qn: int, qp: int, g: float = 1.0) -> Tensor:
    """Symmetric per-channel weight fake quantization; ``alpha`` broadcasts against ``w``."""
    a = grad_scale(positive_step(alpha), g)
    return torch.clamp(round_ste(w / a), qn, qp) * a


def weight_codes(w: Tensor, alpha: Tensor, qn: int, qp: int) -> Tensor:
    """Integer codes of :func:`fake_quant_weight` (as float tensor of integers)."""
    return torch.clamp(torch.round(w / positive_step(alpha)), qn, qp)


def fake_quant_act(x: Tensor, alpha: Tensor, zero_point: Tensor, qn: int, qp: int, g: float = 1.0) -> Tensor:
    """Asymmetric activation fake quantization with an integer (STE-rounded) zero point."""
    a = grad_scale(positive_step(alpha), g)
    z = round_ste(grad_scale(zero_point, g))
    q = torch.clamp(round_ste(x / a) + z, qn, qp)
    return (q - z) * a


def fake_quant_act_shifted(x: Tensor, alpha: Tensor, zero_point: Tensor, qn: int, qp: int,
                           g: float = 1.0) -> Tensor:
    """The released Q-DETR arithmetic: ``q = round(clamp(x/a + z, Qn, Qp))``, ``x_hat = (q - z) * a``.

    Equal to :func:`fake_quant_act` except at exact ties x/a = k + 1/2 with an odd z (round half to even
    before or after the shift) and for float rounding of the sum x/a + z; the released SMCA-DETR
    (``qdetr_deploy.quant.smca``) uses it so that its float64 forward is bit-exact with the released code.
    """
    a = grad_scale(positive_step(alpha), g)
    z = round_ste(grad_scale(zero_point, g))
    q = round_ste(torch.clamp(x / a + z, qn, qp))
    return (q - z) * a


def act_codes(x: Tensor, alpha: Tensor, zero_point: Tensor, qn: int, qp: int) -> Tensor:
    """Integer codes of :func:`fake_quant_act` (float tensor of integers in [qn, qp])."""
    return torch.clamp(torch.round(x / positive_step(alpha)) + torch.round(zero_point), qn, qp)
