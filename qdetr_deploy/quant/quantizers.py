"""Quantizer modules: the LSQ+ activation quantizer and the per-channel weight step of a layer.

State names follow the released Q-DETR code (QDETR_METHOD.md §6): a quantized layer owns its weight step
``<layer>.alpha`` and buffer ``<layer>.init_state``; its input quantizer is the submodule ``<layer>.act``
with parameters ``alpha``, ``zero_point`` and buffers ``init_state``, ``signed``. Every value that export
needs comes from :meth:`ActQuantizer.qparams` and :meth:`WeightQuantMixin.weight_qparams`, so export and
the fake-quant forward cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdetr_deploy.quant.lsq import (
    fake_quant_act,
    fake_quant_act_shifted,
    fake_quant_weight,
    int_range,
    lsq_grad_scale,
    positive_step,
)


@dataclass
class ActQParams:
    """What export needs of an activation quantizer (per-tensor: shapes [1]; per-channel: [C])."""

    step: Tensor
    zero_point: Tensor  # integer-valued float tensor
    qmin: int
    qmax: int
    bits: int
    signed: bool
    channel_dim: int | None  # None: per tensor


class _Observer:
    """Float statistics over calibration batches (quantizers are transparent while observing)."""

    def __init__(self, reduce_dims_fn, percentile: float | None) -> None:
        self.reduce = reduce_dims_fn
        self.percentile = percentile
        self.abs_sum = self.count = self.min = self.max = None
        self.samples: list[Tensor] = []

    def observe(self, x: Tensor) -> None:
        x = x.detach().float()
        flat = self.reduce(x)  # [C, n]
        stats = (flat.abs().sum(1), flat.shape[1], flat.amin(1), flat.amax(1))
        if self.count is None:
            self.abs_sum, self.count, self.min, self.max = stats
        else:
            self.abs_sum = self.abs_sum + stats[0]
            self.count += stats[1]
            self.min = torch.minimum(self.min, stats[2])
            self.max = torch.maximum(self.max, stats[3])
        if self.percentile is not None:
            n = flat.shape[1]
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: 1 << 15]
            self.samples.append(flat[:, idx])


class ActQuantizer(nn.Module):
    """Asymmetric LSQ+ activation quantizer: ``x_hat = (clamp(round(x/a) + z, Qn, Qp) - z) * a``.

    channel_dim: the dimension that carries channels (or heads) when per-channel, None for per tensor.
    sign_rule: "auto" decides the signed/unsigned range from the first data seen (released code), "signed"
    always uses the signed range.
    """

    def __init__(self, bits: int, num_channels: int = 1, channel_dim: int | None = None,
                 sign_rule: str = "auto") -> None:
        super().__init__()
        self.bits = bits
        self.channel_dim = channel_dim if num_channels > 1 else None
        self.sign_rule = sign_rule
        self.alpha = nn.Parameter(torch.ones(num_channels))
        self.zero_point = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("init_state", torch.zeros(1))
        self.register_buffer("signed", torch.tensor(sign_rule == "signed"))
        self.observer: _Observer | None = None
        self.fixed_zero = False  # QuantConfig.act_zero_point="zero" (set by quantize, see fix_zero_point)
        # True: round after adding the zero point, the released Q-DETR arithmetic (lsq.fake_quant_act_shifted;
        # set for the released SMCA-DETR by quant.smca); False: round(x/a) + z, as ONNX QuantizeLinear
        self.round_after_shift = False

    def fix_zero_point(self) -> None:
        """Keep the zero point at 0 (never learned) and give 8-bit codes the signed range: every such
        quantizer is a TensorRT int8 Q/DQ with zero point 0 (QuantConfig.act_zero_point="zero")."""
        self.fixed_zero = True
        self.zero_point.requires_grad_(False)
        with torch.no_grad():
            self.zero_point.zero_()
        if self.bits >= 8:
            self.sign_rule = "signed"
            self.signed.fill_(True)

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_dim is None else f"channel(dim={self.channel_dim})"
        return f"bits={self.bits}, {gran}, signed={bool(self.signed)}, initialised={bool(self.init_state)}"

    @property
    def initialised(self) -> bool:
        return bool(self.init_state.item())

    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, bool(self.signed))

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        if self.channel_dim is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def _flatten(self, x: Tensor) -> Tensor:
        """[C, n] view of x with C the channel dimension (1 row when per tensor)."""
        if self.channel_dim is None:
            return x.reshape(1, -1)
        return x.movedim(self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)

    def qparams(self) -> ActQParams:
        qn, qp = self.qrange()
        return ActQParams(positive_step(self.alpha.detach()), torch.round(self.zero_point.detach()),
                          qn, qp, self.bits, bool(self.signed), self.channel_dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if not self.initialised:
            self.init_lsq_plus(x)
        qn, qp = self.qrange()
        g = lsq_grad_scale(x.numel() // self.alpha.numel(), qp)
        fake_quant = fake_quant_act_shifted if self.round_after_shift else fake_quant_act
        return fake_quant(x, self._view(self.alpha, x), self._view(self.zero_point, x), qn, qp, g)

    # -- initialisation ------------------------------------------------------------------------------
    def start_observing(self, percentile: float | None = None) -> None:
        self.observer = _Observer(self._flatten, percentile)

    @torch.no_grad()
    def init_lsq_plus(self, x: Tensor) -> None:
        """Released-code initialisation from one batch: a = 2 mean|x| / sqrt(Qp), z = 0.1 (min x - a Qn)."""
        flat = self._flatten(x.detach().float())
        self._set_from_stats(flat.abs().mean(1), flat.amin(1), flat.amax(1), "lsq+")

    @torch.no_grad()
    def finish_observing(self, method: str) -> None:
        """Set step and zero point from the observed statistics ("lsq+", "minmax" or "percentile")."""
        obs, self.observer = self.observer, None
        if obs is None or obs.count is None:
            return  # never reached by the calibration data: keep lazy init
        lo, hi = obs.min, obs.max
        if method == "percentile":
            s = torch.cat(obs.samples, 1)
            p = obs.percentile / 100.0
            lo, hi = torch.quantile(s, 1 - p, dim=1), torch.quantile(s, p, dim=1)
        self._set_from_stats(obs.abs_sum / obs.count, lo, hi, method)

    def _set_from_stats(self, mean_abs: Tensor, lo: Tensor, hi: Tensor, method: str) -> None:
        if self.sign_rule == "auto":
            self.signed.fill_(bool(lo.min() < -1e-5))
        qn, qp = self.qrange()
        if method == "lsq+":
            alpha = 2 * mean_abs / qp**0.5
            zero = 0.1 * (lo - alpha * qn)
        else:  # minmax / percentile: the observed [lo, hi] maps onto [Qn, Qp]
            lo = torch.minimum(lo, torch.zeros_like(lo)) if not bool(self.signed) else lo
            alpha = (hi - lo).clamp_min(1e-8) / (qp - qn)
            zero = torch.round(qn - lo / alpha)
        if self.fixed_zero:  # symmetric about 0: the observed range maps onto [Qn, Qp] without an offset
            zero = torch.zeros_like(alpha)
            if method != "lsq+":
                alpha = torch.maximum(hi / qp, lo / qn if qn < 0 else torch.zeros_like(lo))
        alpha = alpha.clamp_min(1e-8)
        self.alpha.copy_(alpha.reshape(self.alpha.shape).to(self.alpha))
        self.zero_point.copy_(zero.reshape(self.zero_point.shape).to(self.zero_point))
        self.init_state.fill_(1)


class WeightQuantMixin:
    """Per-output-channel symmetric weight quantization for a layer owning ``weight``.

    Adds parameter ``alpha`` (shape [Cout, 1, ...] broadcasting against ``weight``), buffer ``init_state``
    and attribute ``w_bits``.
    """

    weight: Tensor
    alpha: nn.Parameter
    init_state: Tensor
    w_bits: int

    def _init_weight_quant(self, w_bits: int) -> None:
        self.w_bits = w_bits
        shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
        self.alpha = nn.Parameter(torch.ones(shape, device=self.weight.device))
        self.register_buffer("init_state", torch.zeros(1, device=self.weight.device))
        self.init_weight_step("lsq+")

    def weight_range(self) -> tuple[int, int]:
        return int_range(self.w_bits, True)

    @torch.no_grad()
    def init_weight_step(self, method: str = "lsq+", percentile: float = 99.99) -> None:
        """a_w = 2 mean|w| / sqrt(Qp) (LSQ+), max|w| / Qp (minmax) or the |w| percentile / Qp."""
        _, qp = self.weight_range()
        w = self.weight.detach().abs().reshape(self.weight.shape[0], -1).float()
        if method == "lsq+":
            a = 2 * w.mean(1) / qp**0.5
        elif method == "minmax":
            a = w.amax(1) / qp
        else:
            a = torch.quantile(w, percentile / 100.0, dim=1) / qp
        self.alpha.copy_(a.clamp_min(1e-8).reshape(self.alpha.shape))
        self.init_state.fill_(1)

    def quant_weight(self) -> Tensor:
        qn, qp = self.weight_range()
        g = lsq_grad_scale(self.weight[0].numel(), qp)
        return fake_quant_weight(self.weight, self.alpha, qn, qp, g)

    def weight_qparams(self) -> tuple[Tensor, Tensor, int]:
        """(integer codes as float, per-channel step [Cout], bits) of the deployed weight."""
        qn, qp = self.weight_range()
        step = positive_step(self.alpha.detach())
        codes = torch.clamp(torch.round(self.weight.detach() / step), qn, qp)
        return codes, step.reshape(-1), self.w_bits
