"""LSQ+ fake quantization (QDETR_METHOD.md §1), bit-exact with ONNX QuantizeLinear/DequantizeLinear.

The arithmetic lives in three functions that export, kernels and tests all call:

- :func:`int_range` - the integer range [Qn, Qp] of a b-bit signed or unsigned code;
- :func:`fake_quant_weight` - ``w_hat = clamp(round(w / a), Qn, Qp) * a`` (symmetric, per output channel);
- :func:`fake_quant_act` - ``q = clamp(round(x / a) + z, Qn, Qp)``, ``x_hat = (q - z) * a`` with integer z.

``round`` is round-half-to-even (``torch.round``, as ONNX QuantizeLinear). The steps get an LSQ gradient
scale ``g = 1 / sqrt(numel * Qp)``. Both quantizers are custom autograd functions, so that the forward value
is *exactly* the quantized value (the ``x + (r - x).detach()`` trick is off by an ulp now and then, which
would break bit-exact export) and the backward is LSQ's (Esser et al. 2020), with the in-range mask taken on
the *continuous* value ``v = x / a + z`` (clamp before round, as LSQ and the released code):

- ``d x_hat / d x = 1`` where ``Qn <= v <= Qp``, else 0 (straight-through rounding);
- ``d x_hat / d a = round(x / a) - x / a`` inside, ``Qn - z`` below, ``Qp - z`` above;
- ``d x_hat / d z = 0`` inside, ``-a`` outside (LSQ+ offset, z in code units).

Clamping after rounding (``clamp(round(v))`` under autograd) gives the same forward value but counts values
up to half a step beyond ``Qn``/``Qp`` as in range: at 2 bits about 5% of the elements, and a step gradient
1.5x too large.
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


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to ``shape`` (the inverse of broadcasting)."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return (grad.sum(dim=dims, keepdim=True) if dims else grad).reshape(shape)


def _step_grad(v: Tensor, z: Tensor | float, qn: int, qp: int) -> tuple[Tensor, Tensor]:
    """LSQ's ``d x_hat / d a`` per element and the out-of-range mask, for ``v = x / a`` and offset ``z``."""
    s = v + z
    below, above = s < qn, s > qp
    inside = torch.round(v) - v
    grad_a = torch.where(below, qn - z, torch.where(above, qp - z, inside))
    return grad_a, below | above


class _FakeQuantWeight(torch.autograd.Function):
    """``clamp(round(w / a), Qn, Qp) * a`` with LSQ's backward (mask on the continuous ``w / a``)."""

    @staticmethod
    def forward(ctx, w: Tensor, a: Tensor, qn: int, qp: int) -> Tensor:  # noqa: D102
        v = w / a
        ctx.save_for_backward(v, a)
        ctx.qrange = (qn, qp)
        return torch.clamp(torch.round(v), qn, qp) * a

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:  # noqa: D102
        v, a = ctx.saved_tensors
        grad_a, outside = _step_grad(v, 0.0, *ctx.qrange)
        return grad.masked_fill(outside, 0.0), _sum_to(grad * grad_a, a.shape), None, None


class _FakeQuantAct(torch.autograd.Function):
    """``(clamp(round(x / a) + z, Qn, Qp) - z) * a`` (integer z) with LSQ+'s backward."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, z: Tensor, qn: int, qp: int) -> Tensor:  # noqa: D102
        v = x / a
        ctx.save_for_backward(v, a, z)
        ctx.qrange = (qn, qp)
        q = torch.clamp(torch.round(v) + z, qn, qp)
        return (q - z) * a

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # noqa: D102
        v, a, z = ctx.saved_tensors
        grad_a, outside = _step_grad(v, z, *ctx.qrange)
        grad_z = torch.where(outside, -a, torch.zeros_like(a))
        return (grad.masked_fill(outside, 0.0), _sum_to(grad * grad_a, a.shape),
                _sum_to(grad * grad_z, z.shape), None, None)


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
    return _FakeQuantWeight.apply(w, a, qn, qp)


def weight_codes(w: Tensor, alpha: Tensor, qn: int, qp: int) -> Tensor:
    """Integer codes of :func:`fake_quant_weight` (as float tensor of integers)."""
    return torch.clamp(torch.round(w / positive_step(alpha)), qn, qp)


def fake_quant_act(x: Tensor, alpha: Tensor, zero_point: Tensor, qn: int, qp: int, g: float = 1.0) -> Tensor:
    """Asymmetric activation fake quantization with an integer (STE-rounded) zero point."""
    a = grad_scale(positive_step(alpha), g)
    z = round_ste(grad_scale(zero_point, g))
    return _FakeQuantAct.apply(x, a, z, qn, qp)


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
