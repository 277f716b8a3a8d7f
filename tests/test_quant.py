"""LSQ+ quantizers, distribution alignment, quantize()/calibrate() (QDETR_METHOD.md §1-§2)."""

from __future__ import annotations

import pytest
import torch

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.quant import (
    ActQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    act_quantizers,
    calibrate,
    fake_quant_act,
    fake_quant_weight,
    int_range,
    quantize,
)
from qdetr_deploy.quant.align import DistributionAlignment, normalize_per_token
from qdetr_deploy.quant.lsq import act_codes, weight_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_fake_quant_on_grid_and_idempotent(bits: int) -> None:
    torch.manual_seed(bits)
    w, alpha = torch.randn(7, 13), torch.rand(7, 1) * 0.3 + 0.01
    qn, qp = int_range(bits, signed=True)
    w_hat = fake_quant_weight(w, alpha, qn, qp)
    codes = weight_codes(w, alpha, qn, qp)
    assert torch.equal(codes, torch.round(codes)) and codes.min() >= qn and codes.max() <= qp
    assert torch.equal(w_hat, codes * alpha)  # exactly what a DequantizeLinear computes
    assert torch.equal(fake_quant_weight(w_hat, alpha, qn, qp), w_hat)


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (3, False), (4, True), (4, False), (8, False)])
def test_act_fake_quant_on_grid_and_idempotent(bits: int, signed: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 33) * 3
    alpha, z = torch.tensor(0.37), torch.tensor(1.3)  # z is rounded to 1 inside
    qn, qp = int_range(bits, signed)
    x_hat = fake_quant_act(x, alpha, z, qn, qp)
    codes = x_hat / alpha + 1
    assert torch.allclose(codes, torch.round(codes), atol=1e-5)
    assert codes.min() >= qn - 1e-5 and codes.max() <= qp + 1e-5
    assert torch.equal(fake_quant_act(x_hat, alpha, z, qn, qp), x_hat)
    assert torch.equal(act_codes(x, alpha, z, qn, qp), torch.round(codes))


def test_round_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    out = fake_quant_act(x, torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_integer_range_and_sign_rule() -> None:
    assert int_range(4, True) == (-8, 7) and int_range(4, False) == (0, 15)
    relu_out = torch.relu(torch.randn(2, 8, 5, 5))
    q = ActQuantizer(4, sign_rule="auto")
    q(relu_out)
    assert not bool(q.signed) and q.qrange() == (0, 15)
    q2 = ActQuantizer(4, sign_rule="auto")
    q2(torch.randn(2, 8, 5, 5))
    assert bool(q2.signed) and q2.qrange() == (-8, 7)


def test_gradients_reach_weights_and_steps() -> None:
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(3, 5, 3), 4, 4, False, "auto")
    x = torch.randn(2, 3, 9, 9)
    conv(x).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.alpha.grad is not None and conv.alpha.grad.abs().sum() > 0
    assert conv.act.alpha.grad is not None and conv.act.alpha.grad.abs().sum() > 0
    assert conv.act.zero_point.grad is not None


def test_lsq_plus_initialisation() -> None:
    x = torch.randn(1000) * 2
    q = ActQuantizer(4, sign_rule="signed")
    q.init_lsq_plus(x)
    qn, qp = q.qrange()
    alpha = 2 * x.abs().mean() / qp**0.5
    assert torch.allclose(q.alpha, alpha.reshape(1))
    assert torch.allclose(q.zero_point, (0.1 * (x.min() - alpha * qn)).reshape(1))
    lin = QuantLinear.from_float(torch.nn.Linear(16, 4), 4, 4, False, "auto")
    expected = 2 * lin.weight.detach().abs().mean(1, keepdim=True) / 7**0.5
    assert torch.allclose(lin.alpha, expected)


def test_distribution_alignment_statistics() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 3, 7, 32) * 5 + 2
    normed = normalize_per_token(q)
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 3, 7), atol=1e-5)
    assert torch.allclose(normed.var(-1, unbiased=True), torch.ones(2, 3, 7), atol=1e-3)
    da = DistributionAlignment(32)
    assert da.scale.shape == (1, 1, 1, 32) and da.bias.shape == (32,)
    assert torch.allclose(da(q), normed)


