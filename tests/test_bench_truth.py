"""bench tells the truth about what it times: detections of categories the annotations lack are ignored
(one warning), an evaluation error names the engine and keeps the latency figures, a graph is labelled by
what it contains, a DETR-style ONNX file without qdetr metadata is timed, and a loaded machine is said."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_fixtures import build_fixture_model, coco_categories
from test_bench import _bench, _coco128, _one_line_exit_2

from qdetr_deploy.bench.cocoeval import evaluate_coco
from qdetr_deploy.bench.latency import MachineLoad
from qdetr_deploy.bench.report import markdown_report, write_reports
from qdetr_deploy.bench.run import evaluate_engines, measure_engines
from qdetr_deploy.cli import cli
from qdetr_deploy.engines.base import read_metadata
from qdetr_deploy.engines.onnx_graph import graph_precision


def _lines(text: str, words: str) -> list[str]:
    return [line for line in text.splitlines() if words in line]


# --- detections of categories the annotations lack -------------------------------------------------------

def _gt_as_detections(ann: Path, n_images: int) -> tuple[list[dict], list[int]]:
    """The ground truth of the first images as detections, boxes shifted and scores varied (AP < 1)."""
    gt = json.loads(ann.read_text())
    ids = [im["id"] for im in gt["images"][:n_images]]
    rng = np.random.default_rng(0)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.uniform(0.3, 1)),
             "bbox": [a["bbox"][0] + float(rng.uniform(-8, 8)), a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in gt["annotations"] if a["image_id"] in ids]
    return dets, ids


def _pycocotools_stats(ann: Path, dets: list[dict], image_ids: list[int]) -> list[float]:
    """pycocotools itself, every detection handed over as is."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


