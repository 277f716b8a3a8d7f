"""COCO evaluation: the COCO API's own reference numbers, a perfect-detections check, CLI error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qdetr_deploy.bench.cocoeval import STAT_NAMES, evaluate_coco
from qdetr_deploy.cli import cli
from qdetr_deploy.errors import QDetrError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURE = DATA / "coco_eval_fixture"


def _fixture() -> tuple[Path, Path, list[float]]:
    if not (FIXTURE / "expected_bbox_stats.json").is_file():
        pytest.skip(f"{FIXTURE} is absent (real test data lives in ../shared/data beside the project)")
    expected = json.loads((FIXTURE / "expected_bbox_stats.json").read_text())
    return FIXTURE / expected["gt"], FIXTURE / expected["dt"], expected["stats"]


def test_reproduces_pycocotools_reference_stats():
    gt, dt, expected = _fixture()
    result = evaluate_coco(gt, dt)
    assert result["names"] == STAT_NAMES
    assert len(result["stats"]) == 12
    np.testing.assert_allclose(result["stats"], expected, rtol=0, atol=1e-12)
    assert len(result["per_class"]) > 0


def test_cli_json_reproduces_reference_stats():
    gt, dt, expected = _fixture()
    res = CliRunner().invoke(cli, ["evaluate", "--ann", str(gt), "--detections", str(dt), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)["stats"]
    np.testing.assert_allclose(stats, expected, rtol=0, atol=1e-12)


def test_model_detections_as_ground_truth_give_ap_one(tmp_path):
    """Run a fixture model end to end, feed its detections back as ground truth: AP must be 1.0."""
    from onnx_fixtures import build_fixture_model

    from qdetr_deploy.bench.run import detect_batch
    from qdetr_deploy.engines import open_engine

    model = build_fixture_model(tmp_path / "m.onnx", num_classes=5, num_queries=8, postprocess=True,
                                category_ids=[3, 5, 7, 9, 11], dynamic_batch=True)
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(120, 160), (90, 60), (64, 64)]):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        items.append((100 + i, path))
    dets = detect_batch(open_engine(model), items, run_batch=3)
    dets = [d for d in dets if d["bbox"][2] > 1 and d["bbox"][3] > 1]
    assert dets and {d["category_id"] for d in dets} <= {3, 5, 7, 9, 11}
    gt = {"images": [{"id": i, "file_name": p.name, "height": 1, "width": 1} for i, p in items],
          "categories": [{"id": c, "name": f"c{c}"} for c in (3, 5, 7, 9, 11)],
          "annotations": [{"id": k + 1, "image_id": d["image_id"], "category_id": d["category_id"],
                           "bbox": d["bbox"], "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
                          for k, d in enumerate(dets)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    result = evaluate_coco(tmp_path / "gt.json", dets)
    assert result["stats"][0] == pytest.approx(1.0)
    assert result["stats"][1] == pytest.approx(1.0)
    assert all(v is None or v == pytest.approx(1.0) for v in result["per_class"].values())


def _tiny_gt(tmp_path: Path) -> Path:
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 100}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                           "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_empty_detections_give_zero_stats(tmp_path):
    result = evaluate_coco(_tiny_gt(tmp_path), [])
    # pycocotools semantics: 0 where the area range has ground truth, -1 where it has none (small, large).
    assert result["stats"][0] == 0.0 and result["stats"][8] == 0.0
    assert set(result["stats"]) <= {0.0, -1.0}


@pytest.mark.parametrize("content, words", [
    ("{not json", "malformed JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]', "bbox needs 4"),
    ('[{"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]', "image id"),
])
def test_malformed_detections_exit_2_one_line(tmp_path, content, words):
    gt = _tiny_gt(tmp_path)
    dt = tmp_path / "dt.json"
    dt.write_text(content)
    res = CliRunner().invoke(cli, ["evaluate", "--ann", str(gt), "--detections", str(dt)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "dt.json" in lines[0]


def test_malformed_annotations_raise(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(QDetrError, match="malformed COCO annotations"):
        evaluate_coco(bad, [])
