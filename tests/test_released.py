"""The released Q-DETR checkpoint format: a quantized SMCA-DETR, proven equal to the released code.

Parity protocol (../shared/data/qdetr_released_fixture/FIXTURE.md section 3): the fixture checkpoint's
float32 tensors and input images upcast to float64; the forward must reproduce the released code's float64
outputs (``expected_4bit.npz`` at 4-4-8, ``expected_4bit_file_as_2bit.npz``: the same file at 2-2-8).
Float32 drift against the released float32 run is printed, not asserted (rounding flips, FIXTURE.md 3).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qdetr_deploy.checkpoints import load_checkpoint
from qdetr_deploy.models import sigmoid_topk
from qdetr_deploy.quant import QuantConfig
from tests.conftest import shared_path

EXPECTED = {"4-4-8": "expected_4bit.npz", "2-2-8": "expected_4bit_file_as_2bit.npz"}


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    return shared_path("data", "qdetr_released_fixture")


@pytest.fixture(scope="module")
def inputs(fixture_dir: Path) -> dict[str, torch.Tensor]:
    npz = np.load(fixture_dir / "inputs.npz", allow_pickle=False)
    return {k: torch.from_numpy(npz[k]) for k in ("images", "mask", "size", "orig_size")}


def released_model(fixture_dir: Path, bits: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    ckpt = load_checkpoint(fixture_dir / "smca_small_4bit.pth", quant_config=QuantConfig.from_bits(bits))
    return ckpt.model.to(dtype).eval()


def run_with_intermediates(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor
                           ) -> tuple[dict, dict[str, np.ndarray]]:
    """Outputs and the fixture's ``dbg_*`` intermediates, captured by forward hooks."""
    dbg: dict[str, list] = {}
    body = model.backbone[0].body
    decoder, encoder_layers = model.transformer.decoder, model.transformer.encoder.layers

    def keep(name, fn=lambda out: out):
        return lambda _m, _i, out: dbg.setdefault(name, []).append(fn(out))

    hooks = [body.maxpool.register_forward_hook(keep("stem")),
             body.layer1[0].register_forward_hook(keep("layer1.0")),
             *(getattr(body, f"layer{i}").register_forward_hook(keep(f"layer{i}")) for i in (1, 2, 3)),
             body.layer4.register_forward_hook(keep("backbone_out")),
             model.backbone.register_forward_hook(keep("joiner")),
             model.input_proj.register_forward_hook(keep("input_proj_out")),
             *(layer.register_forward_hook(keep("encoder_layer_out")) for layer in encoder_layers),
             *(layer.register_forward_hook(keep("decoder_layer")) for layer in decoder.layers),
             *(layer.prior.register_forward_hook(keep("gaussian")) for layer in decoder.layers)]
    try:
        with torch.no_grad():
            out = model(images, mask)
    finally:
        for h in hooks:
            h.remove()
    arrays = {f"dbg_{k}": dbg[k][0]
              for k in ("stem", "layer1.0", "layer1", "layer2", "layer3", "backbone_out", "input_proj_out")}
    for k in ("stem", "layer1.0", "layer1", "layer2", "layer3"):
        x = arrays.pop(f"dbg_{k}")
        arrays[f"dbg_{k}_channel_mean"] = x.mean((2, 3))
        arrays[f"dbg_{k}_crop"] = x[:, :, :6, :6]
    _, feat_mask, pos = dbg["joiner"][0]
    arrays.update(dbg_feature_mask=feat_mask, dbg_pos_embed=pos)
    arrays["dbg_encoder_layer_out"] = torch.stack(dbg["encoder_layer_out"])
    arrays["dbg_memory"] = dbg["encoder_layer_out"][-1]
    arrays["dbg_decoder_layer_out_prenorm"] = torch.stack([o[0] for o in dbg["decoder_layer"]])
    arrays["dbg_hs"] = out["hs"]
    arrays["dbg_ref_logits"] = dbg["decoder_layer"][0][1]
    arrays["dbg_ref_grid_units"] = dbg["decoder_layer"][0][2].repeat(1, 1, 8)
    g = torch.stack(dbg["gaussian"])  # [L,B,h,Nq,HW] -> [L,Nq,HW,B*h]
    arrays["dbg_gaussian"] = g.permute(0, 3, 4, 1, 2).flatten(3)
    return out, {k: v.numpy() for k, v in arrays.items()}


