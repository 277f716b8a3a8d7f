"""Preprocessing and post-processing for engines (numpy + PIL only, no torch).

Contract (docs/ARCHITECTURE.md): RGB, resize keeping aspect ratio so the image fits the canvas ``(H, W)``,
normalise with the model's mean/std, pad bottom/right with zeros; detections are divided by the resize
scale to return to original image pixels, and labels go through ``category_ids``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from qdetr_deploy.errors import QDetrError


class Preprocessed(NamedTuple):
    """One image on the canvas: ``array [3,H,W]`` float32, resize ``scale``, ``orig_size`` (h, w)."""

    array: np.ndarray
    scale: float
    orig_size: tuple[int, int]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is a one-line QDetrError naming it."""
    path = Path(path)
    if not path.is_file():
        raise QDetrError("image not found", path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QDetrError(f"unreadable image ({type(e).__name__})", path) from None


def fit_scale(orig_size: tuple[int, int], canvas: tuple[int, int]) -> float:
    """Scale that makes an (h, w) image fit in the (H, W) canvas, keeping the aspect ratio."""
    (h, w), (H, W) = orig_size, canvas
    return min(H / h, W / w)


def preprocess(image: str | os.PathLike | Image.Image, input_size: tuple[int, int] | list[int],
               mean: list[float], std: list[float]) -> Preprocessed:
    """Load (if a path), resize to fit ``input_size`` (H, W), normalise, pad bottom/right with zeros."""
    im = image if isinstance(image, Image.Image) else load_image(image)
    im = im.convert("RGB")
    H, W = int(input_size[0]), int(input_size[1])
    w0, h0 = im.size
    scale = fit_scale((h0, w0), (H, W))
    nh, nw = min(H, max(1, round(h0 * scale))), min(W, max(1, round(w0 * scale)))
    resized = np.asarray(im.resize((nw, nh), Image.BILINEAR), dtype=np.float32) / 255.0
    normed = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    canvas = np.zeros((3, H, W), np.float32)
    canvas[:, :nh, :nw] = normed.transpose(2, 0, 1)
    return Preprocessed(canvas, float(scale), (h0, w0))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _xyxy_pixels(pred_boxes: np.ndarray, input_size: tuple[int, int] | list[int]) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(pred_boxes.astype(np.float64), -1, 0)
    xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    H, W = input_size
    return xyxy * np.array([W, H, W, H], np.float64)


def postprocess_logits(pred_logits: np.ndarray, pred_boxes: np.ndarray,
                       input_size: tuple[int, int] | list[int], scoring: str = "softmax",
                       topk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy twin of the models' post-processing, cxcywh -> xyxy in canvas pixels. ``scoring``:
    "softmax" (DETR, ``models/postprocess.py``): softmax, drop the last (no-object) column, max over
    classes, one detection per query, scores/labels/boxes [B,Q]; "sigmoid" (SMCA-DETR, the numpy twin of
    ``models.postprocess.sigmoid_topk``): a sigmoid per class and the ``topk`` (default Q) highest
    (query, class) pairs, [B,topk]."""
    if scoring == "softmax":
        prob = _softmax(pred_logits.astype(np.float64))[..., :-1]
        scores, labels = prob.max(axis=-1), prob.argmax(axis=-1)
        xyxy = _xyxy_pixels(pred_boxes, input_size)
    elif scoring == "sigmoid":
        B, Q, C = pred_logits.shape
        prob = _sigmoid(pred_logits.astype(np.float64)).reshape(B, Q * C)
        order = np.argsort(-prob, axis=1, kind="stable")[:, : min(topk or Q, Q * C)]  # [B,k]
        scores, labels = np.take_along_axis(prob, order, 1), order % C
        xyxy = np.take_along_axis(_xyxy_pixels(pred_boxes, input_size), (order // C)[..., None], 1)
    else:
        raise QDetrError(f"unknown scoring {scoring!r} in the model's metadata: use softmax or sigmoid")
    return scores.astype(np.float32), labels.astype(np.int64), xyxy.astype(np.float32)


def outputs_to_detections(outputs: dict[str, np.ndarray], metadata: dict) -> tuple[np.ndarray, ...]:
    """scores, labels, boxes (xyxy, canvas pixels) from either output convention of the contract; raw
    logits are scored as the metadata says (``scoring``, default "softmax")."""
    if {"scores", "labels", "boxes"} <= outputs.keys():
        return outputs["scores"], outputs["labels"].astype(np.int64), outputs["boxes"]
    if {"pred_logits", "pred_boxes"} <= outputs.keys():
        return postprocess_logits(outputs["pred_logits"], outputs["pred_boxes"], metadata["input_size"],
                                  metadata.get("scoring", "softmax"))
    raise QDetrError(f"engine outputs {sorted(outputs)} are neither scores/labels/boxes nor "
                     "pred_logits/pred_boxes")


def detections_to_coco(scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, scale: float, image_id: int,
                       category_ids: list[int] | None, score_threshold: float = 0.0, topk: int = 100,
                       image_size: tuple[int, int] | None = None) -> list[dict]:
    """COCO result dicts for one image: canvas xyxy -> original pixels ``[x, y, w, h]`` (divided by
    ``scale``, clipped to ``image_size`` (h, w) when given), labels mapped through ``category_ids`` (label
    index itself when None), the ``topk`` highest scores at or above ``score_threshold``."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.int64)
    xyxy = np.asarray(boxes, np.float64) / scale
    if image_size is not None:
        h, w = image_size
        xyxy = np.clip(xyxy, 0, [w, h, w, h])
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_threshold][:topk]
    if category_ids is not None and len(order) and labels[order].max() >= len(category_ids):
        raise QDetrError(f"label {int(labels[order].max())} has no category id "
                         f"(the model lists {len(category_ids)})")
    out = []
    for i in order:
        x0, y0, x1, y1 = xyxy[i]
        cat = int(category_ids[labels[i]]) if category_ids is not None else int(labels[i])
        bbox = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        out.append({"image_id": int(image_id), "category_id": cat, "bbox": bbox, "score": float(scores[i])})
    return out
