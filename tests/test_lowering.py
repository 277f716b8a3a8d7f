"""The ONNX export's lowering rules (qdetr_deploy/export/lower): one rule per module kind, so that the graph
follows the model's own modules; and the per-channel activation Q/DQ of export/folding.py, run through
ONNX Runtime.

The rule tests walk every module of the built models (float and quantized, each backbone kind) and fail
when a module kind has no rule and is not consumed by the rule above it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from test_export import SIZE, one_torch_thread  # noqa: F401 (autouse fixture)
from torch import nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.folding import Ctx, act_quant
from qdetr_deploy.export.graph import GraphBuilder
from qdetr_deploy.export.lower import RULES, missing_rules
from qdetr_deploy.export.lower.registry import CONSUMES, lower
from qdetr_deploy.export.onnx_export import build_onnx
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.models.attention import MultiheadAttention
from qdetr_deploy.quant import QuantConfig, quantize
from qdetr_deploy.quant.lsq import act_codes
from qdetr_deploy.quant.quantizers import ActQuantizer

MODELS = {  # name -> (preset, QuantConfig kwargs or None for float)
    "detr_tiny float": ("detr_tiny", None),
    "detr_tiny 4-4-8": ("detr_tiny", {}),
    "detr_tiny 2-2-8 per channel, DA both": ("detr_tiny", {"act_granularity": "channel", "da": "both"}),
    "detr_r18 float": ("detr_r18", None),
    "detr_r18 4-4-8 residual_bits 8": ("detr_r18", {"residual_bits": 8}),
    "detr_r50 4-4-8": ("detr_r50", {}),
    "detr_r50 4-4-8 residual_bits 8, zero points 0": ("detr_r50", {"residual_bits": 8,
                                                                  "act_zero_point": "zero"}),
}


def _build(preset: str, qkw: dict | None) -> nn.Module:
    torch.manual_seed(0)
    model = build_detr(get_preset(preset)).eval()
    return model if qkw is None else quantize(model, QuantConfig.from_bits("4-4-8", **qkw))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_module_kind_has_a_rule(name: str) -> None:
    """Every module of the built model has a lowering rule or is consumed by the rule that lowers its
    parent (the nearest ancestor with a rule)."""
    model = _build(*MODELS[name])
    assert missing_rules(model) == []


def _must_lower(model: nn.Module) -> set[str]:
    """Names of the modules whose own rule must run: those with a rule that the rule above does not
    consume."""
    names: set[str] = set()

    def walk(module: nn.Module, name: str, owner: type | None) -> None:
        kind = type(module)
        if kind in RULES and not (owner is not None and kind in CONSUMES[owner]):
            names.add(name)
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, kind if kind in RULES else owner)

    walk(model, "", None)
    return names


@pytest.mark.parametrize("conv_bias", ["float", "int32"])
@pytest.mark.parametrize("name", ["detr_tiny 4-4-8", "detr_r18 float", "detr_r18 4-4-8 residual_bits 8",
                                  "detr_r50 4-4-8"])
def test_export_runs_each_module_through_its_rule(name: str, conv_bias: str) -> None:
    """Building the graph calls the rule of every module that its parent's rule does not consume, each
    once: the graph follows the model's modules, none skipped, none lowered twice (with int32 conv biases
    the tiny backbone is one chain of QLinearConvs, lowered by its body's rule)."""
    model = _build(*MODELS[name])
    for q in (m for m in model.modules() if isinstance(m, ActQuantizer)):
        q.init_state.fill_(1)  # step 1, zero point 0: enough to build the graph
    _, ctx = build_onnx(model, SIZE, conv_bias=conv_bias)
    assert sorted(ctx.lowered) == sorted(_must_lower(model))


class _Gelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x)


class _OtherAttention(MultiheadAttention):
    """A subclass that could change the forward: lookup is by exact class, so it needs its own rule."""


def test_module_kind_without_a_rule_is_refused() -> None:
    model = _build("detr_tiny", None)
    model.transformer.encoder.layers[0].extra = _Gelu()
    layer = model.transformer.decoder.layers[1]
    layer.self_attn.__class__ = _OtherAttention
    missing = missing_rules(model)
    assert [n for n, _ in missing] == ["transformer.encoder.layers.0.extra",
                                       "transformer.decoder.layers.1.self_attn"]
    with pytest.raises(QDetrError, match="no ONNX lowering rule for .*_Gelu.*_OtherAttention") as err:
        build_onnx(model, SIZE)
    assert "\n" not in str(err.value)


# --- per-channel activation Q/DQ: the Clip decided per channel ----------------------------------------------

