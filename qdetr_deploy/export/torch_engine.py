"""``build_torch_engine``: a quantized DETR checkpoint -> a ``.qdtorch`` engine that runs our integer kernels.

This is the packing side; the runtime is ``qdetr_deploy.engines.torch_gpu``. What each layer becomes:

- QuantConv2d / QuantLinear / the q, k, v projections and ``out_proj`` of QuantMultiheadAttention with
  <= 4-bit weights and a per-tensor activation quantizer -> :class:`IntConv2d` / :class:`IntLinear`:
  activation codes by ``qdetr::quantize_act`` (an unsigned 8-bit quantizer is stored shifted by -128, see
  ``kernels/quantize_act.py``), weights packed int4 per output channel with their steps and the zero-point
  correction, then ``qdetr::w4a8_linear`` (activation bits > 4), ``qdetr::w4a4_linear`` (<= 4 bits,
  activations packed two per byte) or ``qdetr::w4_conv2d`` (NHWC: the layout changes by views at each
  conv, so consecutive convs stay channels-last in memory). A BatchNorm right after such a conv is folded
  into the epilogue (``w_step * g``, ``bias * g + b`` with ``g = gamma/sigma``; any sign works, as the
  epilogue scales the integer result and no code depends on it).
- What the kernels cannot run stays float fake-quant, with the exact LSQ+ arithmetic in float32
  (:class:`FakeQuantLayer`): 8-bit weights (the stem), per-channel activation steps, zero points outside
  int8, conv geometry other than square kernel/stride/padding. Each such layer is listed, with the
  reason, in the metadata (``engine.fake_quant_layers``); ``strict=True`` refuses them instead.
- Weight-quantized linears with float inputs (the released SMCA-DETR's self-attention ``in_proj`` /
  ``out_proj``): float linears on their fake-quant weights (the kernels take integer activation codes).
- q/k/v/softmax quantizers inside attention, and any quantizer left in a module: float fake-quant
  (:class:`FakeQuantAct`), as the model; DA runs in float32 (:class:`Float32`: its per-token variance would
  overflow float16).
- Everything else is float: float16 on CUDA, float32 on CPU (steps and the GEMM epilogue stay float32).

The model is wrapped to the ONNX contract (docs/ARCHITECTURE.md: ``images [B,3,H,W]`` -> ``scores``,
``labels``, ``boxes`` in canvas pixels via ``models.postprocess``; an SMCA-DETR by
``export.torch_engine_smca``, sigmoid top-k), exported with ``torch.export`` on the
device it will run on, and saved with ``torch.export.save`` with the metadata JSON as the extra file
``qdetr.json`` (the ONNX metadata plus ``engine``: device, GPU name, compute capability, dtype).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import kernels.ops  # noqa: F401  (registers torch.ops.qdetr.*)
from kernels.conv_int4 import conv_weight_to_gemm
from kernels.packing import pack_int4, zero_point_correction
from qdetr_deploy.checkpoints import Checkpoint, load_checkpoint
from qdetr_deploy.deploy_format import (
    METADATA_FILE,
    TORCH_FORMAT,
    class_names_of,
    default_size,
    model_metadata,
    read_onnx_metadata,
    sha256_file,
)
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.torch_engine_smca import SMCAEngineModule
from qdetr_deploy.io import atomic_path, check_output_path
from qdetr_deploy.models.attention import MultiheadAttention
from qdetr_deploy.models.backbone import FrozenBatchNorm2d, output_size
from qdetr_deploy.models.postprocess import postprocess
from qdetr_deploy.models.smca_detr import SMCADETR
from qdetr_deploy.quant.align import DistributionAlignment
from qdetr_deploy.quant.api import is_quantized
from qdetr_deploy.quant.config import QuantConfig
from qdetr_deploy.quant.int_bias import _IntBiasMixin, deployed_affine
from qdetr_deploy.quant.modules import QuantConv2d, QuantLinear, QuantMultiheadAttention, WeightQuantLinear
from qdetr_deploy.quant.quantizers import ActQuantizer

SUFFIX = ".qdtorch"
DEFAULT_MAX_BATCH = 64
OUTPUTS = {True: ["scores", "labels", "boxes"], False: ["pred_logits", "pred_boxes"]}
_BN = (nn.BatchNorm2d, FrozenBatchNorm2d)


# --- activation parameters -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ActSpec:
    """A per-tensor activation quantizer as the kernels take it: int8 codes (shifted), integer zero point."""

    step: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


def act_spec(act: ActQuantizer) -> ActSpec | str:
    """The kernel form of ``act``, or the reason (a string) why the integer kernels cannot take it."""
    p = act.qparams()
    if p.channel_dim is not None:
        return "per-channel activation steps and zero points (the kernels take one of each per tensor)"
    shift = -128 if p.qmax > 127 else 0  # unsigned 8-bit codes 0..255 are stored as -128..127
    z = int(p.zero_point.reshape(-1)[0]) + shift
    if not -128 <= z <= 127:
        return f"zero point {z - shift} does not fit int8 codes"
    return ActSpec(float(p.step.reshape(-1)[0]), z, p.qmin + shift, p.qmax + shift, p.bits)


# --- engine modules ------------------------------------------------------------------------------------

class FakeQuantAct(nn.Module):
    """A frozen ActQuantizer: ``(clamp(round(x / a) + z, qmin, qmax) - z) * a`` in float32, cast back
    (codes ``round(clamp(x / a + z, qmin, qmax))`` when it rounds after the shift: released SMCA-DETR)."""

    def __init__(self, act: ActQuantizer) -> None:
        super().__init__()
        p = act.qparams()
        self.register_buffer("step", p.step.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", p.zero_point.detach().float().reshape(-1).clone())
        self.qmin, self.qmax, self.channel_dim = p.qmin, p.qmax, p.channel_dim
        self.round_after_shift = bool(act.round_after_shift)

    def forward(self, x: Tensor) -> Tensor:
        shape: list[int] = []  # per tensor: scalars
        if self.channel_dim is not None:  # per channel: broadcast along channel_dim
            shape = [1] * x.dim()
            shape[self.channel_dim] = -1
        step, z = self.step.reshape(shape), self.zero_point.reshape(shape)
        if self.round_after_shift:
            q = torch.round(torch.clamp(x.float() / step + z, self.qmin, self.qmax))
        else:
            q = torch.clamp(torch.round(x.float() / step) + z, self.qmin, self.qmax)
        return ((q - z) * step).to(x.dtype)


class Float32(nn.Module):
    """Runs ``inner`` in float32 whatever the engine dtype (DA: its per-token variance overflows float16)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.float()).to(x.dtype)


