"""Datasets, transforms, the shapes set and the make-dataset command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qdetr_deploy.data import (
    CocoDetection,
    collate_fn,
    make_eval_transforms,
    make_shapes_dataset,
    make_train_transforms,
)
from qdetr_deploy.errors import QDetrError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO128 = DATA / "coco128"
RACCOON = DATA / "raccoon"
needs_coco128 = pytest.mark.skipif(
    not (COCO128 / "annotations" / "instances_train2017.json").is_file(),
    reason=f"real test data absent: {COCO128} (see shared/data/README.md)",
)
needs_raccoon = pytest.mark.skipif(
    not (RACCOON / "annotations.json").is_file(),
    reason=f"real test data absent: {RACCOON} (see shared/data/README.md)",
)


def coco128(**kwargs) -> CocoDetection:
    ann = COCO128 / "annotations" / "instances_train2017.json"
    return CocoDetection(COCO128 / "train2017", ann, **kwargs)


# --- real data -------------------------------------------------------------------------------------------


@needs_coco128
def test_coco128_lengths_and_crowd_dropped():
    ds = coco128()
    assert len(ds) == 128 and ds.num_classes == 80
    assert ds.category_ids[:3] == [1, 2, 3] and ds.class_names[0] == "person"
    raw = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert crowd == 10
    kept = sum(len(ds.records[i]["labels"]) for i in ds.records)
    assert kept == len(raw["annotations"]) - crowd == 929


@needs_coco128
def test_coco128_category_id_mode():
    ds = coco128(label_mode="category_id")
    assert ds.num_classes == 91 and ds.class_names[1] == "person" and ds.class_names[0] == "N/A"
    image, target = ds[0]
    assert isinstance(image, Image.Image)
    assert target["labels"].dtype == torch.int64 and int(target["labels"].min()) >= 1


@needs_coco128
def test_coco128_eval_boxes_normalised_and_collate():
    ds = coco128(transforms=make_eval_transforms(size=128, max_size=160))
    items = [ds[i] for i in range(6)]
    for image, target in items:
        assert image.shape[0] == 3 and min(image.shape[-2:]) <= 128 and max(image.shape[-2:]) <= 160
        assert tuple(target["size"].tolist()) == tuple(image.shape[-2:])
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > 0).all()
    images, mask, targets = collate_fn(items)
    assert images.shape[0] == 6 and mask.dtype == torch.bool and mask.shape == (6, *images.shape[-2:])
    for k, (image, _) in enumerate(items):
        h, w = image.shape[-2:]
        assert not mask[k, :h, :w].any() and mask[k].sum() == mask.shape[1] * mask.shape[2] - h * w
        assert torch.equal(images[k, :, :h, :w], image) and (images[k, :, h:, :] == 0).all()
    assert len(targets) == 6


@needs_coco128
def test_coco128_train_transforms_keep_boxes_valid():
    random.seed(0)
    tf = make_train_transforms(scales=(96, 128), max_size=160, crop=(64, 100), crop_resize=(128,))
    ds = coco128(transforms=tf)
    for i in range(12):
        image, target = ds[i]
        assert image.shape[0] == 3 and max(image.shape[-2:]) <= 160
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) == len(target["area"])
        assert ((boxes >= 0) & (boxes <= 1 + 1e-6)).all() and (boxes[:, 2:] > 0).all()


@needs_raccoon
def test_raccoon_grayscale_becomes_rgb():
    tf = make_eval_transforms(64, 96)
    ds = CocoDetection(RACCOON / "images", RACCOON / "annotations.json", transforms=tf)
    assert len(ds) == 200 and ds.class_names == ["raccoon"]
    gray = [i for i, im in enumerate(ds.images) if im["file_name"] in {"raccoon-150.jpg", "raccoon-161.jpg"}]
    assert len(gray) == 2 and Image.open(RACCOON / "images" / "raccoon-150.jpg").mode == "L"
    for i in gray:
        image, target = ds[i]
        assert image.shape[0] == 3 and len(target["boxes"]) >= 1


def test_flip_resize_crop_geometry():
    from qdetr_deploy.data.transforms import RandomSizeCrop, crop, hflip, resize

    image = Image.new("RGB", (40, 30))
    target = {"boxes": _t([[5, 5, 15, 13]]), "labels": torch.tensor([2]), "area": _t([80]),
              "iscrowd": torch.tensor([0])}
    assert hflip(image, target)[1]["boxes"].tolist() == [[25, 5, 35, 13]]
    small, t = resize(image, target, 15, max_size=100)
    assert small.size == (20, 15) and t["boxes"].tolist() == [[2.5, 2.5, 7.5, 6.5]] and t["area"].item() == 20
    _, t = crop(image, target, (0, 10, 30, 30))  # box clipped to x in [0, 5]
    assert t["boxes"].tolist() == [[0, 5, 5, 13]] and t["area"].item() == 40
    _, t = crop(image, target, (0, 20, 30, 20))  # box left outside: dropped with its label
    assert len(t["boxes"]) == 0 and len(t["labels"]) == 0
    out, _ = RandomSizeCrop(64, 100)(image, target)  # image smaller than min_size: whole image
    assert out.size == (40, 30)


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --- bad input -------------------------------------------------------------------------------------------


def _tiny_set(tmp_path: Path, names: list[str]) -> Path:
    """Write ``names`` as 40x30 JPEGs (one box each) with a COCO JSON; returns the JSON path."""
    images, anns = [], []
    for k, name in enumerate(names, start=1):
        Image.new("RGB", (40, 30), (k * 40, 90, 200)).save(tmp_path / name, quality=95)
        images.append({"id": k, "file_name": name, "width": 40, "height": 30})
        anns.append({"id": k, "image_id": k, "category_id": 7, "bbox": [5, 5, 10, 8], "area": 80,
                     "iscrowd": 0})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 7, "name": "thing"}]}))
    return ann


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@needs_coco128
def test_truncated_real_jpeg_fails_naming_file(tmp_path):
    name = "000000000009.jpg"
    data = (COCO128 / "train2017" / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    ann = {"images": [{"id": 9, "file_name": name, "width": 640, "height": 480}], "annotations": [],
           "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDetection(tmp_path, tmp_path / "ann.json")
    with pytest.raises(QDetrError, match=name) as err:
        ds[0]
    assert "\n" not in str(err.value)


def test_truncated_image_skip_mode_counts_it(tmp_path):
    ann = _tiny_set(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    _truncate(tmp_path / "b.jpg")
    with pytest.raises(QDetrError, match="b.jpg"):
        CocoDetection(tmp_path, ann)[1]
    ds = CocoDetection(tmp_path, ann, on_bad_image="skip")
    image, target = ds[1]  # replaced by the next good image
    assert int(target["image_id"]) == 3 and image.size == (40, 30)
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("b.jpg")
    ds = CocoDetection(tmp_path, ann, on_bad_image="skip")
    ds.validate()
    assert len(ds) == 2 and len(ds.skipped) == 1


def test_missing_image_file(tmp_path):
    ann = _tiny_set(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "a.jpg").unlink()
    with pytest.raises(QDetrError, match="a.jpg"):
        CocoDetection(tmp_path, ann)
    ds = CocoDetection(tmp_path, ann, on_bad_image="skip")
    assert len(ds) == 1 and ds.skipped[0].endswith("a.jpg")


def test_image_modes_converted_to_rgb(tmp_path):
    ann = _tiny_set(tmp_path, ["l.png", "p.png", "rgba.png", "cmyk.jpg"])
    for name, mode in [("l.png", "L"), ("p.png", "P"), ("rgba.png", "RGBA"), ("cmyk.jpg", "CMYK")]:
        Image.new(mode, (40, 30)).save(tmp_path / name)
    ds = CocoDetection(tmp_path, ann, transforms=make_eval_transforms(30, 40))
    for i in range(4):
        image, target = ds[i]
        assert image.shape == (3, 30, 40) and target["labels"].tolist() == [0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "malformed JSON"),
        ("{}", '"images"'),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "no images"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}', "categories"),
    ],
)
def test_bad_json(tmp_path, content, message):
    (tmp_path / "ann.json").write_text(content)
    with pytest.raises(QDetrError, match=message) as err:
        CocoDetection(tmp_path, tmp_path / "ann.json")
    assert "ann.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, -3, 4], [1, 2, "a", 4], None, [1, 2, float("nan"), 4]])
def test_bad_bbox(tmp_path, bbox):
    ann = _tiny_set(tmp_path, ["a.jpg"])
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = bbox
    ann.write_text(json.dumps(data))
    with pytest.raises(QDetrError, match="bad bbox") as err:
        CocoDetection(tmp_path, ann)
    assert "ann.json" in str(err.value)


def test_missing_annotation_file_and_degenerate_box(tmp_path):
    with pytest.raises(QDetrError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    ann = _tiny_set(tmp_path, ["a.jpg"])
    data = json.loads(ann.read_text())
    data["annotations"].append(dict(data["annotations"][0], id=2, bbox=[5, 5, 0, 8]))  # zero width
    data["annotations"].append(dict(data["annotations"][0], id=3, bbox=[39, 5, 10, 8]))  # clipped to 1 px
    data["annotations"].append(dict(data["annotations"][0], id=4, bbox=[50, 5, 10, 8]))  # outside: empty
    ann.write_text(json.dumps(data))
    _, target = CocoDetection(tmp_path, ann)[0]
    assert target["boxes"].tolist() == [[5, 5, 15, 13], [39, 5, 40, 13]]


# --- shapes and the CLI ----------------------------------------------------------------------------------


def test_shapes_deterministic_and_boxes_inside(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_train=12, num_val=4, image_size=64, seed=3, progress=False)
    b = make_shapes_dataset(tmp_path / "b", num_train=12, num_val=4, image_size=64, seed=3, progress=False)
    c = make_shapes_dataset(tmp_path / "c", num_train=12, num_val=4, image_size=64, seed=4, progress=False)
    assert a["train_ann"].read_bytes() == b["train_ann"].read_bytes()
    assert a["val_ann"].read_bytes() == b["val_ann"].read_bytes()
    assert (a["train_images"] / "000000.jpg").read_bytes() == (b["train_images"] / "000000.jpg").read_bytes()
    assert a["train_ann"].read_bytes() != c["train_ann"].read_bytes()
    data = json.loads(a["train_ann"].read_text())
    assert len(data["images"]) == 12 and [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert {c["name"] for c in data["categories"]} == {"circle", "square", "triangle"}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
        assert 0.1 * 64 <= max(w, h) <= 0.5 * 64
    ds = CocoDetection(a["train_images"], a["train_ann"], transforms=make_eval_transforms(64, 64))
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) >= 1


def test_shapes_reuse_and_other_parameters(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_train=3, num_val=2, image_size=32, progress=False)
    stamp = paths["train_ann"].stat().st_mtime_ns
    make_shapes_dataset(tmp_path, num_train=3, num_val=2, image_size=32, progress=False)
    assert paths["train_ann"].stat().st_mtime_ns == stamp  # reused
    with pytest.raises(QDetrError, match="other parameters"):
        make_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=32, progress=False)
    make_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=32, progress=False, overwrite=True)
    assert len(json.loads(paths["train_ann"].read_text())["images"]) == 4


def test_make_dataset_cli(tmp_path):
    from qdetr_deploy.cli import cli

    out = tmp_path / "shapes"
    args = ["make-dataset", "shapes", "--out", str(out), "--num-train", "5", "--num-val", "2",
            "--image-size", "48", "--seed", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert len(json.loads((out / "annotations" / "train.json").read_text())["images"]) == 5
    assert len(list((out / "val").glob("*.jpg"))) == 2
    result = CliRunner().invoke(cli, [*args[:-2], "--seed", "2"])
    assert result.exit_code == 2 and "other parameters" in result.output
    result = CliRunner().invoke(cli, ["make-dataset", "circles", "--out", str(out)])
    assert result.exit_code == 2