def _per_channel_quantizer(bits: int, signed: bool, steps: list[float],
                           zero_points: list[float]) -> ActQuantizer:
    act = ActQuantizer(bits, len(steps), 1, "signed" if signed else "auto")
    with torch.no_grad():
        act.alpha.copy_(torch.tensor(steps))
        act.zero_point.copy_(torch.tensor(zero_points))
        act.signed.fill_(signed)
        act.init_state.fill_(1)
    return act.eval()


@pytest.mark.parametrize(("bits", "signed", "zero_points"), [(3, True, [0, -12]), (3, False, [0, 12]),
                                                             (4, True, [3, -5]), (2, True, [0, 0])])
@pytest.mark.parametrize(("container", "conv_bias"), [("int4", "float"), ("int8", "float"),
                                                      ("int4", "int32")])
def test_per_channel_zero_points_clip_each_channel(bits: int, signed: bool, zero_points: list[float],
                                                   container: str, conv_bias: str) -> None:
    """A per-channel quantizer (channels on axis 1 of NCHW, feeding a conv) exported alone and run by ONNX
    Runtime gives exactly the fake-quant output and codes in every channel. 3-bit signed with zero points
    [0, -12] is the case a Clip decided from the min/max of the channels' shifts got wrong (INT4 with no
    Clip: channel 0's codes saturated at the dtype's ends instead of the quantizer's [-4, 3])."""
    act = _per_channel_quantizer(bits, signed, [0.5, 0.25], zero_points)
    ctx = Ctx(GraphBuilder(21), "onnxruntime", container, conv_bias=conv_bias)
    out = act_quant(ctx, "x", act, "q", axis=1, rank=4, feeds="Conv")
    rec = ctx.g.acts[0]
    assert rec.mode != "float" and rec.axis == 1, rec
    codes_i32 = ctx.g.node("Cast", [rec.codes], "codes/Cast", to=TensorProto.INT32)
    proto = ctx.g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, None, 1])],
                        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 2, None, 1]),
                         helper.make_tensor_value_info(codes_i32, TensorProto.INT32, [1, 2, None, 1])])
    onnx.checker.check_model(proto, full_check=True)
    # per channel, x/step from 4 codes below the quantizer's range to 4 above, in eighths of a step: every
    # code, the rounding points between them and the saturation on both sides
    qn, qp = act.qrange()
    ticks = np.arange((qn - 4) * 8, (qp + 5) * 8, dtype=np.float32) / 8
    x = np.stack([step * (ticks - z) for step, z in zip([0.5, 0.25], zero_points)])[None, :, :, None]
    y, codes = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    xt = torch.from_numpy(x)
    with torch.no_grad():
        expected = act(xt).numpy()
    view = lambda t: t.reshape(1, -1, 1, 1)  # noqa: E731
    torch_codes = act_codes(xt, view(act.alpha.detach()), view(act.zero_point.detach()), qn, qp).numpy()
    shift = np.asarray(rec.shift).reshape(1, -1, 1, 1)
    assert np.array_equal(codes - shift, torch_codes)
    assert np.array_equal(y, expected)
    for c, z in enumerate(zero_points):  # each channel reaches exactly its own code range
        assert torch_codes[0, c].min() == qn and torch_codes[0, c].max() == qp, (c, z)


@pytest.mark.parametrize("opset", [16, 17, 21])
def test_distribution_alignment_matches_pytorch(opset: int) -> None:
    """DA (quant/align.py) lowered alone: from opset 17 one LayerNormalization with the unbiased variance
    folded into its epsilon and scale, before that spelled out; both give PyTorch's output on random
    queries of an awkward head size (d = 24, values far from zero mean and unit variance)."""
    from qdetr_deploy.export.lower.registry import LowerCtx
    from qdetr_deploy.quant.align import DistributionAlignment

    torch.manual_seed(0)
    da = DistributionAlignment(24, eps=1e-3)
    with torch.no_grad():
        da.scale.normal_(1.0, 0.3)
        da.bias.normal_(0.0, 0.5)
    ctx = LowerCtx(GraphBuilder(opset), "onnxruntime", "int8", names={da: "da"})
    out = lower(ctx, da, "q")
    ops = {n.op_type for n in ctx.g.nodes}
    assert (ops == {"LayerNormalization"}) if opset >= 17 else ("LayerNormalization" not in ops), ops
    proto = ctx.g.model([helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 3, 7, 24])],
                        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3, 7, 24])])
    q = (torch.randn(1, 3, 7, 24) * 4 + 3) * torch.rand(1, 3, 7, 1)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"q": q.numpy()})[0]
    with torch.no_grad():
        expected = da(q).numpy()
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5)
