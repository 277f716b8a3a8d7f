"""A procedural detection set (coloured shapes on textured backgrounds) for runs that must not download.

Each image holds 1..``max_shapes`` filled circles, squares and triangles (side 15-45 % of the image) in
saturated colours chosen far from the background under them, on a muted background (smooth noise, a linear
gradient or stripes). Shapes may overlap a little: a new shape is rejected when it would hide more than
a quarter of an earlier one or when their boxes overlap with IoU > 0.4. Boxes are the exact tight boxes of
the *visible* pixels ([x, y, w, h] in pixel edges), ``area`` the visible pixel count.

Everything is drawn with numpy from a generator seeded by ``(seed, split, index)``, so the same seed gives
byte-identical JSON and pixels. Images are JPEG (quality 95, no chroma subsampling); every file is written
atomically and the two JSON files last, so their presence (with matching parameters) marks a complete set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path, read_json, write_json

SHAPE_KINDS = ("circle", "square", "triangle")
FORMAT = "qdetr-shapes/1"
_MAX_HIDDEN = 0.25
_MAX_BOX_IOU = 0.4


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.integers(3, 7))
    low = rng.random((cells, cells, 3)).astype(np.float32)
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted texture, float32 [size,size,3] in [0,255]."""
    kind = int(rng.integers(3))
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        t = _smooth_noise(rng, size)
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        t = (0.5 + 0.5 * np.sin(2 * np.pi * phase))[..., None]
    img = c0 + (c1 - c0) * t
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.float32)


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A filled shape of extent 15-45 % of the image at a random place fully inside it."""
    s = rng.uniform(0.15, 0.45) * size
    x0, y0 = rng.uniform(0, size - s), rng.uniform(0, size - s)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    if kind == "circle":
        r = s / 2
        return (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
    if kind == "square":
        return (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
    # triangle: apex at the top middle, base at the bottom (a flip makes it point down)
    apex_y, base_y = (y0, y0 + s) if rng.random() < 0.5 else (y0 + s, y0)
    frac = (yy - apex_y) / (base_y - apex_y)
    inside = (frac >= 0) & (frac <= 1)
    return inside & (np.abs(xx - (x0 + s / 2)) <= frac * s / 2)


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def _box_iou(a: list[int], b: list[int]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def _fits(mask: np.ndarray, owner: np.ndarray, placed: list[tuple[int, int]]) -> bool:
    """True when ``mask`` hides at most a quarter of every earlier shape and no box overlaps too much."""
    box = _box(mask)
    for k, _ in placed:
        visible = owner == k
        if (visible & mask).sum() > _MAX_HIDDEN * visible.sum():
            return False
        if _box_iou(box, _box(visible)) > _MAX_BOX_IOU:
            return False
    return True


def _colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A saturated colour, the farthest of a few candidates from the mean background under the shape."""
    candidates = rng.uniform(0, 255, (8, 3))
    candidates[np.arange(8), rng.integers(0, 3, 8)] = rng.choice([0.0, 255.0], 8)  # push to a cube face
    dist = np.linalg.norm(candidates - under.mean(axis=0), axis=1)
    return candidates[int(dist.argmax())]


def draw_image(rng: np.random.Generator, size: int, classes: tuple[str, ...], max_shapes: int):
    """One image (uint8 [size,size,3]) and its objects as (class index, [x,y,w,h], visible area)."""
    img = _background(rng, size)
    owner = np.zeros((size, size), dtype=np.int32)  # 0 = background, k = k-th shape
    placed: list[tuple[int, int]] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(len(classes)))
        for _attempt in range(30):
            mask = _shape_mask(rng, classes[cls], size)
            if mask.any() and _fits(mask, owner, placed):
                break
        else:
            continue
        img[mask] = _colour(rng, img[mask])
        owner[mask] = len(placed) + 1
        placed.append((len(placed) + 1, cls))
    objects = []
    for k, cls in placed:
        visible = owner == k
        objects.append((cls, _box(visible), int(visible.sum())))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _params(num: int, image_size: int, seed: int, max_shapes: int, classes: tuple[str, ...]) -> dict:
    return {"format": FORMAT, "num_images": num, "image_size": image_size, "seed": seed,
            "max_shapes": max_shapes, "classes": list(classes)}


