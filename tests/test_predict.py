"""``predict``: a checkpoint and its ONNX export on a coco128 picture, drawing, COCO JSON, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_export import float_tiny, one_torch_thread, quantized_tiny  # noqa: F401 (fixture)

from qdetr_deploy.bench.preprocess import postprocess_logits
from qdetr_deploy.checkpoints import save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.export.onnx_export import export_onnx
from qdetr_deploy.predict import PALETTE, collect_images, draw_detections, predict

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGE = "000000000009.jpg"  # 640x480
SIZE = (96, 128)


def _coco_image() -> Path:
    path = DATA / "coco128" / "train2017" / IMAGE
    if not path.is_file():
        pytest.skip(f"{path} is absent (real test data lives in ../shared/data beside the project)")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A float and a 4-4-8 tiny DETR (random weights, labels mapped to COCO ids 1, 2, 3), the float one
    also exported to ONNX at SIZE."""
    d = tmp_path_factory.mktemp("predict_models")
    meta = {"calibration": {"image_size": list(SIZE)}}
    fp32 = save_checkpoint(float_tiny(), d / "fp32.safetensors", category_ids=[1, 2, 3], meta=meta)
    q = save_checkpoint(quantized_tiny("4-4-8"), d / "q.safetensors", category_ids=[1, 2, 3], meta=meta)
    onnx_path = export_onnx(fp32, d / "fp32.onnx", image_size=SIZE).path
    return {"fp32": fp32, "q": q, "onnx": onnx_path}


def _predict(*args) -> object:
    return CliRunner().invoke(cli, ["predict", *map(str, args)])


def _results(out: Path) -> tuple[list[dict], dict]:
    return json.loads((out / "detections.json").read_text()), json.loads((out / "images.json").read_text())


def _check_coco(dets: list[dict], index: dict, size: tuple[int, int]) -> None:
    """Valid COCO results: id from the file name, category ids of the model, boxes in original pixels."""
    h, w = size
    assert dets and index["images"][0]["id"] == 9 and (index["images"][0]["height"],
                                                       index["images"][0]["width"]) == (h, w)
    assert {c["id"]: c["name"] for c in index["categories"]} == {1: "circle", 2: "square", 3: "triangle"}
    for d in dets:
        assert set(d) == {"image_id", "category_id", "bbox", "score"} and d["image_id"] == 9
        assert d["category_id"] in (1, 2, 3) and 0.0 <= d["score"] <= 1.0
        x, y, bw, bh = d["bbox"]
        assert -1e-6 <= x and x + bw <= w + 1e-3 and -1e-6 <= y and y + bh <= h + 1e-3
    assert max(d["bbox"][0] + d["bbox"][2] for d in dets) > SIZE[1]  # scaled back beyond the canvas


def test_predict_onnx_export_and_checkpoint_agree(models, tmp_path):
    """The exported model (CLI) and the checkpoint (library) through the one letterbox rule: both write a
    picture and valid COCO results, and the detections agree."""
    image = _coco_image()
    res = _predict(models["onnx"], image, "-o", tmp_path / "onnx", "--score-threshold", 0)
    assert res.exit_code == 0, res.output
    assert "1 picture(s) and 10 detection(s) written" in res.stdout  # detr_tiny: 10 queries
    picture = tmp_path / "onnx" / IMAGE
    with Image.open(picture) as im:
        assert im.format == "JPEG" and im.size == (640, 480)
    onnx_dets, index = _results(tmp_path / "onnx")
    _check_coco(onnx_dets, index, (480, 640))
    assert index["images"][0]["picture"] == IMAGE

    result = predict(models["fp32"], [image.parent / IMAGE], tmp_path / "ckpt", score_threshold=0.0,
                     progress=False)
    assert result["pictures"] == [str(tmp_path / "ckpt" / IMAGE)] and result["num_detections"] == 10
    ckpt_dets, _ = _results(tmp_path / "ckpt")
    assert [d["category_id"] for d in ckpt_dets] == [d["category_id"] for d in onnx_dets]
    np.testing.assert_allclose([d["score"] for d in ckpt_dets], [d["score"] for d in onnx_dets], atol=1e-4)
    np.testing.assert_allclose([d["bbox"] for d in ckpt_dets], [d["bbox"] for d in onnx_dets], atol=0.05)