def sorted_detections(out: dict, orig_size: torch.Tensor) -> dict[str, np.ndarray]:
    """sigmoid_topk, ordered by score descending, ties by flat index ascending (FIXTURE.md pp_sorted_*)."""
    scores, labels, boxes, index = (t.numpy() for t in sigmoid_topk(out["pred_logits"], out["pred_boxes"],
                                                                     orig_size))
    order = np.stack([np.lexsort((i, -s)) for s, i in zip(scores, index)])
    pick = lambda a: np.take_along_axis(a, order if a.ndim == 2 else order[..., None], 1)  # noqa: E731
    return {"pp_sorted_scores": pick(scores), "pp_sorted_labels": pick(labels),
            "pp_sorted_boxes": pick(boxes), "pp_sorted_flat_index": pick(index),
            "pp_sorted_query_index": pick(index) // out["pred_logits"].shape[-1]}


def flat_outputs(out: dict) -> dict[str, np.ndarray]:
    aux = out["aux_outputs"]
    return {"pred_logits": out["pred_logits"].numpy(), "pred_boxes": out["pred_boxes"].numpy(),
            "aux_pred_logits": torch.stack([a["pred_logits"] for a in aux]).numpy(),
            "aux_pred_boxes": torch.stack([a["pred_boxes"] for a in aux]).numpy(),
            "feature_s_hs5": out["hs"][5].numpy()}


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("bits", ["4-4-8", "2-2-8"])
def test_float64_parity_with_released_code(fixture_dir, inputs, bits):
    expected = np.load(fixture_dir / EXPECTED[bits], allow_pickle=False)
    model = released_model(fixture_dir, bits)
    out, dbg = run_with_intermediates(model, inputs["images"].double(), inputs["mask"])
    got = {**flat_outputs(out), **sorted_detections(out, inputs["orig_size"]), **dbg}
    report = []
    for key in ("pred_logits", "pred_boxes", "aux_pred_logits", "aux_pred_boxes", "feature_s_hs5",
                "pp_sorted_scores"):
        d = max_abs(got[key], expected[key])
        report.append(f"{key} {d:.3g}")
        assert d <= 1e-6, (bits, key, d)
    for key in ("pp_sorted_labels", "pp_sorted_flat_index", "pp_sorted_query_index"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{bits} {key}")
    boxes = expected["pp_sorted_boxes"]
    rel = np.abs(got["pp_sorted_boxes"] - boxes) / np.abs(boxes).clip(1)
    report.append(f"pp_sorted_boxes rel {rel.max():.3g}")
    assert rel.max() <= 1e-6, (bits, rel.max())
    dbg_keys = sorted(k for k in expected if k.startswith("dbg_") and not k.endswith("_shape"))
    assert set(dbg_keys) <= set(got), set(dbg_keys) - set(got)
    for key in dbg_keys:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=f"{bits} {key}")
        report.append(f"{key} {max_abs(got[key], expected[key]):.2g}")
    print(f"\nparity {bits} (max |d|): " + ", ".join(report))


def test_float32_drift_is_reported(fixture_dir, inputs):
    """The released code's own float32 forward is chaotic (FIXTURE.md 3): the drift is printed only."""
    expected = np.load(fixture_dir / "expected_4bit_fp32.npz", allow_pickle=False)
    model = released_model(fixture_dir, "4-4-8", torch.float32)
    with torch.no_grad():
        got = flat_outputs(model(inputs["images"], inputs["mask"]))
    per_image = [max_abs(got["pred_logits"][i], expected["pred_logits"][i]) for i in range(2)]
    assert np.isfinite(per_image).all()
    print(f"\nfloat32 drift vs released float32 run: pred_logits max |d| per image {per_image}, "
          f"pred_boxes {max_abs(got['pred_boxes'], expected['pred_boxes']):.3g}")


def test_any_batch_size(fixture_dir, inputs):
    """Batch 1 and 3 (the released forward only runs batch 2): an image gives the same outputs alone at the
    same padded canvas, and in a batch of three; alone at its own size it runs too."""
    expected = np.load(fixture_dir / "expected_4bit.npz", allow_pickle=False)
    model = released_model(fixture_dir, "4-4-8")
    images, mask = inputs["images"].double(), inputs["mask"]
    with torch.no_grad():
        alone = flat_outputs(model(images[:1], mask[:1]))
        three = flat_outputs(model(images[[1, 0, 1]], mask[[1, 0, 1]]))
        h, w = inputs["size"][1].tolist()
        own = model(images[1:2, :, :h, :w], mask[1:2, :h, :w])
    for key in ("pred_logits", "pred_boxes"):
        assert max_abs(alone[key][0], expected[key][0]) <= 1e-6, key
        for row, i in enumerate((1, 0, 1)):
            assert max_abs(three[key][row], expected[key][i]) <= 1e-6, (row, key)
    assert own["pred_logits"].shape == (1, 20, 92) and torch.isfinite(own["pred_boxes"]).all()


# -- the architecture and its quantizer placement -----------------------------------------------------------

def _key_table(path: Path) -> dict[str, list[str]]:
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]
    return {r[0]: r for r in rows}