def _tiny(bits: str = "4-4-8", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits(bits, **kw))


def test_quantize_swaps_the_right_layers() -> None:
    model = _tiny(da="both")
    body = model.backbone[0].body
    assert isinstance(body.conv1, QuantConv2d) and body.conv1.w_bits == 8 and body.conv1.act.bits == 8
    assert isinstance(body.layer1[0], QuantConv2d) and body.layer1[0].w_bits == 4
    assert type(model.input_proj) is torch.nn.Conv2d
    assert type(model.class_embed) is torch.nn.Linear
    enc = model.transformer.encoder.layers[0]
    dec = model.transformer.decoder.layers[0]
    assert isinstance(enc.linear1, QuantLinear) and isinstance(enc.self_attn.out_proj, QuantLinear)
    assert isinstance(dec.multihead_attn, QuantMultiheadAttention)
    assert enc.self_attn.norm_q is None
    assert dec.self_attn.norm_q is not None and dec.multihead_attn.norm_q is not None
    assert dec.self_attn.q_act.bits == 8 and dec.self_attn.query_act.bits == 4
    names = dict(model.named_parameters())
    for key in ("transformer.decoder.layers.0.self_attn.norm_q.scale",
                "transformer.encoder.layers.0.linear1.alpha",
                "transformer.encoder.layers.0.linear1.act.alpha",
                "transformer.encoder.layers.0.linear1.act.zero_point",
                "transformer.decoder.layers.1.multihead_attn.attn_act.alpha"):
        assert key in names, key
    with pytest.raises(QDetrError):
        quantize(model, QuantConfig())


@pytest.mark.parametrize("placement", ["none", "self", "cross"])
def test_da_placement(placement: str) -> None:
    model = _tiny(da=placement)
    dec = model.transformer.decoder.layers[1]
    assert (dec.self_attn.norm_q is not None) == (placement == "self")
    assert (dec.multihead_attn.norm_q is not None) == (placement == "cross")


def test_per_channel_and_per_head_steps() -> None:
    model = _tiny(act_granularity="channel")
    attn = model.transformer.encoder.layers[0].self_attn
    assert attn.q_act.alpha.shape == (3,) and attn.query_act.alpha.shape == (96,)
    model.eval()(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("method", ["lsq+", "minmax", "percentile"])
def test_calibrate_initialises_every_quantizer(method: str) -> None:
    model = _tiny()
    batches = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    calibrate(model, batches, method=method, progress=False)
    for name, q in act_quantizers(model):
        assert q.initialised, name
        assert torch.all(q.alpha > 0), name
    out = model.eval()(batches[0])
    assert torch.isfinite(out["pred_boxes"]).all()


def test_bad_config_values() -> None:
    with pytest.raises(QDetrError, match="w_bits=5"):
        QuantConfig.from_bits("5-4-8")
    with pytest.raises(QDetrError):
        QuantConfig(da="encoder")
    with pytest.raises(QDetrError):
        QuantConfig.from_bits("4bit")
    with pytest.raises(QDetrError, match="residual_bits=5"):
        QuantConfig(residual_bits=5)
    cfg = QuantConfig.from_bits("3-3-8", da="cross", residual_bits=8)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    legacy = cfg.to_dict()
    del legacy["residual_bits"]  # a checkpoint written before the field existed
    assert QuantConfig.from_dict(legacy).residual_bits is None


def test_residual_quantizer_on_resnet_blocks() -> None:
    """residual_bits=8: the last batch norm of every ResNet block quantizes its output (the residual
    branch, before the add) and the block its own output (the next add's identity input), per tensor, on
    the 8-bit grid; upstream parameter names are kept."""
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_r18")), QuantConfig.from_bits("4-4-8", residual_bits=8))
    block = model.backbone[0].body.layer2[0]
    assert block.bn2.out_act.bits == 8 and not hasattr(block.bn1, "out_act") and block.out_act.bits == 8
    assert {"weight", "bias", "running_mean", "running_var"} <= set(dict(block.bn2.named_buffers()))
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False)
    model.eval()
    seen = {}
    block.bn2.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))  # the block adds in place
    model(torch.randn(1, 3, 64, 64))
    p = block.bn2.out_act.qparams()
    codes = seen["out"] / p.step + p.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= p.qmin and codes.max() <= p.qmax
    out = block(torch.relu(torch.randn(1, 64, 16, 16)))
    p = block.out_act.qparams()
    codes = out / p.step + p.zero_point
    assert not p.signed and torch.allclose(codes, codes.round(), atol=1e-3) and codes.max() <= p.qmax


