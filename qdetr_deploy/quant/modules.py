"""Quantized layers that replace float ones in place (see :func:`qdetr_deploy.quant.quantize`).

- :class:`QuantConv2d`, :class:`QuantLinear`: b-bit per-channel weights (``alpha``) and a b-bit input
  quantizer (``act``).
- :class:`WeightQuantLinear`: b-bit per-channel weights, float input (SMCA self-attention projections).
- :class:`QuantMultiheadAttention`: b-bit ``in_proj_weight`` (step ``in_proj_alpha``) with input quantizers
  ``query_act``, ``key_act``, ``value_act``; 8-bit ``q_act``, ``k_act``, ``v_act`` and ``attn_act`` (softmax
  output) inside attention; optional DA ``norm_q`` before ``q_act``. ``out_proj`` becomes a QuantLinear.
  Order (released code): q = DA(q) -> Q8(q); k = Q8(k); A = softmax((q k^T) * scaling); A = Q8(A);
  v = Q8(v); out = A v.
- :class:`QuantFrozenBatchNorm2d`, :class:`QuantBatchNorm2d`: a batch norm whose output is quantized
  (``out_act``): the residual branch of a ResNet block under ``QuantConfig.residual_bits``;
  :class:`QuantBasicBlock`, :class:`QuantBottleneck`: a ResNet block whose output (after its final ReLU)
  is quantized (``out_act``), the identity input of the next block's add; :class:`QuantMaxPool2d`: the
  stem's pooling with a quantized output (``QuantConfig.shared_block_input``). Upstream names stay
  (``bn2.weight``, ...); the quantizers add ``bn2.out_act.*`` and ``layer1.0.out_act.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qdetr_deploy.models.attention import MultiheadAttention
from qdetr_deploy.models.backbone import FrozenBatchNorm2d
from qdetr_deploy.quant.align import DistributionAlignment
from qdetr_deploy.quant.quantizers import ActQuantizer, WeightQuantMixin


class QuantConv2d(WeightQuantMixin, nn.Conv2d):
    """Conv2d with LSQ+ weight (per output channel) and input (NCHW, channel dim 1) quantization.

    ``act`` is the input quantizer: a submodule of its own, or (``QuantConfig.shared_block_input``,
    :func:`share_input_quantizer`) the quantizer of the module that made the input, which has quantized it
    already (``shared_input``: then the forward does not apply it again; export and the int32 bias grid
    read its step all the same).
    """

    shared_input: bool = False

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, per_channel_act: bool,
                   sign_rule: str) -> QuantConv2d:
        conv.__class__ = cls
        conv._init_weight_quant(w_bits)
        channels = conv.in_channels if per_channel_act else 1
        conv.act = ActQuantizer(a_bits, channels, 1, sign_rule).to(conv.weight.device)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.shared_input else self.act(x)
        return self._conv_forward(x, self.quant_weight(), self.bias)


def share_input_quantizer(conv: QuantConv2d, quantizer: ActQuantizer) -> QuantConv2d:
    """Make ``conv`` read the codes of ``quantizer`` (owned by the module that makes ``conv``'s input)
    instead of quantizing its input itself: its own ``act`` submodule goes (no state of its own), ``act``
    names ``quantizer`` outside ``_modules`` (one owner in the state dict), in place."""
    conv._modules.pop("act", None)
    object.__setattr__(conv, "act", quantizer)
    conv.shared_input = True
    return conv


class QuantLinear(WeightQuantMixin, nn.Linear):
    """Linear with LSQ+ weight (per output channel) and input (channels last) quantization."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, per_channel_act: bool,
                   sign_rule: str) -> QuantLinear:
        linear.__class__ = cls
        linear._init_weight_quant(w_bits)
        channels = linear.in_features if per_channel_act else 1
        linear.act = ActQuantizer(a_bits, channels, -1, sign_rule).to(linear.weight.device)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act(x), self.quant_weight(), self.bias)