@pytest.mark.parametrize("preset, table",
                         [("smca_small", "keys_4bit.tsv"), ("smca_r50", "keys_full_r50_4bit.tsv")])
def test_released_keys_map_one_to_one(fixture_dir, preset, table):
    """Every key of the quantized model is a released key of the same size, and every key the released
    forward uses is one of the model's (the other released keys are aliases and unused quantizers)."""
    from qdetr_deploy.models import build_smca_detr, get_preset
    from qdetr_deploy.quant import quantize
    from qdetr_deploy.released import released_quant_config

    with torch.device("meta"):
        model = quantize(build_smca_detr(get_preset(preset)), released_quant_config("4-4-8"))
    keys = _key_table(fixture_dir / table)
    own = model.state_dict()
    assert set(own) <= set(keys), sorted(set(own) - set(keys))[:5]
    used = {k for k, row in keys.items() if row[3] == "yes"}
    assert used <= set(own), sorted(used - set(own))[:5]
    assert all(own[k].numel() == int(np.prod(eval(keys[k][1]))) for k in own)  # noqa: S307 (shape lists)


def test_quantizer_placement():
    """The released placement: 8-bit stem, n-bit bottleneck convs and FFN, weight-only self-attention
    projections, float cross-attention projections and downsample, 8-bit per-head q/k/v/attn quantizers,
    DA in decoder self-attention only."""
    from qdetr_deploy.models import build_smca_detr, get_preset
    from qdetr_deploy.quant import ActQuantizer, DistributionAlignment, QuantConv2d, QuantLinear, quantize
    from qdetr_deploy.quant.modules import WeightQuantLinear
    from qdetr_deploy.released import released_quant_config

    with torch.device("meta"):
        model = quantize(build_smca_detr(get_preset("smca_small")), released_quant_config("2-2-8"))
    body = model.backbone[0].body
    assert isinstance(body.conv1, QuantConv2d) and body.conv1.w_bits == 8 and body.conv1.act.bits == 8
    block = body.layer2[0]
    assert all(isinstance(c, QuantConv2d) and c.w_bits == c.act.bits == 2
               for c in (block.conv1, block.conv2, block.conv3))
    assert type(block.downsample[0]) is torch.nn.Conv2d and type(model.input_proj) is torch.nn.Conv2d
    for layer in (*model.transformer.encoder.layers, *model.transformer.decoder.layers):
        assert isinstance(layer.linear1, QuantLinear) and layer.linear1.act.bits == 2
        sa = layer.self_attn
        assert isinstance(sa.in_proj, WeightQuantLinear) and isinstance(sa.out_proj, WeightQuantLinear)
        for slot in ("q_act", "k_act", "v_act", "attn_act"):
            q = getattr(sa, slot)
            assert isinstance(q, ActQuantizer) and q.bits == 8 and q.alpha.numel() == 8 and q.channel_dim == 1
    for layer in model.transformer.decoder.layers:
        ca = layer.multihead_attn
        assert type(ca.in_proj) is torch.nn.Linear and type(ca.out_proj) is torch.nn.Linear
        assert isinstance(ca.q_act, ActQuantizer) and isinstance(ca.attn_act, ActQuantizer)
        assert isinstance(layer.self_attn.norm_q, DistributionAlignment)
        assert isinstance(ca.norm_q, torch.nn.Identity)
        assert type(layer.point2) is torch.nn.Linear
    encoder = model.transformer.encoder.layers
    assert all(isinstance(layer.self_attn.norm_q, torch.nn.Identity) for layer in encoder)