def test_presets_and_conv_bias_config() -> None:
    """quantize --preset: "onnxruntime" = residual_bits 8 + conv_bias int32 + downsample_bits 8 + shared
    block inputs + input_proj_bits 8, "paper" = the method's placement; explicit fields override the
    preset (residual_bits "none" turns the sharing off, which needs it); checkpoints from before these
    fields load as the paper."""
    ort_cfg = QuantConfig.from_preset("onnxruntime", "4-4-8")
    assert (ort_cfg.residual_bits, ort_cfg.conv_bias, ort_cfg.act_zero_point) == (8, "int32", "learned")
    assert (ort_cfg.downsample_bits, ort_cfg.shared_block_input, ort_cfg.input_proj_bits) == (8, True, 8)
    assert QuantConfig.from_preset("paper", "4-4-8") == QuantConfig.from_bits("4-4-8")
    over = QuantConfig.from_preset("onnxruntime", "8-8-8", residual_bits="none", conv_bias=None,
                                   downsample_bits="none")
    assert over.residual_bits is None and over.conv_bias == "int32" and over.bits == "8-8-8"
    assert over.downsample_bits is None and not over.shared_block_input
    with pytest.raises(QDetrError, match="shared_block_input needs residual_bits"):
        QuantConfig(shared_block_input=True)
    with pytest.raises(QDetrError, match="downsample_bits=5"):
        QuantConfig(downsample_bits=5)
    with pytest.raises(QDetrError, match="unknown preset"):
        QuantConfig.from_preset("tflite")
    with pytest.raises(QDetrError, match="conv_bias"):
        QuantConfig(conv_bias="int16")
    legacy = ort_cfg.to_dict()
    for key in ("conv_bias", "downsample_bits", "shared_block_input", "input_proj_bits"):
        del legacy[key]
    old = QuantConfig.from_dict(legacy)
    assert (old.conv_bias, old.downsample_bits, old.shared_block_input, old.input_proj_bits) == (
        "float", None, False, None)


def test_shared_block_input_reads_the_codes_it_is_given() -> None:
    """shared_block_input: a block's first conv does not quantize its input again (the previous block's
    quantizer did), its gradient still reaches that quantizer's step, and the stem's pooling output is
    quantized: pooling the quantized stem equals quantizing the pooled stem (both monotone)."""
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_r18")), QuantConfig.from_preset("onnxruntime", "4-4-8"))
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False)
    body = model.backbone[0].body
    block, prev = body.layer2[0], body.layer1[1]
    assert block.conv1.shared_input and block.conv1.act is prev.out_act
    assert model.input_proj.shared_input and model.input_proj.act is body.layer4[1].out_act
    x = prev(body.layer1[0](body.maxpool(body.relu(body.bn1(body.conv1(torch.randn(1, 3, 64, 64)))))))
    direct = torch.nn.functional.conv2d(x, block.conv1.quant_weight(), None, block.conv1.stride,
                                        block.conv1.padding)
    assert torch.equal(block.conv1(x), direct)
    block.conv1(x).sum().backward()
    assert prev.out_act.alpha.grad is not None and prev.out_act.alpha.grad.abs().sum() > 0
    y = body.relu(body.bn1(body.conv1(torch.randn(1, 3, 64, 64))))
    pooled = torch.nn.functional.max_pool2d(body.maxpool.out_act(y), 3, 2, 1)
    assert torch.equal(body.maxpool(y), pooled)


