"""COCO bbox evaluation with pycocotools, its prints silenced and its crashes turned into one-liners.

``evaluate_coco`` returns the 12 pycocotools statistics in pycocotools order plus per-class AP (IoU
.50:.95, all areas, 100 detections). Empty detections: pycocotools' ``loadRes`` crashes on an empty list,
so an empty result set is built directly; the evaluation then gives what pycocotools defines for "no
detections": 0.0 for every statistic whose area range has ground truth, -1.0 where it has none.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import read_json

log = logging.getLogger(__name__)

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _check_gt(data: Any, path: str | os.PathLike) -> dict:
    """Validate COCO ground truth; fill ``area`` (w*h), ``iscrowd`` (0) and ``id`` when absent."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise QDetrError("malformed COCO annotations: need lists 'images', 'annotations', 'categories'", path)
    try:
        image_ids = {int(im["id"]) for im in data["images"]}
        cat_ids = {int(c["id"]) for c in data["categories"]}
        for i, ann in enumerate(data["annotations"]):
            x, y, w, h = (float(v) for v in ann["bbox"])
            ann.setdefault("area", w * h)
            ann.setdefault("iscrowd", 0)
            ann.setdefault("id", i + 1)
            if int(ann["image_id"]) not in image_ids or int(ann["category_id"]) not in cat_ids:
                raise QDetrError(f"annotation {ann['id']} refers to an unknown image or category", path)
    except (KeyError, TypeError, ValueError) as e:
        raise QDetrError(f"malformed COCO annotations ({type(e).__name__}: {e})", path) from None
    return data


def load_coco_gt(ann_file: str | os.PathLike) -> Any:
    """A pycocotools ``COCO`` from a ground-truth file, validated, without prints."""
    from pycocotools.coco import COCO

    data = _check_gt(read_json(ann_file), ann_file)
    gt = COCO()
    gt.dataset = data
    with _quiet():
        gt.createIndex()
    return gt


def _check_detections(dets: Any, gt: Any, where: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Validated detections: (those to evaluate, those ignored for a category the annotations lack)."""
    if not isinstance(dets, list):
        raise QDetrError("malformed detections: expected a JSON list of COCO results", where)
    try:
        for d in dets:
            if len(d["bbox"]) != 4:
                raise ValueError("bbox needs 4 numbers")
            d["bbox"] = [float(v) for v in d["bbox"]]
            d["score"], d["image_id"], d["category_id"] = float(d["score"]), int(d["image_id"]), \
                int(d["category_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise QDetrError(f"malformed detections ({type(e).__name__}: {e})", where) from None
    unknown = sorted({d["image_id"] for d in dets} - set(gt.getImgIds()))
    if unknown:
        raise QDetrError(f"detections name {len(unknown)} image id(s) not in the annotations "
                         f"(e.g. {unknown[0]})", where)
    cats = set(gt.getCatIds())
    return [d for d in dets if d["category_id"] in cats], [d for d in dets if d["category_id"] not in cats]


def _warn_ignored(ignored: list[dict], where: str | os.PathLike) -> list[int]:
    """One warning line for the detections of unknown categories; returns those category ids."""
    ids = sorted({d["category_id"] for d in ignored})
    if ids:
        log.warning("%s: %d detection(s) name %d category id(s) not in the annotations (e.g. %d): ignored, "
                    "as pycocotools does", os.fspath(where), len(ignored), len(ids), ids[0])
    return ids


def _load_results(gt: Any, dets: list[dict]) -> Any:
    from pycocotools.coco import COCO

    if dets:
        with _quiet():
            return gt.loadRes(dets)
    dt = COCO()  # loadRes([]) raises IndexError: build the empty result set directly
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    with _quiet():
        dt.createIndex()
    return dt


def _per_class(ev: Any, gt: Any) -> dict[str, float | None]:
    """AP@[.50:.95] per category (all areas, 100 dets); None for a category without ground truth."""
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    out: dict[str, float | None] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = gt.cats[cat_id].get("name", str(cat_id))
        name = name if name not in out else f"{name} ({cat_id})"
        out[name] = float(np.mean(p[p > -1])) if (p > -1).any() else None
    return out


def evaluate_coco(ann_file: str | os.PathLike, detections: str | os.PathLike | list[dict],
                  image_ids: list[int] | None = None, name: str | None = None) -> dict:
    """COCO bbox evaluation of ``detections`` (path or list of result dicts) against ``ann_file``;
    ``image_ids`` restricts it to those images (e.g. a subset that was run); ``name`` (e.g. the engine)
    names a list of detections in messages. Returns ``{"stats": [12 floats], "names": [...],
    "per_class": {name: AP}, "num_detections": n, "ignored_detections": m, "ignored_category_ids": [...]}``
    (``num_detections`` counts the evaluated ones; the ``m`` ignored name categories the annotations lack)."""
    from pycocotools.cocoeval import COCOeval

    gt = load_coco_gt(ann_file)
    where = detections if isinstance(detections, (str, os.PathLike)) else (name or "detections")
    dets = read_json(detections) if isinstance(detections, (str, os.PathLike)) else \
        [dict(d) for d in detections]
    dets, ignored = _check_detections(dets, gt, where)
    ignored_ids = _warn_ignored(ignored, where)
    ev = COCOeval(gt, _load_results(gt, dets), "bbox")
    if image_ids is not None:
        unknown = sorted(set(image_ids) - set(gt.getImgIds()))
        if unknown:
            raise QDetrError(f"image id {unknown[0]} is not in the annotations", ann_file)
        ev.params.imgIds = sorted(set(int(i) for i in image_ids))
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"stats": [float(s) for s in ev.stats], "names": list(STAT_NAMES),
            "per_class": _per_class(ev, gt), "num_detections": len(dets),
            "ignored_detections": len(ignored), "ignored_category_ids": ignored_ids,
            "num_images": len(ev.params.imgIds), "ann_file": str(Path(ann_file))}
