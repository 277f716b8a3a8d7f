"""The numeric rules of the export: Q/DQ planning, weight containers, batch-norm folding, int32 conv biases.

The lowering rules (``export/lower/``, one per module kind) call these for the arithmetic; which module
becomes which nodes is theirs. Conventions (docs/ARCHITECTURE.md "ONNX model"; QDETR_METHOD.md §1):

- Weights of quantized layers become integer initializers (INT4 for <= 4 bits in the "int4" container,
  INT8 otherwise) and a per-output-channel DequantizeLinear with scale = the learned step, zero point 0.
  Conv weights keep their [Cout,Cin,kh,kw] layout (axis 0); linear weights are stored transposed, [K,N]
  (axis 1), so that MatMul reads them without a Transpose between DequantizeLinear and MatMul.
  The TensorRT target writes every weight as INT8 (TensorRT takes INT4 only as weight-only, block-quantized
  GEMM weights: :func:`weight_dq`), so convs and layers with quantized inputs run on INT8 kernels exactly.
- A BatchNorm2d / FrozenBatchNorm2d after a conv is folded: into the DQ scale (``step * gamma/sigma``) and
  a float bias for quantized convs when every ``gamma/sigma > 0``, into the float weights otherwise. This
  only changes float rounding (ulps), never an integer code by construction.
- Activation quantizers become QuantizeLinear/DequantizeLinear with the learned step (:func:`act_quant`).
  With integer z, ``round(x/a) + z - z = round(x/a)``: the codes of any Q dtype that holds the shifted
  range [Qn+s, Qp+s] (zero point z+s) dequantize to the same values, so a quantizer may use a wider dtype
  (a Clip to [a(Qn-z), a(Qp-z)] first restores the narrow range). Where no dtype fits (TensorRT: zero
  point 0 and per-tensor only) the exact float fake-quant subgraph Div, Round, Add, Clip, Sub, Mul is
  written instead and the layer is reported.
- ``conv_bias="int32"`` (onnxruntime): a quantized conv whose output goes through ReLU straight into the
  next quantized conv's per-tensor activation quantizer (:func:`conv_relu_quant`) gets its folded bias
  as an INT32 initializer on the ``x_step * w_step`` grid (DequantizeLinear, axis 0) inside the Conv, and
  its ReLU output quantized at once: ``Conv -> Relu -> QuantizeLinear`` (uint8, zero point 0, the next
  quantizer's step), which onnxruntime fuses into QLinearConv. Rounding the bias onto the grid moves it
  by <= 0.5 * x_step * w_step; the change is recorded (``Ctx.bias_deltas``) so the parity check can apply
  it to the PyTorch model. A model quantized with ``QuantConfig.conv_bias="int32"`` carries its folded
  biases on that grid already (:func:`norm_affine` reads them, quant/int_bias.py): the rounding moves
  nothing and every delta is 0. Everything else keeps the exact float bias (a separate Add).
- Linear biases are [1,N] initializers: a 1-D bias lets onnxruntime fuse MatMul+Add into a float Gemm
  before its Q/DQ fusion, which would keep the layer out of MatMulIntegerToFloat.
- DA, LayerNorm, softmax, the transformer's residual adds and the heads stay float. A residual-branch
  quantizer (``QuantConfig.residual_bits``: ``bnN.out_act`` of a ResNet block's last batch norm, or
  ``downsample.1.out_act`` of a quantized downsample) becomes the Q/DQ on that input of the add
  (:func:`residual_branch`); the stem pooling's quantizer (``QuantConfig.shared_block_input``) pools the
  stem's uint8 codes (:func:`conv_relu_quant` with ``pool``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from qdetr_deploy.export.graph import DTYPE_NAMES, INT_DTYPES, ActRecord, GraphBuilder
from qdetr_deploy.export.trt_weights import blocked_int4_dq, int4_block
from qdetr_deploy.quant.int_bias import deployed_affine
from qdetr_deploy.quant.modules import QuantConv2d
from qdetr_deploy.quant.quantizers import ActQuantizer

TARGETS = ("onnxruntime", "tensorrt")
CONTAINERS = ("int4", "int8")
CONV_BIASES = ("float", "int32")
T = TensorProto


@dataclass
class Ctx:
    """What every rule needs: the graph, the target runtime and the weight/activation container."""

    g: GraphBuilder
    target: str = "onnxruntime"
    container: str = "int4"
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    conv_bias: str = "float"
    #: conv name -> (module whose ``bias`` takes the delta, per-channel delta) of int32-rounded conv biases
    bias_deltas: dict[str, tuple[str, list[float]]] = field(default_factory=dict)
    #: conv name -> why it keeps a float bias/output under conv_bias="int32" ("" when it got an int32 bias)
    int_convs: dict[str, str] = field(default_factory=dict)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def _bshape(axis: int | None, rank: int, n: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of a rank-``rank`` tensor."""
    if axis is None:
        return ()
    if axis < 0:
        return (n,) + (1,) * (-axis - 1)
    return (1,) * axis + (n,) + (1,) * (rank - axis - 1)