def test_int32_conv_bias_on_the_grid_with_straight_through_gradient() -> None:
    """conv_bias="int32": in eval mode the batch norm after a quantized conv outputs y * scale + b with b on
    the grid x_step * w_step * scale (integer multiples); in training mode (batch statistics) it adds the
    same rounding; the gradient reaches the batch norm's parameters straight through the rounding. Before
    calibration (observing) the norm is transparent."""
    from qdetr_deploy.quant.int_bias import IntBiasBatchNorm2d, bias_grid, deployed_affine

    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits("4-4-8", conv_bias="int32"))
    body = model.backbone[0].body
    norm, conv = body.layer1[1], body.layer1[0]
    assert isinstance(norm, IntBiasBatchNorm2d) and norm.bias_conv is conv
    with torch.no_grad():
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 2.0)
        norm.bias.normal_(0, 0.2)
    conv.act.start_observing()
    assert bias_grid(norm) is None  # calibration: the float model
    conv.act.observer = None
    calibrate(model, [torch.randn(2, 3, 64, 64)], progress=False)
    grid = bias_grid(norm)
    scale, shift = deployed_affine(norm)
    x = torch.randn(1, 64, 8, 8)
    assert torch.equal(shift, torch.round(shift / grid) * grid) and not torch.equal(shift, norm.bias)
    w_step = conv.alpha.detach().abs().reshape(-1)
    assert torch.allclose(grid, conv.act.alpha.detach().abs() * w_step * scale)
    model.eval()
    assert torch.equal(norm(x), x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
    model.train()
    stats = norm.running_mean.clone()
    plain = torch.nn.functional.batch_norm(x, stats.clone(), norm.running_var.clone(), norm.weight, norm.bias,
                                           True, norm.momentum, norm.eps)
    out = norm(x)
    with torch.no_grad():
        exact = norm.bias - stats * scale  # the running-statistics fold before rounding
    assert torch.allclose(out - plain, (shift - exact).reshape(1, -1, 1, 1).expand_as(out), atol=1e-6)
    model.eval()
    norm.zero_grad()
    (norm(x) * torch.randn_like(x)).sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None and norm.bias.grad.abs().sum() > 0
    assert conv.alpha.grad is None or conv.alpha.grad.abs().sum() == 0  # the grid is detached


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_gradients_are_the_analytic_ones(bits: int) -> None:
    """Esser et al.'s LSQ gradients, in-range mask on the continuous x / a + z (clamp before round)."""
    torch.manual_seed(bits)
    x = torch.randn(3, 200) * 2
    qn, qp = int_range(bits, signed=True)
    alpha = torch.tensor([0.31, 0.47, 0.9]).reshape(3, 1)
    for zp in (0.0, 1.2):  # 1.2: the integer zero point 1 (LSQ+), gradient through the STE round
        xs, a, z = x.clone().requires_grad_(), alpha.clone().requires_grad_(), torch.full((3, 1), zp)
        z.requires_grad_()
        g = 0.5
        fake_quant_act(xs, a, z, qn, qp, g).sum().backward()
        zi = torch.round(z.detach())
        v = x / alpha
        below, above = v + zi < qn, v + zi > qp
        inside = ~(below | above)
        d_alpha = torch.where(below, qn - zi, torch.where(above, qp - zi, torch.round(v) - v))
        assert torch.equal(xs.grad, inside.float())
        assert torch.allclose(a.grad, g * d_alpha.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
        assert torch.allclose(z.grad, g * (-alpha * (~inside)).sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
        # the band half a step beyond the range is out of range for the gradient (the bug this fixes)
        band = (v + zi > qp) & (torch.round(v) + zi <= qp)
        assert band.any() and not xs.grad[band].any()
    w, aw = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    fake_quant_weight(w, aw, qn, qp).sum().backward()
    v = x / alpha
    inside = (v >= qn) & (v <= qp)
    d_alpha = torch.where(v < qn, float(qn), torch.where(v > qp, float(qp), torch.round(v) - v))
    assert torch.equal(w.grad, inside.float())
    assert torch.allclose(aw.grad, d_alpha.sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_lsq_forward_unchanged_by_the_custom_backward() -> None:
    """Forward bit-identical to clamp(round(x / a) + z) (the export's arithmetic)."""
    torch.manual_seed(0)
    x, a, z = torch.randn(4, 8, 16) * 3, torch.rand(1, 8, 1) + 0.05, torch.round(torch.randn(1, 8, 1))
    for qn, qp in (int_range(2, True), int_range(4, False), int_range(8, True)):
        ref = (torch.clamp(torch.round(x / a) + z, qn, qp) - z) * a
        assert torch.equal(fake_quant_act(x, a, z, qn, qp), ref)
        assert torch.equal(fake_quant_weight(x, a, qn, qp), torch.clamp(torch.round(x / a), qn, qp) * a)