def test_category_69_is_ignored_as_pycocotools_does_with_one_warning(tmp_path):
    _, ann = _coco128()
    assert 69 not in coco_categories(ann)[1]
    dets, ids = _gt_as_detections(ann, 6)
    extra = {"image_id": ids[0], "category_id": 69, "bbox": [10.0, 10.0, 50.0, 40.0], "score": 0.99}
    ours = evaluate_coco(ann, dets + [extra], ids)
    reference = _pycocotools_stats(ann, dets + [extra], ids)
    assert ours["stats"] == evaluate_coco(ann, dets, ids)["stats"] == reference and 0 < reference[0] < 1
    assert (ours["ignored_detections"], ours["ignored_category_ids"]) == (1, [69])
    assert ours["num_detections"] == len(dets)

    path = tmp_path / "dt.json"
    path.write_text(json.dumps(dets + [extra]))
    res = CliRunner().invoke(cli, ["evaluate", "--ann", str(ann), "--detections", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr.strip().splitlines() == [
        f"warning: {path}: 1 detection(s) name 1 category id(s) not in the annotations (e.g. 69): ignored, "
        "as pycocotools does"]
    assert json.loads(res.stdout)["ignored_detections"] == 1


def test_bench_ignores_unknown_categories_in_warning_and_reports(tmp_path):
    """A 91-slot-style head on coco128: half the classes map to category 69. bench finishes, warns once for
    the engine, and the JSON and Markdown reports say how many detections were ignored."""
    images, ann = _coco128()
    names, ids = coco_categories(ann)
    model = build_fixture_model(tmp_path / "head91.onnx", class_names=names,
                                category_ids=[69] * 40 + ids[40:])
    report = tmp_path / "report"
    res = _bench(model, "--images", images, "--ann", ann, "--max-images", 8, "--warmup", 0, "--iters", 2,
                 "--report", report, "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["engines"][0]
    warned = _lines(res.stderr, "category id(s) not in the annotations")
    assert len(warned) == 1 and warned[0].startswith("warning: head91.onnx: ") and "(e.g. 69)" in warned[0]
    assert row["coco"]["ignored_detections"] > 0 and row["coco"]["ignored_category_ids"] == [69]
    dets = json.loads(Path(row["detections_file"]).read_text())
    assert sum(d["category_id"] == 69 for d in dets) == row["coco"]["ignored_detections"]
    first8 = [im["id"] for im in json.loads(ann.read_text())["images"][:8]]
    kept = [d for d in dets if d["category_id"] != 69]
    assert row["coco"]["stats"] == evaluate_coco(ann, kept, first8)["stats"]
    md = (report / "bench.md").read_text()
    assert f"head91.onnx: {row['coco']['ignored_detections']} detection(s) name 1 category id(s)" in md


def test_evaluation_error_names_the_engine_and_keeps_latency(tmp_path):
    """A failed evaluation is the engine's ``coco_error`` and a line of ``errors``; the latency figures
    are in the result and the written reports all the same."""
    images, ann = _coco128()
    names, ids = coco_categories(ann)
    model = build_fixture_model(tmp_path / "m.onnx", class_names=names, category_ids=ids)
    result, detections = measure_engines([str(model)], str(images), str(ann), batch=1, warmup=0, iters=2,
                                         max_images=2, progress=False)
    detections["m.onnx"][0]["image_id"] = 123456789  # names an image the annotations lack
    evaluate_engines(result, detections, str(ann), [9, 25])
    row = result["engines"][0]
    assert row["coco"] is None and row["engine_latency"]["n"] == 2
    assert result["errors"] == [row["coco_error"]]
    assert row["coco_error"].startswith("COCO evaluation of m.onnx failed: m.onnx: detections name 1 image")
    files = write_reports(result, tmp_path / "report", detections)
    written = json.loads(Path(files["json"]).read_text())["engines"][0]
    assert written["engine_latency"]["n"] == 2 and written["coco_error"] == row["coco_error"]
    assert row["coco_error"] in markdown_report(result)


# --- what a graph contains -------------------------------------------------------------------------------

class _Images:
    """A few random calibration images for ONNX Runtime's ``quantize_static``."""

    def __init__(self, shape: tuple[int, ...], n: int = 4) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"images": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def test_ort_quantized_file_with_fp32_metadata_is_labelled_int8(tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32 = build_fixture_model(tmp_path / "fp32.onnx", input_size=(32, 32))
    peer = tmp_path / "u8s8.onnx"
    quantize_static(str(fp32), str(peer), _Images((1, 3, 32, 32)), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert read_metadata(peer)["bits"] == "fp32"  # inherited from the fp32 export
    ours = build_fixture_model(tmp_path / "ours.onnx", input_size=(32, 32), int8=True)  # metadata: 8-8-8
    res = _bench(fp32, peer, ours, "--warmup", 0, "--iters", 2, "--in-process", "--json")
    assert res.exit_code == 0, res.output
    a, b, c = json.loads(res.stdout)["engines"]
    assert (a["bits"], a["graph"]["label"]) == ("fp32", "fp32") and a["graph"]["ops"] == {}
    assert b["graph"]["label"] == "int8 weights, uint8 activations"
    assert b["bits"] == "int8 weights, uint8 activations (from the graph; its metadata says fp32)"
    assert b["graph"]["ops"]["QuantizeLinear"] > 0 and b["graph"]["weights"]["int8"] >= 3
    assert (c["bits"], c["graph"]["label"]) == ("8-8-8", "int8 weights, int8 activations")
    md = _bench(fp32, peer, "--warmup", 0, "--iters", 1, "--in-process").stdout
    assert "| graph (from its ops) | fp32 | int8 weights, uint8 activations |" in md


def test_graph_precision_of_an_int4_export(tmp_path):
    """A 4-bit export in the INT4 container holds INT4 weights: labelled by them, the metadata's bits kept;
    the default (int8 container, ONNX Runtime's integer kernels) is labelled by its INT8 weights."""
    from test_export import quantized_tiny

    from qdetr_deploy.checkpoints import save_checkpoint
    from qdetr_deploy.engines.onnx_graph import reconcile_bits
    from qdetr_deploy.export.onnx_export import export_onnx

    ckpt = save_checkpoint(quantized_tiny("4-4-8"), tmp_path / "q.safetensors")
    path = export_onnx(ckpt, tmp_path / "q.onnx", image_size=(64, 64), weight_container="int4").path
    graph = graph_precision(onnx.load(str(path)))
    assert graph["label"].startswith("int4 weights") and graph["weights"]["int4"] > 0
    assert reconcile_bits("4-4-8", graph) == "4-4-8"
    default = export_onnx(ckpt, tmp_path / "d.onnx", image_size=(64, 64)).path
    graph = graph_precision(onnx.load(str(default)))
    assert graph["label"].startswith("int8 weights") and graph["weights"].get("int4", 0) == 0


# --- ONNX files qdetr-deploy did not write ---------------------------------------------------------------

def _dynamic_hw(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(model, str(dst))
    return dst


def _renamed_outputs(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    rename = {"pred_logits": "logits", "pred_boxes": "coords"}
    for node in model.graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
    for out in model.graph.output:
        out.name = rename.get(out.name, out.name)
    onnx.save(model, str(dst))
    return dst


def test_bench_times_a_foreign_detr_onnx(tmp_path):
    images, ann = _coco128()
    plain = build_fixture_model(tmp_path / "plain.onnx", metadata={}, input_size=(64, 64))
    dynamic = _dynamic_hw(plain, tmp_path / "dynamic.onnx")
    line = _one_line_exit_2(_bench(dynamic, "--iters", 1))
    assert "dynamic.onnx: no qdetr metadata" in line and "pass --input-size H W" in line
    assert "float32 [B,3,H,W]" in line and "export it with" not in line
    res = _bench(dynamic, "--input-size", 48, 80, "--warmup", 0, "--iters", 2, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["engines"][0]["input_spec"]["shape"] == [1, 3, 48, 80]
    line = _one_line_exit_2(_bench(plain, "--input-size", 48, 80, "--iters", 1))
    assert "--input-size 48 80 does not fit" in line

    res = _bench(plain, "--images", images, "--ann", ann, "--max-images", 4, "--warmup", 0, "--iters", 2,
                 "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["engines"][0]
    assert len(row["coco"]["stats"]) == 12 and row["bits"] == "fp32" and row["e2e_latency"]["n"] == 4
    assert any("labels are taken as COCO category ids" in n for n in row["notes"])
    assert _lines(res.stderr, "warning: plain.onnx: no qdetr metadata: timed at 64x64")


def test_bench_times_onnx_with_unknown_outputs_without_ap(tmp_path):
    images, ann = _coco128()
    odd = _renamed_outputs(build_fixture_model(tmp_path / "plain.onnx", metadata={}), tmp_path / "odd.onnx")
    res = _bench(odd, "--images", images, "--ann", ann, "--max-images", 2, "--warmup", 0, "--iters", 2,
                 "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["engines"][0]
    assert row["coco"] is None and row["engine_latency"]["n"] == 2 and row["e2e_latency"]["n"] == 2
    assert any("are not DETR's" in n and "no COCO AP" in n for n in row["notes"])
    line = _one_line_exit_2(CliRunner().invoke(cli, ["predict", str(odd), str(images), "-o",
                                                     str(tmp_path / "out")]))
    assert "odd.onnx" in line and "no detections to draw" in line


# --- other processes on the machine ----------------------------------------------------------------------

@pytest.fixture
def spinner():
    """Other processes keeping every CPU busy for up to 60 s (one spinner per CPU: with a single one, bench's
    own worker threads could crowd it below the warning's limit on a 2-core machine)."""
    spin = "import time\nt = time.time()\nwhile time.time() - t < 60: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    time.sleep(0.5)
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_machine_load_counts_other_processes_not_our_own(spinner):
    with MachineLoad() as load:
        time.sleep(1.5)
    if load.other_cpus is None:
        pytest.skip("no /proc/stat on this system: only the load average is available")
    assert load.other_cpus > 0.5
    line = load.warning()
    assert line and line.startswith(f"other processes kept {load.other_cpus:.1f} of {load.cpus} CPUs busy")
    assert "\n" not in line and load.warning(limit=load.other_cpus) is None


def test_bench_warns_once_when_the_machine_is_loaded(spinner, tmp_path):
    model = build_fixture_model(tmp_path / "m.onnx", input_size=(32, 32))
    report = tmp_path / "report"
    res = _bench(model, "--warmup", 0, "--iters", 30, "--report", report, "--json")
    assert res.exit_code == 0, res.output
    load = json.loads(res.stdout)["config"]["machine_load"]
    if load["other_cpus"] is None:
        pytest.skip("no /proc/stat on this system: only the load average is available")
    assert len(_lines(res.stderr, "warning: other processes kept")) == 1
    assert load["warning"] and f"Warning: {load['warning']}." in (report / "bench.md").read_text()