# --- activation quantizer ----------------------------------------------------------------------------------

def plan_act(qn: int, qp: int, z: np.ndarray, bits: int, signed: bool, per_channel: bool, target: str,
             container: str, prefer_uint8: bool = False) -> tuple[int, np.ndarray, bool] | str:
    """Choose the Q dtype for codes [qn, qp] with zero points ``z``: (dtype, shift s, needs Clip), or the
    reason (a string) why no Q/DQ reproduces the quantizer exactly. ``prefer_uint8``: try UINT8 first
    (onnxruntime's CPU QLinearConv wants uint8 activations)."""
    if target == "tensorrt":
        if per_channel:
            return "per-channel/per-head activation steps (TensorRT takes per-tensor activation scales)"
        shift = -z
        if qn + shift.min() >= -128 and qp + shift.max() <= 127:
            return T.INT8, shift, bool(qn + shift.min() != -128 or qp + shift.max() != 127)
        return (f"{'signed' if signed else 'unsigned'} {bits}-bit codes shifted by z={int(z.flat[0])} span "
                f"[{qn - int(z.flat[0])}, {qp - int(z.flat[0])}], outside int8 with zero point 0")
    order = [T.INT8, T.UINT8] if signed and not prefer_uint8 else [T.UINT8, T.INT8]
    if bits <= 4 and container == "int4":
        order = ([T.INT4, T.UINT4] if signed else [T.UINT4, T.INT4]) + order
    for dtype in order:
        lo, hi = INT_DTYPES[dtype]
        s_lo, s_hi = np.maximum(lo - qn, lo - z), np.minimum(hi - qp, hi - z)
        # per channel: channel c's codes span [qn + s_c, qp + s_c] in the dtype; any short of [lo, hi] needs
        # the Clip (bounds per channel), whatever the other channels' shifts
        clip = bool(np.any(qn + s_lo != lo) or np.any(qp + s_lo != hi))
        # 4-bit Q only where it needs no Clip: onnxruntime's Clip->Q fusion fails on INT4/UINT4 zero points
        if (s_lo <= s_hi).all() and not (clip and dtype in (T.INT4, T.UINT4)):
            return dtype, s_lo, clip
    return f"zero point {int(z.flat[0])} fits no 8-bit Q dtype for codes [{qn}, {qp}]"


ORT_PER_CHANNEL_MATMUL = ("per-channel/per-head activation Q/DQ before a MatMul: onnxruntime fuses it into "
                          "MatMulIntegerToFloat, whose kernel rejects per-channel zero points")