def test_predict_quantized_checkpoint_folder_and_png(models, tmp_path):
    """A 4-4-8 checkpoint (fake quantization) on a folder with a PNG: PNG out, ids 1..N (names not numbers),
    the threshold applied."""
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.open(_coco_image()).save(folder / "street.png")
    Image.open(_coco_image()).convert("L").save(folder / "grey.jpg")  # greyscale in, RGB detections
    res = _predict(models["q"], folder, "-o", tmp_path / "out", "--score-threshold", 0.3)
    assert res.exit_code == 0, res.output
    dets, index = _results(tmp_path / "out")
    assert [(i["id"], i["picture"]) for i in index["images"]] == [(1, "grey.jpg"), (2, "street.png")]
    assert all(d["score"] >= 0.3 for d in dets)
    with Image.open(tmp_path / "out" / "street.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"


def test_draw_detections_box_and_label():
    """Boxes in the category's colour, a filled label above; small pictures enlarged for reading."""
    image = Image.new("RGB", (96, 64), (255, 255, 255))
    dets = [{"image_id": 1, "category_id": 2, "bbox": [20.0, 30.0, 40.0, 20.0], "score": 0.9}]
    out = np.asarray(draw_detections(image, dets, {2: "square"}))
    k = 5  # 96 px -> 480 px (DISPLAY_MIN)
    assert out.shape == (64 * k, 96 * k, 3)
    edge = out[(30 + 10) * k, 20 * k]  # the box's left edge, half way down
    assert tuple(edge) == PALETTE[2]
    label = out[30 * k - 10: 30 * k, 20 * k: 20 * k + 60].reshape(-1, 3)
    assert (label == PALETTE[2]).all(axis=1).mean() > 0.5  # the label's filled background
    assert ((label == 0).all(axis=1) | (label == 255).all(axis=1)).any()  # its text


def test_sigmoid_topk_scoring_matches_reference():
    """``scoring: sigmoid`` (SMCA / Deformable DETR post-processing): the top-k (query, class) pairs of
    the per-class sigmoid, as torch computes them."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 4)).astype(np.float32)
    boxes = rng.uniform(0.2, 0.6, (2, 5, 4)).astype(np.float32)
    scores, labels, xyxy = postprocess_logits(logits, boxes, (50, 100), scoring="sigmoid", topk=7)
    prob = torch.from_numpy(logits).double().sigmoid().flatten(1)
    ref_scores, idx = prob.topk(7, dim=1)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(labels, (idx % 4).numpy())
    q = (idx // 4).numpy()
    cx, cy, w, h = np.moveaxis(boxes[np.arange(2)[:, None], q].astype(np.float64), -1, 0)
    ref = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * [100, 50, 100, 50]
    np.testing.assert_allclose(xyxy, ref, rtol=1e-6)


@pytest.mark.parametrize("case, words", [
    ("missing model", "model not found"),
    ("unknown model", "unknown model type"),
    ("missing image", "image or folder not found"),
    ("empty folder", "no images"),
    ("not an image", "unreadable image"),
    ("output holds inputs", "would overwrite"),
])
def test_predict_bad_input_one_line_exit_2(case, words, models, tmp_path):
    image = _coco_image()
    model, inputs, out = models["onnx"], [image], tmp_path / "out"
    if case == "missing model":
        model = tmp_path / "gone.onnx"
    elif case == "unknown model":
        model = tmp_path / "model.txt"
        model.write_text("x")
    elif case == "missing image":
        inputs = [tmp_path / "gone.jpg"]
    elif case == "empty folder":
        inputs = [tmp_path]
    elif case == "not an image":
        inputs = [tmp_path / "fake.jpg"]
        inputs[0].write_text("not a jpeg")
    else:
        inputs = [tmp_path / IMAGE]
        inputs[0].write_bytes(image.read_bytes())
        out = tmp_path
    res = _predict(model, *inputs, "-o", out)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_collect_images_keeps_order_and_sorts_folders(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in collect_images([tmp_path / "b.png", tmp_path])] == ["b.png", "a.jpg", "b.png"]


def test_predict_released_smca_checkpoint_scores_by_sigmoid_topk(tmp_path):
    """A released Q-DETR (SMCA-DETR) checkpoint: --bits given, its post-processing chosen by its
    architecture (sigmoid top-k, ``models.sigmoid_topk``), not DETR's softmax."""
    from qdetr_deploy.bench.preprocess import preprocess
    from qdetr_deploy.models import sigmoid_topk
    from qdetr_deploy.predict import open_model

    ckpt = DATA / "qdetr_released_fixture" / "smca_small_4bit.pth"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent (real test data lives in ../shared/data beside the project)")
    image = _coco_image()
    res = _predict(ckpt, image, "-o", tmp_path / "out", "--bits", "4-4-8", "--image-size", 128, 128,
                   "--score-threshold", 0)
    assert res.exit_code == 0, res.output
    dets, _ = _results(tmp_path / "out")
    engine = open_model(ckpt, (128, 128), bits="4-4-8")
    assert engine.metadata["scoring"] == "sigmoid"
    x = preprocess(image, (128, 128), engine.metadata["mean"], engine.metadata["std"]).array[None]
    out = {k: torch.from_numpy(v).double() for k, v in engine.run(x).items()}
    scores, labels, _, _ = sigmoid_topk(out["pred_logits"], out["pred_boxes"], torch.tensor([[128, 128]]))
    assert len(dets) == scores.shape[1]  # k = the number of queries
    np.testing.assert_allclose([d["score"] for d in dets], scores[0].numpy(), rtol=1e-5)
    assert sorted(d["category_id"] for d in dets) == sorted(labels[0].tolist())  # slots are COCO ids
    line = _predict(ckpt, image, "-o", tmp_path / "x").stderr.strip().splitlines()
    assert len(line) == 1 and "--bits" in line[0]
