"""Bench: preprocessing contract, numpy post-processing, latency helpers, coco128 end to end, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx_fixtures import build_fixture_model, coco_categories
from PIL import Image

from qdetr_deploy.bench.latency import interleaved, latency_stats, rotated
from qdetr_deploy.bench.preprocess import (
    detections_to_coco,
    load_image,
    outputs_to_detections,
    postprocess_logits,
    preprocess,
)
from qdetr_deploy.cli import cli
from qdetr_deploy.engines import open_engine
from qdetr_deploy.errors import QDetrError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO128 = DATA / "coco128"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _coco128() -> tuple[Path, Path]:
    ann = COCO128 / "annotations" / "instances_train2017.json"
    if not ann.is_file():
        pytest.skip(f"{COCO128} is absent (real test data lives in ../shared/data beside the project)")
    return COCO128 / "train2017", ann


def _bench(*args):
    return CliRunner().invoke(cli, ["bench", *map(str, args)])


def _one_line_exit_2(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- preprocessing and post-processing -------------------------------------------------------------------

def test_preprocess_fits_normalises_and_pads(tmp_path):
    path = tmp_path / "im.png"
    Image.new("RGB", (200, 100), (255, 0, 128)).save(path)  # w=200, h=100
    arr, scale, orig = preprocess(path, (64, 96), MEAN, STD)
    assert arr.shape == (3, 64, 96) and arr.dtype == np.float32 and orig == (100, 200)
    assert scale == pytest.approx(min(64 / 100, 96 / 200))  # 0.48 -> 48 x 96 content
    expected = (np.array([1.0, 0.0, 128 / 255]) - MEAN) / STD
    np.testing.assert_allclose(arr[:, 10, 10], expected, atol=1e-5)
    assert np.all(arr[:, 48:, :] == 0)  # bottom padding after normalising
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 20), 0).save(gray)
    assert preprocess(gray, (32, 32), MEAN, STD).array.shape == (3, 32, 32)  # grayscale -> RGB


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(QDetrError, match=r"missing\.jpg: image not found"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(QDetrError, match=r"bad\.jpg: unreadable image"):
        preprocess(bad, (32, 32), MEAN, STD)


def test_detections_to_coco_scales_clips_and_maps():
    scores = np.array([0.2, 0.9, 0.5])
    labels = np.array([0, 2, 1])
    boxes = np.array([[0, 0, 10, 10], [10, 20, 30, 60], [-5, 50, 200, 70]], np.float32)  # canvas pixels
    dets = detections_to_coco(scores, labels, boxes, 0.5, 7, [1, 5, 90], score_threshold=0.3,
                              image_size=(200, 300))
    assert [d["score"] for d in dets] == [0.9, 0.5]  # sorted, thresholded
    assert [d["category_id"] for d in dets] == [90, 5]  # labels through category_ids
    assert dets[0]["bbox"] == pytest.approx([20, 40, 40, 80])  # divided by the scale, xywh
    assert dets[1]["bbox"] == pytest.approx([0, 100, 300, 40])  # clipped to the 300x200 image
    assert all(d["image_id"] == 7 for d in dets)
    raw = detections_to_coco(scores, labels, boxes, 1.0, 1, None, topk=1)
    assert len(raw) == 1 and raw[0]["category_id"] == 2  # no category ids: label index


def test_numpy_postprocess_matches_graph_postprocess(tmp_path):
    raw = open_engine(build_fixture_model(tmp_path / "raw.onnx", seed=3, dynamic_batch=True))
    pp = open_engine(build_fixture_model(tmp_path / "pp.onnx", seed=3, dynamic_batch=True, postprocess=True))
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out_raw, out_pp = raw.run(x), pp.run(x)
    scores, labels, boxes = postprocess_logits(out_raw["pred_logits"], out_raw["pred_boxes"], (64, 64))
    np.testing.assert_allclose(scores, out_pp["scores"], atol=1e-5)
    np.testing.assert_array_equal(labels, out_pp["labels"])
    np.testing.assert_allclose(boxes, out_pp["boxes"], atol=1e-3)
    assert [a.shape for a in outputs_to_detections(out_pp, pp.metadata)] == [(2, 10), (2, 10), (2, 10, 4)]


# --- latency helpers -------------------------------------------------------------------------------------

def test_latency_stats_and_round_robin():
    s = latency_stats([0.001, 0.002, 0.003, 0.004], batch=2)
    assert s["p50_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1.0) and s["n"] == 4
    assert s["throughput_ips"] == pytest.approx(2 / 0.0025)
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    calls: list[str] = []
    runners = {"a": lambda i: calls.append("a"), "b": lambda i: calls.append("b")}
    times = interleaved(runners, warmup=1, iters=2)
    assert calls == ["a", "b", "a", "b", "b", "a"] and [len(v) for v in times.values()] == [2, 2]


# --- bench end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_models(tmp_path_factory) -> tuple[Path, Path]:
    _, ann = _coco128()
    names, ids = coco_categories(ann)
    d = tmp_path_factory.mktemp("bench_models")
    a = build_fixture_model(d / "detr_a.onnx", class_names=names, category_ids=ids)
    b = build_fixture_model(d / "detr_b.onnx", class_names=names, category_ids=ids, postprocess=True,
                            dynamic_batch=True, seed=1, input_size=(96, 128))
    return a, b


def test_bench_coco128_two_engines_report(coco_models, tmp_path):
    images, ann = _coco128()
    report = tmp_path / "report"
    res = _bench(*coco_models, "--images", images, "--ann", ann, "--max-images", 8, "--warmup", 1,
                 "--iters", 3, "--report", report, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["mode"] == "images" and result["config"]["num_images"] == 8
    a, b = result["engines"]
    assert (a["name"], b["name"]) == ("detr_a.onnx", "detr_b.onnx")
    assert a["ratio_vs_first"]["engine_latency"] == 1.0 and b["ratio_vs_first"]["engine_latency"] > 0
    for row in (a, b):
        assert len(row["coco"]["stats"]) == 12 and row["coco"]["num_images"] == 8
        assert row["engine_latency"]["n"] == 3 and row["e2e_latency"]["n"] == 8
        assert row["memory"]["host_peak_rss_mb"] > 0
    for f in ("bench.json", "bench.md", "latency.png", "ap_vs_latency.png"):
        assert (report / f).stat().st_size > 0, f
    assert (report / "latency.png").read_bytes()[:4] == b"\x89PNG"
    md = (report / "bench.md").read_text()
    assert "detr_a.onnx" in md and "detr_b.onnx" in md and "(x1.00)" in md and "Per-class AP" in md
    assert json.loads((report / "bench.json").read_text())["engines"][1]["name"] == "detr_b.onnx"
    _check_detections(Path(b["detections_file"]), ann, canvas=(96, 128))


def _check_detections(path: Path, ann: Path, canvas: tuple[int, int]) -> None:
    """Boxes are in original image pixels (inside the image, beyond the canvas) and labels are COCO ids."""
    gt = json.loads(ann.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    dets = json.loads(path.read_text())
    assert dets and {d["category_id"] for d in dets} <= cat_ids
    for d in dets:
        h, w = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert -1e-6 <= x and x + bw <= w + 1e-3 and -1e-6 <= y and y + bh <= h + 1e-3
    assert max(d["bbox"][0] + d["bbox"][2] for d in dets) > canvas[1]  # scaled back beyond the canvas


def test_bench_latency_only_random_input(coco_models):
    res = _bench(*coco_models, "--warmup", 1, "--iters", 4, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["mode"] == "random"
    assert [r["engine_latency"]["n"] for r in result["engines"]] == [4, 4]
    assert all(r["coco"] is None and r["e2e_latency"] is None for r in result["engines"])
    md = _bench(coco_models[0], "--warmup", 0, "--iters", 2)
    assert md.exit_code == 0 and "| engine p50 ms" in md.stdout


def test_bench_batch_larger_than_static_engine(coco_models):
    line = _one_line_exit_2(_bench(coco_models[0], "--batch", 4, "--iters", 1))
    assert "detr_a.onnx" in line and "batch 4 is larger than the engine allows" in line


def test_bench_missing_image_and_bad_annotations(coco_models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg", "height": 10, "width": 10}],
                               "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    line = _one_line_exit_2(_bench(coco_models[0], "--images", images, "--ann", ann))
    assert "gone.jpg: image not found" in line
    ann.write_text('{"images": [1, 2], "annotations": [], "categories": []}')
    line = _one_line_exit_2(_bench(coco_models[0], "--images", images, "--ann", ann))
    assert "ann.json: malformed COCO annotations" in line
    ann.write_text("{oops")
    line = _one_line_exit_2(_bench(coco_models[0], "--images", images, "--ann", ann))
    assert "malformed JSON" in line
    line = _one_line_exit_2(_bench(coco_models[0], "--images", images))
    assert "--images and --ann go together" in line


def test_bench_isolated_processes_match_in_process(coco_models):
    """--isolate (the CLI default) measures each engine in its own process: same detections and COCO
    figures, the same result layout, and the config says how it was measured."""
    from qdetr_deploy.bench.run import bench_engines

    images, ann = _coco128()
    kw = {"images_dir": images, "ann_file": ann, "max_images": 4, "warmup": 0, "iters": 2, "progress": False}
    iso = bench_engines(list(coco_models), isolate=True, **kw)
    one = bench_engines(list(coco_models), isolate=False, **kw)
    assert iso["config"]["isolated"] and not one["config"]["isolated"]
    assert [r["name"] for r in iso["engines"]] == [r["name"] for r in one["engines"]]
    for a, b in zip(iso["engines"], one["engines"]):
        assert a["coco"]["stats"] == b["coco"]["stats"] and a["coco"]["num_detections"] > 0
        assert a["engine_latency"]["n"] == 2 and a["e2e_latency"]["n"] == 4
    assert iso["engines"][0]["ratio_vs_first"]["engine_latency"] == 1.0


def test_bench_isolated_error_is_one_line(coco_models):
    line = _one_line_exit_2(_bench(*coco_models, "--batch", 4, "--iters", 1))
    assert "detr_a.onnx" in line and "batch 4 is larger than the engine allows" in line
