"""Calibration images: listed from a folder and preprocessed for ``quantize`` and the export parity check.

Images go through the deployment preprocessing of the ONNX contract (``bench/preprocess.py``: RGB, resize
to fit the canvas keeping the aspect ratio, normalise, pad bottom/right with zeros), so the steps are
calibrated on exactly what the exported model will see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qdetr_deploy.bench.preprocess import preprocess
from qdetr_deploy.deploy_format import IMAGENET_MEAN, IMAGENET_STD
from qdetr_deploy.errors import QDetrError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files of ``folder`` (sorted by name, recursive), at most ``limit``; none -> QDetrError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QDetrError("image folder not found" if not folder.exists() else "not a folder", folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QDetrError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder", folder)
    return files[:limit] if limit else files


def load_images(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Preprocessed canvases [N,3,H,W] float32."""
    return np.stack([preprocess(f, size, IMAGENET_MEAN, IMAGENET_STD).array for f in files])


def image_batches(files: list[Path], size: tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches [B,3,H,W] of preprocessed images, loaded lazily."""
    for i in range(0, len(files), batch_size):
        yield torch.from_numpy(load_images(files[i:i + batch_size], size))