def act_quant(ctx: Ctx, x: str, act: ActQuantizer | None, name: str, axis: int | None = None, rank: int = 3,
              layout: str = "same", feeds: str = "MatMul", dq_gain: float | None = None) -> str:
    """The activation quantizer ``act`` (module ``name``) on tensor ``x``: returns the dequantized tensor.

    ``axis``: the graph axis that carries its channels/heads when per-channel (PyTorch's channel dim in the
    graph's layout); ``layout``: how the graph tensor relates to PyTorch's ("kT": last two dims swapped);
    ``feeds``: the op that reads the result ("MatMul", "Conv" or "Add": uint8 preferred for the last two
    under conv_bias="int32", as onnxruntime's QLinearConv wants). ``dq_gain``: a constant factor folded
    into the DequantizeLinear's scale (the attention scaling, when the result feeds only the scores
    MatMul: onnxruntime's MatMulIntegerToFloat then applies it with the scales, no float Mul); the codes
    are the quantizer's either way.

    Where the codes need a Clip to their narrow range in an 8-bit dtype (onnxruntime, opset >= 12, per
    tensor), it runs on the codes after the QuantizeLinear (a quarter of the bytes of the float input, and
    uint8 preferred before a MatMul as before a Conv); the TensorRT target and per-channel quantizers clip
    the float input (Clip, or Max/Min with per-channel bounds).
    """
    if act is None:
        return x
    if not act.initialised:
        from qdetr_deploy.errors import QDetrError

        raise QDetrError(f"activation quantizer {name} was never calibrated (run qdetr-deploy quantize)")
    p = act.qparams()
    step, z = _np(p.step).reshape(-1), _np(p.zero_point).reshape(-1).astype(np.int64)
    per_ch = p.channel_dim is not None
    if per_ch and axis is None:
        raise ValueError(f"{name}: per-channel quantizer without a graph axis")
    axis = axis if per_ch else None
    codes_clip = ctx.target == "onnxruntime" and not per_ch and ctx.g.opset >= 12
    plan = plan_act(p.qmin, p.qmax, z, p.bits, p.signed, per_ch, ctx.target, ctx.container,
                    prefer_uint8=(feeds != "MatMul" and ctx.conv_bias == "int32") or codes_clip)
    if per_ch and feeds == "MatMul" and ctx.target == "onnxruntime":
        plan = ORT_PER_CHANNEL_MATMUL
    g, shape = ctx.g, _bshape(axis, rank, step.size)
    if isinstance(plan, str):
        ctx.fallbacks.append((name, plan))
        out = _fake_quant(ctx, x, step.reshape(shape), z.reshape(shape), p.qmin, p.qmax, name, axis, plan,
                          layout)
        return out if dq_gain is None else g.node("Mul", [out, g.const(f"{name}.gain", np.float32(dq_gain))],
                                                  f"{name}/gain")
    dtype, shift, clip = plan
    codes_clip = codes_clip and clip and dtype in (T.UINT8, T.INT8)
    if clip and not codes_clip:
        lo = (step * (p.qmin - z).astype(np.float32)).astype(np.float32)
        hi = (step * (p.qmax - z).astype(np.float32)).astype(np.float32)
        if per_ch:  # Clip takes scalars only
            x = g.node("Max", [x, g.const(f"{name}.clip_min", lo.reshape(shape))], f"{name}/Max")
            x = g.node("Min", [x, g.const(f"{name}.clip_max", hi.reshape(shape))], f"{name}/Min")
        else:
            x = g.node("Clip", [x, g.const(f"{name}.clip_min", lo[0]), g.const(f"{name}.clip_max", hi[0])],
                       f"{name}/Clip")
    s = g.const(f"{name}.scale", step if per_ch else step[0])
    zp = g.const_int(f"{name}.zero_point", (z + shift) if per_ch else (z + shift)[0], dtype)
    attrs = {"axis": axis} if per_ch else {}
    q = g.node("QuantizeLinear", [x, s, zp], f"{name}/QuantizeLinear", **attrs)
    mode = "clip+qdq" if clip else "qdq"
    if codes_clip:  # Q saturates to the dtype, then the codes are clipped to [qn, qp] shifted: the same codes
        q = g.node("Clip", [q, g.const_int(f"{name}.codes_min", int(p.qmin + shift[0]), dtype),
                            g.const_int(f"{name}.codes_max", int(p.qmax + shift[0]), dtype)], f"{name}/Clip")
    s_dq = s if dq_gain is None else g.const(f"{name}.scale_x_gain", (step * np.float32(dq_gain))[0])
    out = g.node("DequantizeLinear", [q, s_dq, zp], f"{name}/DequantizeLinear", **attrs)
    g.acts.append(ActRecord(name, q, shift, axis, mode, DTYPE_NAMES[dtype], layout))
    return out


def _fake_quant(ctx: Ctx, x: str, step: np.ndarray, z: np.ndarray, qn: int, qp: int, name: str,
                axis: int | None, reason: str, layout: str) -> str:
    """Exact float fake quantization: ``(clip(round(x / a) + z, qn, qp) - z) * a`` (lsq.fake_quant_act)."""
    g = ctx.g
    a, zf = g.const(f"{name}.step", step), g.const(f"{name}.zero_point_f", z.astype(np.float32))
    r = g.node("Round", [g.node("Div", [x, a], f"{name}/Div")], f"{name}/Round")
    codes = g.node("Clip", [g.node("Add", [r, zf], f"{name}/Add"), g.const(f"{name}.qmin", float(qn)),
                            g.const(f"{name}.qmax", float(qp))], f"{name}/Clip")
    out = g.node("Mul", [g.node("Sub", [codes, zf], f"{name}/Sub"), a], f"{name}/Mul")
    g.acts.append(ActRecord(name, codes, np.zeros(1, np.int64), axis, "float", "FLOAT", layout, reason))
    return out