def _params_of(data: Any) -> Any:
    info = data.get("info") if isinstance(data, dict) else None
    return info.get("params") if isinstance(info, dict) else None


def _complete(ann: Path, images_dir: Path, params: dict) -> bool:
    """True when ``ann`` exists, was made with ``params`` and every image it lists exists."""
    if not ann.is_file():
        return False
    data = read_json(ann)
    if _params_of(data) != params:
        return False
    return all((images_dir / im["file_name"]).is_file() for im in data.get("images", []))


def _write_split(split: str, split_idx: int, root: Path, params: dict, bar: tqdm) -> Path:
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    classes, size = tuple(params["classes"]), params["image_size"]
    images, anns = [], []
    for i in range(params["num_images"]):
        rng = np.random.default_rng([params["seed"], split_idx, i])
        pixels, objects = draw_image(rng, size, classes, params["max_shapes"])
        name = f"{i:06d}.jpg"
        with atomic_path(images_dir / name, suffix=".jpg") as tmp:
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=95, subsampling=0)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for cls, box, area in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1, "bbox": box,
                         "area": area, "iscrowd": 0})
        bar.update(1)
    cats = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)]
    data = {"info": {"description": f"procedural shapes, {split} split", "params": params},
            "images": images, "annotations": anns, "categories": cats}
    return write_json(root / "annotations" / f"{split}.json", data)


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    num_train: int = 1200,
    num_val: int = 200,
    image_size: int = 96,
    seed: int = 0,
    max_shapes: int = 3,
    classes: tuple[str, ...] = SHAPE_KINDS,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the shapes set under ``out_dir`` (``train/``, ``val/``, ``annotations/{train,val}.json``).

    Category ids are 1..len(classes) in the order of ``classes``. A complete set made with the same
    parameters is reused unless ``overwrite``; a set made with other parameters is an error without
    ``overwrite``. Returns the paths: ``root``, ``train_images``, ``train_ann``, ``val_images``, ``val_ann``.
    """
    classes = tuple(classes)
    bad = [c for c in classes if c not in SHAPE_KINDS]
    if bad or not classes:
        raise QDetrError(f"unknown shape classes {bad}: choose from {SHAPE_KINDS}")
    if num_train < 1 or num_val < 1 or max_shapes < 1:
        raise QDetrError("num_train, num_val and max_shapes must be at least 1")
    if image_size < 16:
        raise QDetrError(f"image_size must be at least 16 pixels, got {image_size}")
    root = Path(out_dir)
    paths = {"root": root, "train_images": root / "train", "train_ann": root / "annotations" / "train.json",
             "val_images": root / "val", "val_ann": root / "annotations" / "val.json"}
    splits = {"train": _params(num_train, image_size, seed, max_shapes, classes),
              "val": _params(num_val, image_size, seed, max_shapes, classes)}
    complete = all(_complete(paths[f"{s}_ann"], paths[f"{s}_images"], p) for s, p in splits.items())
    if complete and not overwrite:
        return paths
    if not overwrite and any(paths[f"{s}_ann"].exists() for s in splits):
        _refuse_other_params(paths, splits)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with tqdm(total=num_train + num_val, desc="shapes", unit="img", disable=not progress) as bar:
        for split_idx, (split, params) in enumerate(splits.items()):
            _write_split(split, split_idx, root, params, bar)
    return paths


def _refuse_other_params(paths: dict[str, Path], splits: dict[str, Any]) -> None:
    for split, params in splits.items():
        ann = paths[f"{split}_ann"]
        if ann.is_file() and _params_of(read_json(ann)) != params:
            msg = "a shapes set with other parameters is already here; pass overwrite=True (--overwrite)"
            raise QDetrError(msg, ann)