def test_released_rounding_adds_the_zero_point_before_rounding():
    """x/a = 2.5 with zero point 1: released round(clamp(x/a + z)) = 4 -> 3a; ONNX-style round(x/a) + z = 3
    -> 2a. Only quantizers placed for the released SMCA-DETR use the released rule."""
    from qdetr_deploy.quant import fake_quant_act
    from qdetr_deploy.quant.lsq import fake_quant_act_shifted

    x, a, z = torch.tensor([2.5]), torch.tensor([1.0]), torch.tensor([1.0])
    assert fake_quant_act_shifted(x, a, z, 0, 15).item() == 3.0
    assert fake_quant_act(x, a, z, 0, 15).item() == 2.0


# -- loading ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixture_dir / "smca_small_4bit.pth", map_location="cpu", weights_only=True)["model"]


def test_unused_quantizers_are_never_read(fixture_dir, state, caplog):
    """The fixture's unused quantizer steps are NaN (uninitialised memory in published files): none reaches
    the model, and no key of the file is reported unknown."""
    from qdetr_deploy.released import _unused

    nan_keys = [k for k, v in state.items() if not torch.isfinite(v).all()]
    assert nan_keys and all(_unused(k) for k in nan_keys)
    model = released_model(fixture_dir, "4-4-8")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_unknown_keys_warn_missing_keys_fail(tmp_path, state, caplog):
    from qdetr_deploy.errors import QDetrError

    extra = tmp_path / "extra.pth"
    unknown = {"transformer.extra.weight": torch.zeros(2), "zz.bias": torch.zeros(1)}
    torch.save({"model": {**state, **unknown}}, extra)
    load_checkpoint(extra, quant_config=QuantConfig.from_bits("4-4-8"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 unknown key(s)" in warnings[0] and "zz.bias" in warnings[0]
    missing = tmp_path / "missing.pth"
    gone = "transformer.decoder.layers.3.linear2.act.signed"
    torch.save({"model": {k: v for k, v in state.items() if k != gone}}, missing)
    with pytest.raises(QDetrError, match=rf"missing\.pth: .*lacks {re.escape(gone)}, which"):
        load_checkpoint(missing, quant_config=QuantConfig.from_bits("4-4-8"))
    flags = tmp_path / "no_init_state.pth"  # train-only flags: not needed
    torch.save({"model": {k: v for k, v in state.items() if not k.endswith("init_state")}}, flags)
    model = load_checkpoint(flags, quant_config=QuantConfig.from_bits("4-4-8")).model
    assert all(b.item() == 1 for n, b in model.named_buffers() if n.endswith("init_state"))


def test_bits_from_flag_or_training_args(tmp_path, fixture_dir, state):
    """Zoo files store no bits (--bits required); training files pickle args (--trust-checkpoint, then
    args.n_bit gives the bits)."""
    import argparse

    from qdetr_deploy.errors import QDetrError

    with pytest.raises(QDetrError, match="--bits 4-4-8 or --bits 2-2-8"):
        load_checkpoint(fixture_dir / "smca_small_4bit.pth")
    with pytest.raises(QDetrError, match="same n bits"):
        load_checkpoint(fixture_dir / "smca_small_4bit.pth", quant_config=QuantConfig.from_bits("4-2-8"))
    train = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "args": argparse.Namespace(n_bit=2), "epoch": 49}, train)
    with pytest.raises(QDetrError, match="--trust-checkpoint"):
        load_checkpoint(train, quant_config=QuantConfig.from_bits("2-2-8"))
    ckpt = load_checkpoint(train, trust=True)
    assert ckpt.quant_config.bits == "2-2-8" and ckpt.meta["epoch"] == 49
    with pytest.raises(QDetrError, match="contradicts the checkpoint's args.n_bit = 2"):
        load_checkpoint(train, trust=True, quant_config=QuantConfig.from_bits("4-4-8"))


