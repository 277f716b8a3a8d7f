"""COCO evaluation during training: predictions in original pixels, gathered from every rank, scored once."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from qdetr_deploy.models import postprocess
from qdetr_deploy.train import distributed as D


def _detections(outputs: dict, targets: list[dict], category_ids: list[int], valid: set[int]) -> dict:
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    scores, labels, boxes = postprocess(outputs["pred_logits"], outputs["pred_boxes"], sizes)
    per_image: dict[int, list[dict]] = {}
    for t, s, lab, b in zip(targets, scores.cpu(), labels.cpu(), boxes.cpu()):
        dets = per_image.setdefault(int(t["image_id"]), [])
        for score, label, (x0, y0, x1, y1) in zip(s.tolist(), lab.tolist(), b.tolist()):
            cat = category_ids[label]
            if cat in valid:
                dets.append({"image_id": int(t["image_id"]), "category_id": cat,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return per_image


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ann_file: str, category_ids: list[int],
             class_names: list[str], device: torch.device, progress: bool = False) -> dict[str, float]:
    """COCO bbox AP of ``model`` on ``loader``'s images (every rank runs its share; all get the result)."""
    from qdetr_deploy.bench.cocoeval import evaluate_coco  # no torch in there: safe to import lazily

    was_training = model.training
    model.eval()
    valid = {c for c, n in zip(category_ids, class_names) if n != "N/A"}
    per_image: dict[int, list[dict]] = {}
    for images, mask, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        out = model(images.to(device), mask.to(device))
        for image_id, dets in _detections(out, targets, category_ids, valid).items():
            per_image.setdefault(image_id, dets)
    model.train(was_training)
    gathered = D.all_gather_object(per_image)
    metrics = None
    if D.is_main_process():
        merged: dict[int, list[dict]] = {}
        for part in gathered:
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        result = evaluate_coco(ann_file, [d for dets in merged.values() for d in dets], sorted(merged))
        metrics = dict(zip(result["names"], result["stats"]))
    return D.broadcast_object(metrics)
