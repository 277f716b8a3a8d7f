"""COCO-format detection datasets, as upstream DETR reads them (``datasets/coco.py``), with clear errors.

The annotation JSON is read with plain :mod:`json` and checked once at construction: every problem in it
(missing file, malformed JSON, missing ``images``/``annotations``/``categories`` lists, an annotation with a
bad bbox or an unknown image/category, no images at all) is a one-line :class:`QDetrError` naming the file.

Bad images (missing, truncated, unreadable, size different from the JSON's ``width``/``height``):
- ``on_bad_image="fail"`` (default): :class:`QDetrError` naming the image file. Missing files are found at
  construction (one ``stat`` per image), decoding errors when the image is read.
- ``on_bad_image="skip"``: missing files are dropped at construction; an image that fails to decode is
  replaced by the next good image (cyclically) in ``__getitem__``. Every bad file is recorded once in
  ``dataset.skipped`` (per process: DataLoader workers keep their own list). Call :meth:`validate` to
  decode every image up front and drop the bad ones, so that ``len(dataset)`` counts good images only.

Images are converted to RGB with PIL's ``convert("RGB")`` (grayscale, palette, CMYK; alpha is dropped), as
upstream; EXIF orientation is ignored, as COCO annotations refer to the stored pixels.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import read_json

log = logging.getLogger(__name__)

LABEL_MODES = ("contiguous", "category_id")
BAD_IMAGE_MODES = ("fail", "skip")


def _require_list(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise QDetrError(f'not a COCO annotation file: no "{key}" list', path)
    return data[key]


def _parse_categories(cats: list, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in cats:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise QDetrError(f"category without an integer id: {str(c)[:80]}", path)
        if c["id"] in out:
            raise QDetrError(f"duplicate category id {c['id']}", path)
        if c["id"] < 0:
            raise QDetrError(f"negative category id {c['id']}", path)
        out[c["id"]] = str(c.get("name", c["id"]))
    if not out:
        raise QDetrError('no categories in "categories"', path)
    return out


def _parse_images(images: list, path: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for im in images:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not im.get("file_name"):
            raise QDetrError(f"image entry without integer id and file_name: {str(im)[:80]}", path)
        if im["id"] in out:
            raise QDetrError(f"duplicate image id {im['id']}", path)
        out[im["id"]] = im
    if not out:
        raise QDetrError("empty dataset: no images", path)
    return out


def _check_bbox(ann: dict, path: Path) -> list[float]:
    bbox = ann.get("bbox")
    ok = isinstance(bbox, list) and len(bbox) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ok = ok and all(math.isfinite(v) for v in bbox)
    if not ok or bbox[2] < 0 or bbox[3] < 0:
        raise QDetrError(
            f"annotation {ann.get('id')} (image {ann.get('image_id')}) has a bad bbox {str(bbox)[:60]}: "
            "expected [x, y, w, h], finite numbers, w and h >= 0",
            path,
        )
    return [float(v) for v in bbox]


def _parse_annotations(anns: list, images: dict, cats: dict, path: Path) -> dict[int, list[dict]]:
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for a in anns:
        if not isinstance(a, dict):
            raise QDetrError(f"annotation is not an object: {str(a)[:60]}", path)
        if a.get("image_id") not in per_image:
            raise QDetrError(f"annotation {a.get('id')} refers to unknown image id {a.get('image_id')}", path)
        if a.get("category_id") not in cats:
            raise QDetrError(f"annotation {a.get('id')} has unknown category id {a.get('category_id')}", path)
        bbox = _check_bbox(a, path)
        per_image[a["image_id"]].append(
            {"bbox": bbox, "category_id": a["category_id"], "iscrowd": int(a.get("iscrowd", 0) or 0),
             "area": float(a.get("area", bbox[2] * bbox[3]))}
        )
    return per_image


def _image_record(anns: list[dict], labels: dict[int, int]) -> dict[str, np.ndarray]:
    """Non-crowd annotations of one image as arrays: xywh boxes, labels, area (compact and picklable)."""
    anns = [a for a in anns if a["iscrowd"] == 0]
    return {
        "boxes": np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4),
        "labels": np.array([labels[a["category_id"]] for a in anns], dtype=np.int64),
        "area": np.array([a["area"] for a in anns], dtype=np.float32),
    }


def load_image(path: Path, expected_wh: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully and convert it to RGB; any failure is a QDetrError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise QDetrError("image file not found", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise QDetrError(f"cannot read image: {e}", path) from None
    if expected_wh is not None and all(expected_wh) and rgb.size != tuple(expected_wh):
        raise QDetrError(f"image is {rgb.size[0]}x{rgb.size[1]} but the annotation file says "
                         f"{expected_wh[0]}x{expected_wh[1]}", path)
    return rgb


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set; items are ``(image, target)`` as upstream DETR builds them.

    ``target``: ``boxes`` (xyxy pixels before ``transforms``; normalised cx,cy,w,h after
    :class:`~qdetr_deploy.data.transforms.Normalize`), ``labels`` int64, ``image_id`` [1], ``area``,
    ``iscrowd`` (all zero: crowd boxes are dropped), ``orig_size`` and ``size`` as (h, w).
    Boxes are clipped to the image and boxes left empty are dropped (upstream ``ConvertCocoPolysToMask``).

    ``label_mode="contiguous"``: sorted category ids map to labels 0..C-1; ``category_ids[label]`` is the
    COCO id. ``label_mode="category_id"``: the label is the category id (upstream's COCO convention,
    ``num_classes = max id + 1``, ``category_ids`` is the identity and ``class_names`` has "N/A" in gaps).
    Images are ordered by image id.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        label_mode: str = "contiguous",
        on_bad_image: str = "fail",
    ) -> None:
        if label_mode not in LABEL_MODES:
            raise QDetrError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if on_bad_image not in BAD_IMAGE_MODES:
            raise QDetrError(f"on_bad_image must be one of {BAD_IMAGE_MODES}, got {on_bad_image!r}")
        self.images_dir, self.ann_file = Path(images_dir), Path(ann_file)
        self.transforms, self.label_mode, self.on_bad_image = transforms, label_mode, on_bad_image
        self.skipped: list[str] = []
        if not self.images_dir.is_dir():
            raise QDetrError("image folder not found", self.images_dir)
        data = read_json(self.ann_file)
        for key in ("images", "annotations", "categories"):
            _require_list(data, key, self.ann_file)
        cats = _parse_categories(data["categories"], self.ann_file)
        images = _parse_images(data["images"], self.ann_file)
        per_image = _parse_annotations(data["annotations"], images, cats, self.ann_file)
        self._set_categories(cats)
        labels = {cid: self.category_ids.index(cid) for cid in cats}
        self.images = [images[i] for i in sorted(images)]
        self.records = {i: _image_record(per_image[i], labels) for i in images}
        self._drop_missing_files()

    def _set_categories(self, cats: dict[int, str]) -> None:
        if self.label_mode == "contiguous":
            self.category_ids = sorted(cats)
            self.class_names = [cats[c] for c in self.category_ids]
        else:
            self.category_ids = list(range(max(cats) + 1))
            self.class_names = [cats.get(c, "N/A") for c in self.category_ids]

    @property
    def num_classes(self) -> int:
        """Number of real classes C (the model has C + 1 logits, the last one for no-object)."""
        return len(self.category_ids)

    def _drop_missing_files(self) -> None:
        good = []
        for im in self.images:
            path = self.images_dir / im["file_name"]
            if path.is_file():
                good.append(im)
            elif self.on_bad_image == "fail":
                raise QDetrError(f"image file not found (listed in {self.ann_file})", path)
            else:
                self._record_skip(path, "image file not found")
        if not good:
            raise QDetrError(f"no readable images in {self.images_dir}", self.ann_file)
        self.images = good

    def _record_skip(self, path: Path, reason: str) -> None:
        if str(path) not in self.skipped:
            self.skipped.append(str(path))
            log.warning("skipping %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> Image.Image:
        im = self.images[index]
        wh = (im.get("width") or 0, im.get("height") or 0)
        return load_image(self.images_dir / im["file_name"], wh)

    def _load_good(self, index: int) -> tuple[int, Image.Image]:
        """The image at ``index`` or, in skip mode, the next one that decodes."""
        for step in range(len(self.images)):
            i = (index + step) % len(self.images)
            try:
                return i, self._load(i)
            except QDetrError as e:
                if self.on_bad_image == "fail":
                    raise
                self._record_skip(self.images_dir / self.images[i]["file_name"], str(e))
        raise QDetrError(f"no readable images in {self.images_dir}", self.ann_file)

    def target(self, index: int, image_wh: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Upstream's target dict for image ``index`` (xyxy pixel boxes, clipped, empty boxes dropped)."""
        im, (w, h) = self.images[index], image_wh
        rec = self.records[im["id"]]
        boxes = torch.from_numpy(rec["boxes"]).clone()
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        n = int(keep.sum())
        return {
            "boxes": boxes[keep],
            "labels": torch.from_numpy(rec["labels"])[keep],
            "image_id": torch.tensor([im["id"]]),
            "area": torch.from_numpy(rec["area"])[keep],
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }

    def __getitem__(self, index: int) -> tuple[Any, dict[str, torch.Tensor]]:
        index, image = self._load_good(index)
        target = self.target(index, image.size)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def validate(self) -> list[str]:
        """Decode every image once. Skip mode: drop bad ones (recorded in ``skipped``); fail mode: raise."""
        good = []
        for i, im in enumerate(self.images):
            try:
                self._load(i)
                good.append(im)
            except QDetrError as e:
                if self.on_bad_image == "fail":
                    raise
                self._record_skip(self.images_dir / im["file_name"], str(e))
        if not good:
            raise QDetrError(f"no readable images in {self.images_dir}", self.ann_file)
        self.images = good
        return list(self.skipped)


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pad images to the largest H and W of the batch (bottom/right, zeros).

    Returns ``images [B,3,Hmax,Wmax]``, ``mask [B,Hmax,Wmax]`` (bool, True = padding) and the target list.
    """
    images = [b[0] for b in batch]
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for k, im in enumerate(images):
        out[k, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        mask[k, : im.shape[-2], : im.shape[-1]] = False
    return out, mask, [b[1] for b in batch]