def test_cli_inspect_and_bad_files(tmp_path, fixture_dir):
    """inspect names what it found and counts the SMCA modules; a truncated file or absent --bits: one line,
    exit 2."""
    import json

    from click.testing import CliRunner

    from qdetr_deploy.cli import cli

    ckpt = fixture_dir / "smca_small_4bit.pth"
    args = ["inspect", str(ckpt), "--bits", "4-4-8", "--json", "--input-size", "64", "64"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"] == "quantized SMCA-DETR, released Q-DETR format, 4-4-8"
    layers = {r["name"]: r for r in report["layers"]}
    assert layers["transformer.encoder.layers.0.self_attn.in_proj"]["w_bits"] == 4
    assert layers["transformer.decoder.layers.0.multihead_attn.in_proj"]["w_bits"] == 32
    assert layers["transformer.decoder.layers.0.multihead_attn.matmul"]["w_bits"] == 8
    assert layers["backbone.0.body.conv1"]["w_bits"] == 8
    assert layers["transformer.decoder.layers.0.point1.layers.0"]["w_bits"] == 32
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpt.read_bytes()[: 10_000_000])
    for args, needle in (([str(truncated), "--bits", "4-4-8"], "truncated.pth: not a readable checkpoint"),
                         ([str(ckpt)], "pass --bits 4-4-8 or --bits 2-2-8")):
        result = CliRunner().invoke(cli, ["inspect", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert needle in lines[0] and "Traceback" not in result.output


def test_saves_and_reloads_in_our_format(tmp_path, fixture_dir):
    from qdetr_deploy.checkpoints import save_checkpoint

    model = released_model(fixture_dir, "2-2-8", torch.float32)
    path = save_checkpoint(model, tmp_path / "smca.safetensors")
    back = load_checkpoint(path)
    assert back.quant_config.bits == "2-2-8" and back.detr_config == model.config
    own, loaded = model.state_dict(), back.model.state_dict()
    assert own.keys() == loaded.keys() and all(torch.equal(own[k], loaded[k]) for k in own)
    assert all(q.round_after_shift for q in back.model.modules() if hasattr(q, "round_after_shift"))


class _TopK(torch.nn.Module):
    def forward(self, logits, boxes, sizes):
        return sigmoid_topk(logits, boxes, sizes)


def test_sigmoid_topk_exports_to_onnx(tmp_path):
    """The SMCA post-processing runs in ONNX Runtime with the same detections as in torch."""
    ort = pytest.importorskip("onnxruntime")
    gen = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 5, 7, generator=gen), torch.rand(2, 5, 4, generator=gen)
    sizes = torch.tensor([[480, 640], [640, 481]])
    path = tmp_path / "topk.onnx"
    torch.onnx.export(_TopK().eval(), (logits, boxes, sizes), str(path), dynamo=False, opset_version=17,
                      input_names=["logits", "boxes", "sizes"],
                      output_names=["scores", "labels", "xyxy", "index"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"logits": logits.numpy(), "boxes": boxes.numpy(), "sizes": sizes.numpy()})
    want = sigmoid_topk(logits, boxes, sizes)
    assert want[0].shape == (2, 5) and (want[0][:, :-1] >= want[0][:, 1:]).all()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(want[1].numpy(), want[3].numpy() % 7)