class WeightQuantLinear(WeightQuantMixin, nn.Linear):
    """Linear with LSQ+ per-output-channel weights and a full-precision input (SMCA self-attention
    ``in_proj`` / ``out_proj`` as released: weights quantized, no input quantizer)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int) -> WeightQuantLinear:
        linear.__class__ = cls
        linear._init_weight_quant(w_bits)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quant_weight(), self.bias)


class QuantMultiheadAttention(WeightQuantMixin, MultiheadAttention):
    """MultiheadAttention with quantized projections, quantized q/k/v/softmax and optional DA."""

    @property
    def weight(self) -> Tensor:  # WeightQuantMixin quantizes ``weight``: here the packed in_proj
        return self.in_proj_weight

    @classmethod
    def from_float(cls, mha: MultiheadAttention, w_bits: int, a_bits: int, attn_bits: int,
                   per_channel_act: bool, sign_rule: str, da: bool) -> QuantMultiheadAttention:
        mha.__class__ = cls
        mha._init_in_proj_quant(w_bits)
        e, h = mha.embed_dim, mha.num_heads
        dev = mha.in_proj_weight.device
        in_ch, heads = (e, h) if per_channel_act else (1, 1)
        for name in ("query_act", "key_act", "value_act"):
            setattr(mha, name, ActQuantizer(a_bits, in_ch, -1, sign_rule).to(dev))
        for name in ("q_act", "k_act", "v_act", "attn_act"):  # [B, h, L, d]: heads on dim 1
            setattr(mha, name, ActQuantizer(attn_bits, heads, 1, sign_rule).to(dev))
        mha.norm_q = DistributionAlignment(mha.head_dim).to(dev) if da else None
        QuantLinear.from_float(mha.out_proj, w_bits, a_bits, per_channel_act, sign_rule)
        return mha

    def _init_in_proj_quant(self, w_bits: int) -> None:
        self.w_bits = w_bits
        self.in_proj_alpha = nn.Parameter(torch.ones(self.in_proj_weight.shape[0], 1,
                                                     device=self.in_proj_weight.device))
        self.register_buffer("in_proj_init_state", torch.zeros(1, device=self.in_proj_weight.device))
        self.init_weight_step("lsq+")

    # WeightQuantMixin works on ``alpha`` / ``init_state``: point them at the in_proj names.
    @property
    def alpha(self) -> nn.Parameter:  # type: ignore[override]
        return self.in_proj_alpha

    @property
    def init_state(self) -> Tensor:  # type: ignore[override]
        return self.in_proj_init_state

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w, b, e = self.quant_weight(), self.in_proj_bias, self.embed_dim
        q = F.linear(self.query_act(query), w[:e], b[:e])
        k = F.linear(self.key_act(key), w[e : 2 * e], b[e : 2 * e])
        v = F.linear(self.value_act(value), w[2 * e :], b[2 * e :])
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if self.norm_q is not None:
            q = self.norm_q(q)
        q, k = self.q_act(q), self.k_act(k)
        scores = (q @ k.transpose(-2, -1)) * self.scaling  # [B, h, Lq, Lk]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = self.attn_act(scores.softmax(dim=-1))
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        return attn @ self.v_act(v)  # [B, h, Lq, d]


class _OutputQuantMixin:
    """A layer followed by its own activation quantizer ``out_act`` (per tensor)."""

    out_act: ActQuantizer

    def forward(self, x: Tensor) -> Tensor:
        return self.out_act(super().forward(x))  # type: ignore[misc]


class QuantFrozenBatchNorm2d(_OutputQuantMixin, FrozenBatchNorm2d):
    """FrozenBatchNorm2d with a quantized output (a ResNet block's residual branch)."""


class QuantBatchNorm2d(_OutputQuantMixin, nn.BatchNorm2d):
    """BatchNorm2d with a quantized output (a ResNet block's residual branch)."""


class QuantBasicBlock(_OutputQuantMixin, BasicBlock):
    """torchvision BasicBlock with a quantized output (after its final ReLU)."""


class QuantBottleneck(_OutputQuantMixin, Bottleneck):
    """torchvision Bottleneck with a quantized output (after its final ReLU)."""


class QuantMaxPool2d(_OutputQuantMixin, nn.MaxPool2d):
    """The ResNet stem's max pooling with a quantized output: the first block's input
    (``QuantConfig.shared_block_input``). Max pooling commutes with a quantizer (both are monotone), so the
    deployed graph pools the stem's codes."""


_OUTPUT_QUANT = {FrozenBatchNorm2d: QuantFrozenBatchNorm2d, nn.BatchNorm2d: QuantBatchNorm2d,
                 BasicBlock: QuantBasicBlock, Bottleneck: QuantBottleneck, nn.MaxPool2d: QuantMaxPool2d}


def quantize_output(module: nn.Module, bits: int, sign_rule: str,
                    device: torch.device | None = None) -> nn.Module:
    """Give a batch norm, a ResNet block or a max pooling a ``bits``-bit per-tensor output quantizer
    ``out_act``, in place (``device``: where the quantizer lives, default the module's buffers')."""
    if type(module) not in _OUTPUT_QUANT:
        raise TypeError(f"cannot quantize the output of a {type(module).__name__}")
    device = device or next(iter(module.buffers())).device
    module.__class__ = _OUTPUT_QUANT[type(module)]
    module.out_act = ActQuantizer(bits, 1, None, sign_rule).to(device)
    return module