# --- weights, conv + norm, int32 conv biases --------------------------------------------------------------

def weight_dq(ctx: Ctx, codes: np.ndarray, step: np.ndarray, bits: int, name: str, axis: int,
              weight_only_gemm: bool = False) -> str:
    """Integer weight initializer + per-output-channel DequantizeLinear (zero point 0). TensorRT target:
    INT8, except a <= 4-bit weight-only GEMM weight, INT4 block-quantized (``trt_weights.py``)."""
    g = ctx.g
    if ctx.target == "tensorrt":
        block = int4_block(codes, bits, axis, weight_only_gemm, ctx.container, g.opset)
        if block:
            return blocked_int4_dq(g, codes, step, name, block)
        dtype = T.INT8
    else:
        dtype = T.INT4 if bits <= 4 and ctx.container == "int4" else T.INT8
    w = g.const_int(f"{name}.weight_quantized", np.rint(codes).astype(np.int64), dtype)
    s = g.const(f"{name}.weight_scale", step.astype(np.float32))
    zp = g.const_int(f"{name}.weight_zero_point", np.zeros(step.size, np.int64), dtype)
    return g.node("DequantizeLinear", [w, s, zp], f"{name}/weight/DequantizeLinear", axis=axis)


def norm_affine(norm: nn.Module | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel of an eval-mode BatchNorm2d / FrozenBatchNorm2d, as numpy (the shift
    already on the int32 grid where the model carries it: QuantConfig.conv_bias="int32")."""
    if norm is None:
        return None
    scale, shift = deployed_affine(norm)
    return _np(scale), _np(shift)


def conv_norm(ctx: Ctx, x: str, conv: nn.Conv2d, norm: nn.Module | None, name: str, *,
              quantized_input: bool = False, int_bias: tuple[str, float] | None = None) -> str:
    """Conv2d (quantized or float) with the following batch norm folded in; returns the conv output.

    ``quantized_input``: ``x`` is already the output of the conv's activation quantizer (applied by the
    previous layer, :func:`conv_relu_quant`). ``int_bias``: (name of the module whose ``bias`` holds the
    folded shift, input step) puts the folded bias into the Conv as INT32 on the ``x_step * w_step`` grid.
    """
    g, affine = ctx.g, norm_affine(norm)
    bias = _np(conv.bias) if conv.bias is not None else np.zeros(conv.out_channels, np.float32)
    quant = isinstance(conv, QuantConv2d)
    if quant:
        if not quantized_input:
            x = act_quant(ctx, x, conv.act, f"{name}.act", axis=1, rank=4, feeds="Conv")
        codes, step, bits = conv.weight_qparams()
        step = _np(step)
        if affine is not None and (affine[0] > 0).all():
            step, bias, affine = step * affine[0], bias * affine[0] + affine[1], None
        w = weight_dq(ctx, _np(codes), step, bits, name, axis=0)
    else:
        weight = _np(conv.weight)
        if affine is not None:
            weight, bias, affine = weight * affine[0][:, None, None, None], bias * affine[0] + affine[1], None
        w = g.const(f"{name}.weight", weight)
    pads = list(conv.padding) * 2
    inputs = [x, w] if quant else [x, w, g.const(f"{name}.bias", bias)]
    if quant and int_bias is not None and affine is None:
        target, x_step = int_bias
        b_scale = (np.float32(x_step) * step.astype(np.float32)).astype(np.float32)
        b_int = np.rint(bias.astype(np.float64) / b_scale.astype(np.float64))
        if np.abs(b_int).max(initial=0) < 2 ** 31 - 1 and (b_scale > 0).all():
            b_int = b_int.astype(np.int32)
            rounded = (b_int.astype(np.float32) * b_scale).astype(np.float32)
            ctx.bias_deltas[name] = (target, [float(d) for d in (rounded.astype(np.float64) - bias)])
            inputs.append(g.node("DequantizeLinear", [g.const(f"{name}.bias_quantized", b_int, np.int32),
                                                      g.const(f"{name}.bias_scale", b_scale),
                                                      g.const(f"{name}.bias_zero_point",
                                                              np.zeros(b_int.size, np.int32), np.int32)],
                                 f"{name}/bias/DequantizeLinear", axis=0))
            int_bias = None
    y = g.node("Conv", inputs, f"{name}/Conv", kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
               pads=pads, dilations=list(conv.dilation), group=conv.groups)
    if quant and len(inputs) == 2:  # a separate Add: onnxruntime would round a Conv's float bias onto the
        # int32 grid x_step*w_step
        y = g.node("Add", [y, g.const(f"{name}.bias", bias.reshape(1, -1, 1, 1))], f"{name}/Add")
    if affine is not None:  # a quantized conv whose norm has a non-positive scale: keep it as Mul + Add
        scale = g.const(f"{name}.norm_scale", affine[0].reshape(1, -1, 1, 1))
        shift = g.const(f"{name}.norm_shift", affine[1].reshape(1, -1, 1, 1))
        y = g.node("Add", [g.node("Mul", [y, scale], f"{name}/norm/Mul"), shift], f"{name}/norm/Add")
    return y


def _int_conv_common(ctx: Ctx, conv: nn.Module, norm: nn.Module | None) -> str:
    """Why ``conv`` (+ ``norm``) cannot take an int32 bias at all; "" when it can."""
    if ctx.conv_bias != "int32" or ctx.target != "onnxruntime":
        return "conv_bias is float"
    if not isinstance(conv, QuantConv2d):
        return "float conv"
    affine = norm_affine(norm)
    if affine is not None and not (affine[0] > 0).all():
        return "batch norm with a non-positive scale (kept as Mul + Add)"
    return _per_tensor_reason(ctx, conv.act)


def _per_tensor_reason(ctx: Ctx, act: ActQuantizer | None) -> str:
    if act is None or not act.initialised:
        return "unquantized or uncalibrated activation"
    p = act.qparams()
    if p.channel_dim is not None:
        return "per-channel activation steps (QLinearConv takes per-tensor activation scales)"
    z = _np(p.zero_point).reshape(-1).astype(np.int64)
    plan = plan_act(p.qmin, p.qmax, z, p.bits, p.signed, False, ctx.target, ctx.container, True)
    if isinstance(plan, str):
        return f"activation quantizer has no Q/DQ form: {plan}"
    return ""


def int_conv_reason(ctx: Ctx, conv: nn.Module, norm: nn.Module | None, nxt_act: ActQuantizer | None) -> str:
    """Why ``conv`` -> ReLU -> ``nxt_act`` (the input quantizer of the conv reading its output, or the
    stem pooling's output quantizer) cannot take an int32 bias and a quantized output; "" when it can."""
    reason = _int_conv_common(ctx, conv, norm)
    if reason:
        return reason
    if nxt_act is None:
        return "its output feeds a float layer or a residual add, not only a quantized conv"
    reason = _per_tensor_reason(ctx, nxt_act)
    if reason:
        return reason
    p = nxt_act.qparams()
    if not 0 <= p.qmax - int(_np(p.zero_point).reshape(-1)[0]) <= 255:
        return "the next quantizer's codes (minus its zero point) leave a uint8 output of the conv"
    return ""


def int_out_reason(ctx: Ctx, conv: nn.Module, norm: nn.Module | None, out_act: ActQuantizer | None) -> str:
    """Why ``conv`` + ``norm`` -> ``out_act`` (a residual-branch quantizer, no ReLU between) cannot run as
    QLinearConv; "" when it can (its Q/DQ then needs no Clip, so the Conv feeds the QuantizeLinear)."""
    if out_act is None:
        return "its output meets the residual add (float) before the ReLU (QuantConfig.residual_bits: None)"
    reason = _int_conv_common(ctx, conv, norm) or _per_tensor_reason(ctx, out_act)
    if reason:
        return reason
    p = out_act.qparams()
    z = _np(p.zero_point).reshape(-1).astype(np.int64)
    dtype, _, clip = plan_act(p.qmin, p.qmax, z, p.bits, p.signed, False, ctx.target, ctx.container, True)
    if dtype != T.UINT8 or clip:
        return f"the residual quantizer's {p.bits}-bit codes need a Clip or a non-uint8 Q before the add"
    return ""


def conv_relu_quant(ctx: Ctx, x: str, conv: nn.Module, norm: nn.Module | None, name: str,
                    norm_name: str | None, nxt_act: ActQuantizer | None, act_name: str, relu_name: str, *,
                    quantized_input: bool = False, pool: nn.MaxPool2d | None = None) -> tuple[str, bool]:
    """``conv`` + ``norm`` -> ReLU -> [``pool``] -> the activation quantizer ``nxt_act`` (module
    ``act_name``: the next quantized conv's input quantizer, or the stem pooling's output quantizer).

    Returns (tensor, quantized): with conv_bias="int32" where :func:`int_conv_reason` allows, the
    dequantized output of ``nxt_act`` (pass ``quantized_input=True`` to the next conv's conv_norm) as
    ``Conv(int32 bias) -> Relu -> QuantizeLinear(uint8, zero point 0) -> [Clip on the uint8 codes] ->
    [MaxPool on the uint8 codes] -> DequantizeLinear``: onnxruntime fuses the conv and the Q into
    QLinearConv, the Clip and the pooling run on uint8 and the DQ joins the next QLinearConv, so no float op
    sits between the two convs. Otherwise the ReLU output (not pooled), as before. ``quantized_input``:
    ``x`` already is ``conv``'s quantizer output.

    Exactness, for the next quantizer's step a, zero point z and codes [qn, qp]: with r = round(relu(y)/a)
    >= 0, its code is clip(r + z, qn, qp); the Q gives min(r, 255), the uint8 Clip to [max(0, qn - z),
    qp - z] gives clip(r + z, qn, qp) - z (0 <= qp - z <= 255 is checked), and the DQ with zero point 0 gives
    (code - z) * a, the fake-quant value. Max pooling commutes with this monotone map, so pooling the codes
    equals quantizing the pooled values. The codes tensor is recorded with shift -z.
    """
    g = ctx.g
    reason = int_conv_reason(ctx, conv, norm, nxt_act)
    if ctx.conv_bias == "int32":
        ctx.int_convs[name] = reason
    if reason:
        y = conv_norm(ctx, x, conv, norm, name, quantized_input=quantized_input)
        return g.node("Relu", [y], relu_name), False
    x_step = float(_np(conv.act.qparams().step).reshape(-1)[0])
    target = norm_name if norm is not None else name
    y = conv_norm(ctx, x, conv, norm, name, quantized_input=quantized_input, int_bias=(target, x_step))
    y = g.node("Relu", [y], relu_name)
    p = nxt_act.qparams()
    step, z = _np(p.step).reshape(-1)[:1], int(_np(p.zero_point).reshape(-1)[0])
    s = g.const(f"{act_name}.scale", step[0])
    zp = g.const_int(f"{act_name}.zero_point", 0, T.UINT8)
    codes = g.node("QuantizeLinear", [y, s, zp], f"{act_name}/QuantizeLinear")
    lo, hi = max(0, p.qmin - z), p.qmax - z  # codes minus z that the quantizer allows; ReLU made them >= 0
    if lo > 0 or hi < 255:
        codes = g.node("Clip", [codes, g.const_int(f"{act_name}.clip_min", lo, T.UINT8),
                                g.const_int(f"{act_name}.clip_max", hi, T.UINT8)], f"{act_name}/Clip")
    if pool is not None:
        codes = max_pool_node(g, codes, pool, f"{act_name}/MaxPool")
    out = g.node("DequantizeLinear", [codes, s, zp], f"{act_name}/DequantizeLinear")
    mode = "q+uint8 clip+dq" if lo > 0 or hi < 255 else "qdq"
    g.acts.append(ActRecord(act_name, codes, np.array([-z], np.int64), None, mode, "UINT8", "same"))
    return out, True


def max_pool_node(g: GraphBuilder, x: str, pool: nn.MaxPool2d, name: str) -> str:
    """A square MaxPool2d (ResNet's stem pooling) as an ONNX MaxPool on ``x`` (float or uint8 codes)."""
    return g.node("MaxPool", [x], name, kernel_shape=[pool.kernel_size] * 2, strides=[pool.stride] * 2,
                  pads=[pool.padding] * 4)


def residual_branch(ctx: Ctx, x: str, conv: nn.Module, norm: nn.Module, name: str, norm_name: str,
                    quantized_input: bool) -> str:
    """The last conv of a ResNet block + its norm, then the norm's residual quantizer ``out_act`` if any.

    With conv_bias="int32" and :func:`int_out_reason` empty, the conv takes an int32 bias and feeds the
    quantizer's QuantizeLinear (uint8) directly: onnxruntime fuses them into QLinearConv."""
    out_act = getattr(norm, "out_act", None)
    reason = int_out_reason(ctx, conv, norm, out_act)
    if ctx.conv_bias == "int32":
        ctx.int_convs[name] = reason
    int_bias = None
    if not reason:
        int_bias = (norm_name, float(_np(conv.act.qparams().step).reshape(-1)[0]))
    y = conv_norm(ctx, x, conv, norm, name, quantized_input=quantized_input, int_bias=int_bias)
    return act_quant(ctx, y, out_act, f"{norm_name}.out_act", axis=1, rank=4, feeds="Add")
