"""The one place for the int4 storage convention (kernels, ONNX export and engines all call these).

Convention (the ONNX ``INT4``/``UINT4`` and TensorRT one):

- two 4-bit codes per byte, along the LAST axis: element ``2i`` in bits 0-3 (low nibble), element
  ``2i+1`` in bits 4-7 (high nibble);
- signed codes are two's complement nibbles (``-8..7``), unsigned codes plain nibbles (``0..15``);
- an odd last dimension ``K`` is padded with a zero nibble, so a packed row has ``ceil(K/2)`` bytes.

Weights of a linear layer ``[N, K]`` pack to ``[N, ceil(K/2)]`` (per output channel ``n``, K-contiguous),
which is the GEMM's B operand (``col`` layout for ``mma``). ONNX packs a whole INT4 tensor as one flat
sequence (rows are not padded): for an initializer use ``pack_int4_np(codes.reshape(-1))``, which equals
the row-wise packing whenever ``K`` is even.

The integer epilogue of an asymmetric activation (zero point ``z``) times a symmetric weight:
``sum_k (xq[m,k] - z) * w[n,k] = sum_k xq[m,k] * w[n,k] - z * sum_k w[n,k]``; the last term is
:func:`zero_point_correction`, precomputed once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PackedLinear",
    "int_range",
    "pack_int4",
    "pack_int4_np",
    "packed_len",
    "quantize_weight",
    "unpack_int4",
    "unpack_int4_np",
    "zero_point_correction",
]


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)``: signed ``-2^(b-1)..2^(b-1)-1``, unsigned ``0..2^b-1``."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def packed_len(k: int) -> int:
    """Bytes that hold ``k`` int4 codes: ``ceil(k / 2)``."""
    return (k + 1) // 2


def pack_int4(codes: Tensor) -> Tensor:
    """Pack int4 codes ``[..., K]`` (integer dtype, -8..7 or 0..15) to uint8 ``[..., ceil(K/2)]``.

    Low nibble first; an odd ``K`` gets a zero high nibble in the last byte. Values are taken modulo 16
    (two's complement), so signed and unsigned codes pack the same way; range checks are the caller's.
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4 needs integer codes, got {codes.dtype}")
    k = codes.shape[-1]
    c = codes.to(torch.int16) & 0xF
    if k % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    lo, hi = c[..., 0::2], c[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, k: int, signed: bool = True) -> Tensor:
    """Unpack uint8 ``[..., ceil(k/2)]`` to int8 codes ``[..., k]`` (signed: -8..7, unsigned: 0..15)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 needs uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_len(k):
        raise ValueError(f"packed last dim {packed.shape[-1]} does not hold k={k} codes")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    if signed:
        lo, hi = lo - ((lo & 0x8) << 1), hi - ((hi & 0x8) << 1)
    out = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :k]
    return out.to(torch.int8).contiguous()


def pack_int4_np(codes: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`pack_int4` (no torch): integer ``[..., K]`` -> uint8 ``[..., ceil(K/2)]``."""
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"pack_int4_np needs integer codes, got {codes.dtype}")
    c = codes.astype(np.int16) & 0xF
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros(c.shape[:-1] + (1,), np.int16)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4_np(packed: np.ndarray, k: int, signed: bool = True) -> np.ndarray:
    """NumPy twin of :func:`unpack_int4`: uint8 ``[..., ceil(k/2)]`` -> int8 ``[..., k]``."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"unpack_int4_np needs uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_len(k):
        raise ValueError(f"packed last dim {packed.shape[-1]} does not hold k={k} codes")
    p = packed.astype(np.int16)
    lo, hi = p & 0xF, p >> 4
    if signed:
        lo, hi = lo - ((lo & 0x8) << 1), hi - ((hi & 0x8) << 1)
    out = np.stack((lo, hi), axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :k]
    return np.ascontiguousarray(out.astype(np.int8))


def zero_point_correction(w_codes: Tensor, z_act: int) -> Tensor:
    """``z_act * sum_k w[n, k]`` as int32 ``[N]`` for weight codes ``[N, K]`` (subtracted from the acc)."""
    return (w_codes.to(torch.int64).sum(dim=-1) * int(z_act)).to(torch.int32)


def quantize_weight(weight: Tensor, w_step: Tensor | float, bits: int = 4) -> Tensor:
    """Per-output-channel symmetric codes int8 ``[N, K]``: ``clamp(round_half_even(w / step), qmin, qmax)``.

    ``w_step`` is a float or ``[N]``; the division is a true float32 division (as ONNX QuantizeLinear).
    """
    w = weight.detach().to(torch.float32)
    step = torch.as_tensor(w_step, dtype=torch.float32, device=w.device)
    if step.dim() == 1:
        step = step[:, None]
    qmin, qmax = int_range(bits, signed=True)
    return torch.clamp(torch.round(w / step), qmin, qmax).to(torch.int8)


@dataclass
class PackedLinear:
    """A linear layer's int4 weights ready for the GEMM kernels.

    - ``packed``: uint8 ``[N, ceil(K/2)]`` (see the module docstring for the nibble order)
    - ``k``: the number of input features ``K``
    - ``w_step``: float32 ``[N]`` weight step per output channel
    - ``bias``: float32 ``[N]`` or None
    - ``zcorr``: int32 ``[N]`` = ``act_zero_point * sum_k w[n, k]``
    """

    packed: Tensor
    k: int
    w_step: Tensor
    bias: Tensor | None
    zcorr: Tensor

    @property
    def n(self) -> int:
        """Output features ``N``."""
        return int(self.packed.shape[0])

    @classmethod
    def from_float_weight(
        cls,
        weight: Tensor,
        w_step: Tensor | float,
        act_zero_point: int,
        bias: Tensor | None = None,
        bits: int = 4,
    ) -> PackedLinear:
        """Quantize float ``weight [N, K]`` with ``w_step`` (scalar or ``[N]``), pack it, precompute zcorr."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
        if bits > 4:
            raise ValueError(f"int4 packing holds at most 4 bits, got bits={bits}")
        n, k = weight.shape
        codes = quantize_weight(weight, w_step, bits)
        step = torch.as_tensor(w_step, dtype=torch.float32, device=weight.device).expand(n).contiguous()
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        return cls(pack_int4(codes), int(k), step, b, zero_point_correction(codes, act_zero_point))

    def codes(self) -> Tensor:
        """The signed weight codes int8 ``[N, K]``."""
        return unpack_int4(self.packed, self.k, signed=True)

    def to(self, device: torch.device | str) -> PackedLinear:
        """A copy with every tensor on ``device``."""
        bias = None if self.bias is None else self.bias.to(device)
        return PackedLinear(
            self.packed.to(device), self.k, self.w_step.to(device), bias, self.zcorr.to(device)
        )
