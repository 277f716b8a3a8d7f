"""The per-layer ("teacher-forced") parity check of export/check.py.

PyTorch runs with every ActQuantizer's output replaced by ONNX Runtime's codes for it, so each layer is
compared given the same quantized inputs and a code flipped by float rounding cannot cascade. Real ONNX
Runtime sessions throughout; the tiny DETR (random weights, 64x64, batch 2) is calibrated on random images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from test_export import SIZE, one_torch_thread  # noqa: F401 (autouse fixture)
from test_export import quantized_tiny as _quantized_tiny

from qdetr_deploy.checkpoints import load_checkpoint, save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export import check
from qdetr_deploy.export.check import check_onnx, forced_forward, random_images
from qdetr_deploy.export.onnx_export import QUANTIZERS_KEY, build_onnx, export_onnx
from qdetr_deploy.quant.api import act_quantizers

FIRST = "backbone.0.body.conv1.act"  # its input is the image itself: identical on both sides
EARLY = "backbone.0.body.layer1.0.act"  # fed by conv1 -> relu only


def quantized_tiny(seed: int = 0, **kwargs) -> torch.nn.Module:
    """detr_tiny, random weights and batch-norm statistics, 4-4-8, calibrated on random images, eval."""
    return _quantized_tiny("4-4-8", seed, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """(model, its checkpoint, a clean export with static batch 2: the default flags, int8 container and
    conv biases on the int32 grid, which the model carries itself)."""
    root = tmp_path_factory.mktemp("forced")
    model = quantized_tiny(conv_bias="int32")
    ckpt = save_checkpoint(model, root / "tiny.safetensors", category_ids=[1, 2, 3],
                           meta={"stage": "quantized", "calibration": {"image_size": list(SIZE)}})
    result = export_onnx(load_checkpoint(ckpt), root / "clean.onnx", batch=2)
    return model, ckpt, result.path


def _records(proto: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in proto.metadata_props}[QUANTIZERS_KEY])


def _to_graph_codes(torch_codes: np.ndarray, rec: dict) -> np.ndarray:
    """PyTorch's codes in the graph's convention (plus the dtype shift, k transposed for "kT")."""
    shift = np.asarray(rec["shift"], np.int64)
    c = np.swapaxes(torch_codes, -1, -2) if rec["layout"] == "kT" else torch_codes
    if rec["axis"] is not None and shift.size > 1:
        shape = [1] * c.ndim
        shape[rec["axis"]] = -1
        shift = shift.reshape(shape)
    return c + shift


def _probe_codes(proto: onnx.ModelProto, records: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every quantizer's codes as ONNX Runtime computes them (the check's probe copy of the graph)."""
    probe = check._session(check._with_probes(proto, records).SerializeToString(), 1)
    names = [o.name for o in probe.get_outputs()]
    out = dict(zip(names, probe.run(None, {"images": x})))
    return {rec["module"]: out[f"probe/{rec['module']}"] for rec in records["acts"]}


def _with_initializer(path: Path, out: Path, name: str, change) -> Path:
    """A copy of the ONNX model at ``path`` with initializer ``name`` replaced by ``change(array)``."""
    proto = onnx.load(str(path))
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize(("granularity", "container"), [("tensor", "int4"), ("tensor", "int8"),
                                                         ("channel", "int8")])
def test_forcing_own_codes_is_bit_identical_to_fake_quant(granularity: str, container: str) -> None:
    """Forced with PyTorch's own codes (in the graph's convention: shifted, k transposed), every quantizer's
    output, the probabilities and the boxes are bit-identical to the plain fake-quant forward."""
    model = quantized_tiny(seed=2, act_granularity=granularity)
    proto, _ = build_onnx(model, SIZE, batch=2, weight_container=container)
    records = _records(proto)
    x = random_images(2, SIZE, seed=7)
    plain = forced_forward(model, x, {}, records, keep_outputs=True)  # nothing forced: outputs recorded
    assert set(plain["outputs"]) == {n for n, _ in act_quantizers(model)}
    own = {rec["module"]: _to_graph_codes(plain["codes"][rec["module"]], rec) for rec in records["acts"]}
    assert any(rec["layout"] == "kT" for rec in records["acts"])
    if container == "int8" and granularity == "tensor":  # 4-bit codes shifted into int8/uint8
        assert any(np.any(rec["shift"]) for rec in records["acts"])
    if granularity == "channel":  # per-channel steps, and float fake-quant fallbacks
        assert any(rec["axis"] is not None for rec in records["acts"])
        assert any(rec["mode"] == "float" for rec in records["acts"])
    forced = forced_forward(model, x, own, records, keep_outputs=True)
    for name, out in plain["outputs"].items():
        assert torch.equal(forced["outputs"][name], out), name
    assert np.array_equal(forced["prob"], plain["prob"]) and np.array_equal(forced["boxes"], plain["boxes"])
    for name, codes in plain["codes"].items():
        assert np.array_equal(forced["codes"][name], codes), name