class FoldedNorm(nn.Module):
    """A frozen batch norm as deployed, ``x * scale + shift`` (int-bias norms after fake-quant convs:
    QuantConfig.conv_bias="int32"), then its residual-branch quantizer when it has one."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        scale, shift = deployed_affine(norm)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())
        out_act = getattr(norm, "out_act", None)
        self.out_act = FakeQuantAct(out_act) if out_act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.out_act(x * self.scale.to(x.dtype) + self.shift.to(x.dtype))


class FakeQuantLayer(nn.Module):
    """A float conv/linear on fake-quant weights after a :class:`FakeQuantAct` (layers the kernels skip)."""

    def __init__(self, act: FakeQuantAct, layer: nn.Module) -> None:
        super().__init__()
        self.act, self.layer = act, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.act(x))


class _IntBase(nn.Module):
    """Packed int4 weights ``[N, ceil(K/2)]``, float32 steps/bias, int32 zero-point correction."""

    def __init__(self, codes: Tensor, w_step: Tensor, bias: Tensor | None, spec: ActSpec) -> None:
        super().__init__()
        codes = codes.to(torch.int8)
        self.register_buffer("w_packed", pack_int4(codes))
        self.register_buffer("w_step", w_step.detach().float().reshape(-1).clone())
        self.register_buffer("zcorr", zero_point_correction(codes, spec.zero_point))
        self.register_buffer("bias", None if bias is None else bias.detach().float().reshape(-1).clone())
        self.k, self.spec = int(codes.shape[1]), spec

    def quantize(self, x: Tensor) -> Tensor:
        s = self.spec
        return torch.ops.qdetr.quantize_act(x, s.step, s.zero_point, s.qmin, s.qmax)


class IntLinear(_IntBase):
    """``y = x W^T + b`` with int8 (W4A8) or packed int4 (W4A4) activation codes and int4 weights."""

    def forward(self, x: Tensor) -> Tensor:
        s, codes = self.spec, self.quantize(x)
        if s.bits <= 4:
            return torch.ops.qdetr.w4a4_linear(pack_int4(codes), s.signed, self.w_packed, self.k, self.w_step,
                                               self.zcorr, s.step, self.bias, out_dtype=x.dtype)
        return torch.ops.qdetr.w4a8_linear(codes, self.w_packed, self.k, self.w_step, self.zcorr, s.step,
                                           self.bias, out_dtype=x.dtype)


class IntConv2d(_IntBase):
    """NCHW in and out; NHWC int8 codes into ``qdetr::w4_conv2d`` (padding = the activation zero point)."""

    def __init__(self, conv: QuantConv2d, spec: ActSpec, affine: tuple[Tensor, Tensor] | None) -> None:
        codes, step, _ = conv.weight_qparams()
        bias = conv.bias.detach().float() if conv.bias is not None else None
        if affine is not None:  # fold the BatchNorm: y * g + b
            g, b = affine
            step, bias = step * g, (bias * g if bias is not None else 0.0) + b
        super().__init__(conv_weight_to_gemm(codes), step, bias, spec)
        self.kernel_size, self.stride, self.padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        codes = self.quantize(x.permute(0, 2, 3, 1))
        y = torch.ops.qdetr.w4_conv2d(codes, self.w_packed, self.kernel_size, self.stride, self.padding,
                                      self.w_step, self.zcorr, s.step, s.zero_point, self.bias,
                                      out_dtype=x.dtype)
        return y.permute(0, 3, 1, 2)


class IntAttention(nn.Module):
    """QuantMultiheadAttention with packed projections; attention itself (DA, q/k/v/softmax quantizers)
    runs the model's own ``attend`` in float fake-quant."""

    def __init__(self, mha: QuantMultiheadAttention, projections: list[nn.Module],
                 out_proj: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = projections
        self.out_proj = out_proj
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.scaling, self.dropout = mha.scaling, 0.0
        self.norm_q = None if mha.norm_q is None else Float32(mha.norm_q)
        for name in ("q_act", "k_act", "v_act", "attn_act"):
            setattr(self, name, FakeQuantAct(getattr(mha, name)))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        split = MultiheadAttention._split_heads
        q, k = split(self, self.q_proj(query)), split(self, self.k_proj(key))
        v = split(self, self.v_proj(value))
        out = QuantMultiheadAttention.attend(self, q, k, v, key_padding_mask)
        return self.out_proj(MultiheadAttention.merge(self, out))


# --- layer conversion ----------------------------------------------------------------------------------

@dataclass
class Conversion:
    """What :func:`convert_model` did: integer layers, and fake-quant layers with the reason for each."""

    int_layers: list[str]
    fake_quant: dict[str, str]


def _float_twin(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A plain nn.Conv2d / nn.Linear with the given (fake-quant) weight."""
    if isinstance(layer, nn.Conv2d):
        twin: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                    layer.padding, layer.dilation, layer.groups, bias=bias is not None,
                                    padding_mode=layer.padding_mode)
    else:
        twin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    twin.weight.data = weight.detach().float().clone()
    if bias is not None:
        twin.bias.data = bias.detach().float().clone()
    return twin


def _fake_quant_weight(layer: QuantConv2d | QuantLinear | QuantMultiheadAttention) -> Tensor:
    """``clamp(round(w / a), Qn, Qp) * a`` (lsq.fake_quant_weight) in float32."""
    codes, step, _ = layer.weight_qparams()
    return codes * step.reshape((-1,) + (1,) * (codes.dim() - 1))


def _square(conv: nn.Conv2d) -> bool:
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (isinstance(p, tuple) and k[0] == k[1] and s[0] == s[1] and p[0] == p[1] and d == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def _kernel_reason(layer: nn.Module, spec: ActSpec | str, bits: int) -> str | None:
    """Why ``layer`` must stay fake-quant, or None when the integer kernels can run it."""
    if layer.w_bits > bits:
        return f"{layer.w_bits}-bit weights (the kernels hold int4)"
    if isinstance(spec, str):
        return spec
    if isinstance(layer, nn.Conv2d) and not _square(layer):
        return "conv geometry the kernel does not take (square kernel/stride/padding, no dilation/groups)"
    return None


def _following_norm(parent: nn.Module, child: str) -> str | None:
    """Name of the BatchNorm right after conv ``child`` in ``parent`` (Sequential order, or convN -> bnN)."""
    names = list(parent._modules)
    if isinstance(parent, nn.Sequential):
        i = names.index(child)
        after = names[i + 1] if i + 1 < len(names) else None
    else:
        after = f"bn{child[4:]}" if child.startswith("conv") else None
    return after if after is not None and isinstance(parent._modules.get(after), _BN) else None


def _convert_linear(lin: QuantLinear, name: str, bits: int, conv: Conversion) -> nn.Module:
    spec = act_spec(lin.act)
    reason = _kernel_reason(lin, spec, bits)
    if reason is None:
        codes, step, _ = lin.weight_qparams()
        conv.int_layers.append(name)
        return IntLinear(codes, step, lin.bias, spec)
    conv.fake_quant[name] = reason
    return FakeQuantLayer(FakeQuantAct(lin.act), _float_twin(lin, _fake_quant_weight(lin), lin.bias))


WEIGHT_ONLY_REASON = "float input (the kernels take integer activation codes; no weight-only int4 GEMM)"


def _convert_weight_only(lin: WeightQuantLinear, name: str, conv: Conversion) -> nn.Module:
    """A weight-quantized linear with a float input (SMCA self-attention ``in_proj`` / ``out_proj``): a float
    linear on its fake-quant weight, as the model computes it."""
    conv.fake_quant[name] = WEIGHT_ONLY_REASON
    return _float_twin(lin, _fake_quant_weight(lin), lin.bias)


def _convert_attention(mha: QuantMultiheadAttention, name: str, bits: int, conv: Conversion) -> IntAttention:
    codes, step, _ = mha.weight_qparams()
    w_hat, e = _fake_quant_weight(mha), mha.embed_dim
    projections = []
    for i, part in enumerate(("query", "key", "value")):
        sl, act, pname = slice(i * e, (i + 1) * e), getattr(mha, f"{part}_act"), f"{name}.{part}_proj"
        spec = act_spec(act)
        reason = _kernel_reason(mha, spec, bits)
        if reason is None:
            conv.int_layers.append(pname)
            projections.append(IntLinear(codes[sl], step[sl], mha.in_proj_bias[sl], spec))
        else:
            conv.fake_quant[pname] = reason
            twin = _float_twin(mha.out_proj, w_hat[sl], mha.in_proj_bias[sl])  # an [E,E] linear
            projections.append(FakeQuantLayer(FakeQuantAct(act), twin))
    out_proj = mha.out_proj
    if isinstance(out_proj, QuantLinear):
        out_proj = _convert_linear(out_proj, f"{name}.out_proj", bits, conv)
    return IntAttention(mha, projections, out_proj)


def _convert_conv(parent: nn.Module, child: str, name: str, bits: int, conv: Conversion) -> None:
    layer: QuantConv2d = parent._modules[child]
    spec = act_spec(layer.act)
    reason = _kernel_reason(layer, spec, bits)
    if reason is not None:
        conv.fake_quant[name] = reason
        parent._modules[child] = FakeQuantLayer(FakeQuantAct(layer.act),
                                                _float_twin(layer, _fake_quant_weight(layer), layer.bias))
        return
    norm_name = _following_norm(parent, child)
    affine = None
    if norm_name is not None:  # any sign folds: the epilogue scales the integer result, no codes
        norm = parent._modules[norm_name]
        affine = deployed_affine(norm)  # the shift on the int32 grid where the model carries it
        out_act = getattr(norm, "out_act", None)  # a residual-branch quantizer stays after the conv
        parent._modules[norm_name] = FakeQuantAct(out_act) if out_act is not None else nn.Identity()
    conv.int_layers.append(name)
    parent._modules[child] = IntConv2d(layer, spec, affine)


@torch.no_grad()
def convert_model(model: nn.Module, bits: int = 4) -> Conversion:
    """Swap the quantized layers of ``model`` (eval mode, CPU, float32) for engine modules, in place."""
    for name, act in model.named_modules():
        if isinstance(act, ActQuantizer) and not act.initialised:
            raise QDetrError(f"activation quantizer {name} was never calibrated: calibrate the model first")
    conv = Conversion([], {})
    for kind in (QuantMultiheadAttention, QuantConv2d, QuantLinear, WeightQuantLinear):
        for name, module in list(model.named_modules()):
            if type(module) is not kind:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if kind is QuantConv2d:
                _convert_conv(parent, child, name, bits, conv)
            elif kind is QuantLinear:
                parent._modules[child] = _convert_linear(module, name, bits, conv)
            elif kind is WeightQuantLinear:
                parent._modules[child] = _convert_weight_only(module, name, conv)
            else:
                parent._modules[child] = _convert_attention(module, name, bits, conv)
    for name, module in list(model.named_modules()):  # int-bias norms after fake-quant convs: frozen
        if isinstance(module, _IntBiasMixin):
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child] = FoldedNorm(module)
    _freeze_remaining(model)
    return conv


def _freeze_remaining(model: nn.Module) -> None:
    """Quantizers left in place (residual ``out_act``, SMCA attention's q/k/v/softmax): frozen, as
    torch.export cannot trace a live one; DA left in place (SMCA ``norm_q``): float32 in any engine dtype."""
    for module in list(model.modules()):
        if isinstance(module, Float32):
            continue
        for child, sub in list(module._modules.items()):
            if isinstance(sub, ActQuantizer):
                module._modules[child] = FakeQuantAct(sub)
            elif isinstance(sub, DistributionAlignment):
                module._modules[child] = Float32(sub)


_KEEP_FLOAT32 = (_IntBase, FakeQuantAct, Float32)


def cast_float_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast float parameters/buffers to ``dtype``, except inside quantizers, the integer layers (steps,
    epilogue constants) and :class:`Float32` modules."""
    kept: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{k}.") for k in kept):
            continue
        if isinstance(module, _KEEP_FLOAT32):
            kept.append(name)
            continue
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


# --- the contract wrapper ------------------------------------------------------------------------------

class DetrEngineModule(nn.Module):
    """The ONNX contract in torch: ``images [B,3,H,W]`` float32 -> ``(scores, labels, boxes)`` (canvas
    pixels) or ``(pred_logits, pred_boxes)``; no mask (padding is part of the canvas), so the sine position
    embedding and the query embedding are constants for the fixed (H, W)."""

    def __init__(self, model: nn.Module, size: tuple[int, int], with_postprocess: bool = True) -> None:
        super().__init__()
        body = model.backbone[0].body
        h, w = output_size(body, size)
        pos = model.backbone[1](torch.zeros(1, h, w, dtype=torch.bool)).flatten(2).permute(2, 0, 1)
        self.register_buffer("pos", pos.contiguous().clone())  # [hw,1,D]
        self.register_buffer("query_pos", model.query_embed.weight.detach()[:, None, :].clone())  # [Q,1,D]
        self.register_buffer("canvas", torch.tensor([[int(size[0]), int(size[1])]]))  # int64: never cast
        self.body, self.input_proj, self.transformer = body, model.input_proj, model.transformer
        self.class_embed, self.bbox_embed = model.class_embed, model.bbox_embed
        self.with_postprocess = with_postprocess

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.to(self.pos.dtype)
        src = self.input_proj(self.body(x)["0"])  # [B,D,h,w]
        b = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # [hw,B,D]
        pos, query_pos = self.pos.expand(-1, b, -1), self.query_pos.expand(-1, b, -1)
        memory = self.transformer.encoder(src, None, pos)
        tgt = torch.zeros_like(query_pos)
        dec = self.transformer.decoder
        for layer in dec.layers:
            tgt = layer(tgt, memory, None, pos, query_pos)
        hs = dec.norm(tgt).transpose(0, 1)  # [B,Q,D]
        logits = self.class_embed(hs).float()
        boxes = self.bbox_embed(hs).sigmoid().float()
        if not self.with_postprocess:
            return logits, boxes
        return postprocess(logits, boxes, self.canvas.expand(b, 2))


def engine_module(model: nn.Module, size: tuple[int, int], device: torch.device, bits: int = 4,
                  with_postprocess: bool = True,
                  dtype: torch.dtype | None = None) -> tuple[nn.Module, Conversion]:
    """Convert a quantized DETR (it is modified in place) and wrap it for ``device`` in ``dtype`` (default
    float16 on CUDA, float32 on CPU)."""
    model = model.cpu().float().eval().requires_grad_(False)
    if isinstance(model, SMCADETR):  # the released Q-DETR: its own forward, sigmoid top-k
        if not with_postprocess:
            raise QDetrError("an SMCA-DETR engine keeps its sigmoid top-k post-processing (raw logits would "
                             "be read as DETR's softmax classes)")
        wrapper: nn.Module = SMCAEngineModule(model, size)
    else:
        wrapper = DetrEngineModule(model, size, with_postprocess)  # position embedding from the float model
    conversion = convert_model(model, bits)
    cast_float_modules(wrapper, dtype or default_dtype(device))
    return wrapper.to(device).eval(), conversion


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA, float32 on CPU (the CPU reference ops and CPU float16 would be slow and inexact)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    dt = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if dt not in (torch.float16, torch.float32) or (dt == torch.float16 and device.type != "cuda"):
        raise QDetrError(f"dtype {dtype} is not supported on {device.type}: use float32 (or float16 on cuda)")
    return dt


# --- build ---------------------------------------------------------------------------------------------

def device_info(device: torch.device) -> dict[str, Any]:
    """``{"type", "name", "compute_capability"}`` of the device the engine runs on."""
    if device.type != "cuda":
        return {"type": "cpu", "name": "cpu", "compute_capability": None}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"type": "cuda", "name": torch.cuda.get_device_name(index),
            "compute_capability": list(torch.cuda.get_device_capability(index))}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QDetrError("device cuda was asked for, but torch sees no CUDA device")
    if dev.type not in ("cuda", "cpu"):
        raise QDetrError(f"device {dev.type} is not supported: use cuda or cpu")
    return dev


def _load(source: str | os.PathLike | Checkpoint | nn.Module, quant_config: QuantConfig | None = None
          ) -> tuple[nn.Module, Checkpoint | None, dict]:
    """The model (a copy: conversion is in place), its checkpoint (when known) and an ONNX model's
    metadata (when the source is one). ``quant_config``: the bits of a released Q-DETR file (it stores
    none; default for an ONNX model: the bits in its metadata)."""
    if isinstance(source, nn.Module):
        return copy.deepcopy(source), None, {}
    if isinstance(source, Checkpoint):
        return copy.deepcopy(source.model), source, {}
    path, onnx_meta = Path(source), {}
    if path.suffix.lower() == ".onnx":  # build-engine takes MODEL.onnx: use its metadata and source
        onnx_meta = read_onnx_metadata(path)
        src = (onnx_meta.get("source") or {}).get("path")
        if not src or not Path(src).is_file():
            raise QDetrError(f"the torch backend builds from the checkpoint; {src or 'no checkpoint'} "
                             "named in the ONNX metadata is missing: pass the quantized checkpoint", path)
        path = Path(src)
        if quant_config is None:
            quant_config = _bits_config(onnx_meta.get("bits"))
    ckpt = load_checkpoint(path, quant_config=quant_config)
    return ckpt.model, ckpt, onnx_meta


def _bits_config(bits: Any) -> QuantConfig | None:
    """``QuantConfig`` of a "W-A-A" bits string (e.g. "4-4-8"), None for anything else ("fp32", 4)."""
    if not isinstance(bits, str) or bits.count("-") != 2:
        return None
    try:
        return QuantConfig.from_bits(bits)
    except (ValueError, QDetrError) as e:
        raise QDetrError(f"--bits {bits}: {e}") from None


def _kernel_bits(bits: int | str) -> tuple[int, QuantConfig | None]:
    """``bits`` = 4 (the int4 kernels) or W-A-8 with W <= 4 (also the bits of a released file)."""
    qc = _bits_config(bits)
    if qc is not None and qc.w_bits <= 4:
        return 4, qc
    if qc is None and str(bits).strip() == "4":
        return 4, None
    raise QDetrError(f"--bits {bits}: the torch engine runs 4-bit weight kernels; use --bits 4 (or the "
                     "model's bits, e.g. --bits 4-4-8) (int8 engines: --backend onnxruntime or tensorrt)")


def engine_metadata(model: nn.Module, ckpt: Checkpoint | None, size: tuple[int, int], batch: int | None,
                    max_batch: int, with_postprocess: bool, device: torch.device, dtype: torch.dtype,
                    conversion: Conversion) -> dict[str, Any]:
    """The ONNX-model metadata of docs/ARCHITECTURE.md plus ``outputs``, ``max_batch`` and ``engine``."""
    cfg, qcfg = model.config, getattr(model, "quant_config", None)
    source = {"path": str(ckpt.path), "sha256": sha256_file(ckpt.path)} if ckpt is not None else None
    category_ids = list(ckpt.category_ids) if ckpt is not None and ckpt.category_ids else None
    return model_metadata(
        format=TORCH_FORMAT, input_size=size, class_names=class_names_of(cfg), category_ids=category_ids,
        num_classes=cfg.num_classes, postprocess=with_postprocess, batch=batch, max_batch=batch or max_batch,
        bits=qcfg.bits if qcfg else "fp32", quant_config=qcfg.to_dict() if qcfg else None, target="torch",
        source=source, outputs=OUTPUTS[bool(with_postprocess)],
        engine={"device": device_info(device), "dtype": str(dtype).removeprefix("torch."),
                "torch_version": torch.__version__, "weight_bits_packed": 4,
                "int_layers": len(conversion.int_layers), "fake_quant_layers": conversion.fake_quant})


def build_torch_engine(ckpt_path_or_model: str | os.PathLike | Checkpoint | nn.Module,
                       out_path: str | os.PathLike, bits: int | str = 4,
                       image_size: tuple[int, int] | None = None,
                       batch: int | None = 1, device: str | torch.device | None = None,
                       max_batch: int = DEFAULT_MAX_BATCH, postprocess: bool = True,
                       strict: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Build a ``.qdtorch`` engine from a quantized checkpoint (path, Checkpoint, quantized DETR or
    SMCA-DETR, or a qdetr ONNX model whose metadata names its checkpoint); written atomically, nothing
    written on error.

    ``bits``: 4 (int4 weight kernels), or the model's W-A-8 bits with W <= 4, which a released Q-DETR
    file needs (it stores none: "4-4-8" or "2-2-8").

    ``batch=None``: dynamic batch 1..``max_batch``. ``device``: where it runs (default CUDA when available,
    else CPU; a CUDA engine only loads on the same GPU model). ``strict``: refuse layers that would stay
    fake-quant float (apart from weights above 4 bits, such as the 8-bit stem). ``dtype``: of the float
    parts, default float16 on CUDA and float32 on CPU.
    """
    out_path = check_output_path(out_path)
    if out_path.suffix.lower() != SUFFIX:
        raise QDetrError(f"the torch engine needs the suffix {SUFFIX}", out_path)
    bits, quant_config = _kernel_bits(bits)
    if batch is not None and batch < 1 or max_batch < 1:
        raise QDetrError(f"batch must be >= 1, got {batch} (max batch {max_batch})")
    batch = 1 if batch is None and max_batch == 1 else batch
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    model, ckpt, onnx_meta = _load(ckpt_path_or_model, quant_config)
    stored = getattr(model, "quant_config", None)
    if quant_config is not None and stored is not None and stored.bits != quant_config.bits:
        raise QDetrError(f"--bits {quant_config.bits} contradicts the checkpoint's {stored.bits}")
    if not is_quantized(model):
        raise QDetrError("not a quantized model: the torch engine runs the 4-bit kernels of a quantized "
                         "checkpoint (quantize and calibrate it first)")
    size = tuple(int(v) for v in image_size) if image_size else default_size(
        ckpt.meta if ckpt is not None else None, onnx_meta)
    if onnx_meta and batch == 1 and onnx_meta.get("dynamic_batch"):  # keep the ONNX model's batch
        batch = None
    elif onnx_meta and batch == 1:
        batch = int(onnx_meta.get("batch") or 1)
    wrapper, conversion = engine_module(model, size, dev, bits, postprocess, dt)
    _check_strict(conversion, strict)
    program = export_program(wrapper, size, batch, max_batch, dev)
    meta = engine_metadata(model, ckpt, size, batch, max_batch, postprocess, dev, dt, conversion)
    return save_engine(program, meta, out_path)


def _check_strict(conversion: Conversion, strict: bool) -> None:
    bad = {n: r for n, r in conversion.fake_quant.items() if "-bit weights" not in r}
    if strict and bad:
        names = ", ".join(f"{n} ({r})" for n, r in list(bad.items())[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise QDetrError(f"{len(bad)} layers cannot run the integer kernels: {names}{more}")


def export_program(wrapper: nn.Module, size: tuple[int, int], batch: int | None, max_batch: int,
                   device: torch.device) -> torch.export.ExportedProgram:
    """``torch.export`` the wrapper on ``device``; ``batch=None`` makes dimension 0 dynamic."""
    example_batch = batch if batch is not None else min(2, max_batch)
    example = torch.zeros(example_batch, 3, int(size[0]), int(size[1]), device=device)
    dynamic = None
    if batch is None:
        dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=max_batch)}}
    with torch.no_grad():
        return torch.export.export(wrapper, (example,), dynamic_shapes=dynamic, strict=False)


def save_engine(program: torch.export.ExportedProgram, metadata: dict, out_path: str | os.PathLike) -> Path:
    """``torch.export.save`` with the metadata as the extra file ``qdetr.json``, atomically."""
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:  # a file object: any suffix, archive/ prefix
        torch.export.save(program, f, extra_files={METADATA_FILE: json.dumps(metadata)})
    return Path(out_path)