def test_forcing_onnx_runtime_codes_of_a_clean_export(exported) -> None:
    """With ONNX Runtime's codes of a clean export: the first quantizer (same input on both sides) gives
    exactly its fake-quant output, and where all codes agree the whole forced forward is bit-identical."""
    model, _, path = exported
    proto = onnx.load(str(path))
    records = _records(proto)
    x = random_images(2, SIZE, seed=3)
    onnx_codes = _probe_codes(proto, records, x)
    plain = forced_forward(model, x, {}, records, keep_outputs=True)
    forced = forced_forward(model, x, onnx_codes, records, keep_outputs=True)
    assert torch.equal(forced["outputs"][FIRST], plain["outputs"][FIRST])
    for rec in records["acts"]:
        eq, total = check._compare_codes(onnx_codes[rec["module"]], plain["codes"][rec["module"]], rec)
        assert eq == total, rec["module"]  # this export and batch: no code flipped by float rounding
    for name, out in plain["outputs"].items():
        assert torch.equal(forced["outputs"][name], out), name
    assert np.array_equal(forced["prob"], plain["prob"]) and np.array_equal(forced["boxes"], plain["boxes"])


def test_clean_export_passes_both_criteria(exported) -> None:
    model, _, path = exported
    for criterion in ("layer", "end-to-end"):
        report = check_onnx(path, model, criterion=criterion)
        assert report.passed and not report.failures, report.table()
        assert report.layer_codes_equal == report.codes_compared > 100_000
        assert report.layer_prob_diff <= 1e-4 and report.layer_box_diff <= 1e-4
        assert report.layer_first_mismatch is None and report.layer_mismatches == []
        table = report.table()
        assert "end to end: max |prob diff|" in table and "per layer: max |prob diff|" in table
    with pytest.raises(QDetrError, match="criterion"):
        check_onnx(path, model, criterion="exact")


def test_a_few_flipped_codes_cascade_end_to_end_but_not_per_layer(exported, tmp_path: Path) -> None:
    """Nudge conv1's bias (channel 0) by the smallest amount that flips a few codes of the next quantizer
    (the stand-in for a value within float rounding of a code boundary): end to end the flips cascade through
    the 4-bit network, per layer only those codes differ and every layer matches. (The float-bias export:
    with the default int32 bias, conv1's bias is an integer initializer.)"""
    model, ckpt, _ = exported
    path = export_onnx(load_checkpoint(ckpt), tmp_path / "float_bias.onnx", batch=2, conv_bias="float").path
    proto = onnx.load(str(path))
    scale = next(t for t in proto.graph.initializer if t.name == f"{EARLY}.scale")
    step = float(numpy_helper.to_array(scale))

    def nudged(fraction: float):
        def change(bias):
            bias.reshape(-1)[0] += np.float32(fraction * step)
            return bias
        return change

    fraction, report = 1e-5, None
    while fraction < 0.1:
        out = _with_initializer(path, tmp_path / "nudged.onnx", "backbone.0.body.conv1.bias",
                                nudged(fraction))
        report = check_onnx(out, model)
        if report.layer_first_mismatch is not None:
            break
        fraction *= 2
    assert report is not None and report.layer_first_mismatch is not None, "no nudge flipped a code"
    name, eq, total = report.layer_first_mismatch
    print(f"nudge {fraction:g} step: {total - eq} of {total} codes of {name} flip\n{report.table()}")
    assert name == EARLY and 0 < total - eq < 0.001 * total
    # per layer: only the nudged quantizer's own codes differ, the outputs match to float rounding
    assert report.passed and report.failures == [], report.table()
    assert report.layer_prob_diff <= 1e-4 and report.layer_box_diff <= 1e-4
    assert report.layer_code_agreement >= 0.999
    # end to end: the same few flips change every later layer's input
    assert report.code_agreement < report.layer_code_agreement
    assert report.max_prob_diff > report.layer_prob_diff and report.max_box_diff > report.layer_box_diff
    assert report.first_mismatch is not None and report.first_mismatch[0] == EARLY
    later = [n for n, a in report.worst_quantizers if a < 1.0 and n != EARLY]
    assert later  # the cascade: quantizers downstream disagree too
    assert not report.end_to_end_ok  # in this 4-bit network the cascade exceeds the end-to-end bars
    table = report.table()
    assert f"cascade downstream (first: {EARLY}, {total - eq} of {total} codes)" in table
    assert "every layer matches given the same inputs" in table and "parity check PASSED" in table
    strict = check_onnx(out, model, criterion="end-to-end")
    assert not strict.passed and strict.failures and all(f.startswith("end to end") for f in strict.failures)
    assert "parity check FAILED" in strict.table() and "cascade downstream" not in strict.table()


@pytest.mark.parametrize(("initializer", "culprit"), [
    ("transformer.encoder.layers.0.linear1.weight_scale", "transformer.encoder.layers.0.linear2.act"),
    ("transformer.encoder.layers.0.linear1.act.scale", "transformer.encoder.layers.0.linear1.act"),
])
def test_folding_error_fails_per_layer(exported, tmp_path: Path, initializer: str, culprit: str) -> None:
    """A real folding error (a weight or activation scale 1.5x off) fails the per-layer criterion, naming
    the quantizer whose codes it changes."""
    model, _, path = exported
    out = _with_initializer(path, tmp_path / "broken.onnx", initializer, lambda a: a * np.float32(1.5))
    for criterion in ("layer", "end-to-end"):
        report = check_onnx(out, model, criterion=criterion)
        print(report.table())
        assert not report.passed, report.table()
        assert report.layer_failing_quantizers and report.layer_failing_quantizers[0][0] == culprit
        assert any(f.startswith("per layer") and culprit in f for f in report.failures), report.failures
        assert report.layer_first_mismatch is not None and report.layer_first_mismatch[0] == culprit
        assert "parity check FAILED" in report.table()


def test_cli_check_criterion(exported, tmp_path: Path) -> None:
    _, ckpt, _ = exported
    for args, shown in (([], "criterion: per layer"), (["--check-criterion", "end-to-end"],
                                                      "criterion: end to end and per layer")):
        out = tmp_path / f"m{len(args)}.onnx"
        args = ["export", str(ckpt), "-o", str(out), "--batch", "2", "--check", *args]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output + result.stderr
        assert "parity check PASSED" in result.output and shown in result.output
        assert "end to end: integer codes equal" in result.output
        assert "per layer: integer codes equal" in result.output
    bad = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--check",
                                   "--check-criterion", "exact"])
    assert bad.exit_code == 2 and not (tmp_path / "x.onnx").exists()


def test_float_rounding_ties_count_as_agreeing_per_layer_but_other_flips_do_not() -> None:
    """A per-layer disagreement is a float-rounding tie when the codes are one apart and PyTorch's input is
    within TIE_STEPS of a step from a rounding boundary: ties count as agreeing for the per-quantizer bar (one
    tie in a 960-code quantizer whose input does not depend on the image fails 99.9% otherwise), other
    disagreements still fail it."""
    report = check.CheckReport(False, True, "", 1, 0.0, 0.0, 1.0, 1000, 997, 1e-4, 0.999,
                               layer_codes_equal=997, layer_mismatches=[("q", 997, 1000)])
    assert report.layer_failing_quantizers == [("q", 997, 1000)]
    report.layer_ties = {"q": 3}
    assert report.layer_failing_quantizers == [] and report.layer_ok
    report.layer_ties = {"q": 1}
    assert report.layer_failing_quantizers == [("q", 997, 1000)]
    torch_codes = np.array([[3, 4, 5, 6]])
    graph_codes = np.array([[4, 4, 7, 6]])  # one apart at a tie, two apart at a tie, equal
    ties = np.array([[True, True, True, False]])
    rec = {"shift": [0], "axis": None, "layout": "same"}
    assert check._count_ties(graph_codes, torch_codes, ties, rec) == 1
    assert check._count_ties(graph_codes, torch_codes, np.zeros_like(ties), rec) == 0
