"""``predict``: run a model on pictures, draw its detections, write them as COCO results.

MODEL is a checkpoint (PyTorch; fake quantization when quantized), an ONNX export or an engine. Every
kind goes through the bench's one path (``bench.run.detect_batch``: the one letterbox rule, the engine run,
the post-processing the model's metadata names), so a checkpoint and its export agree: a checkpoint is
wrapped as an :class:`~qdetr_deploy.engines.Engine` (:class:`CheckpointEngine`) with the metadata its
export would carry.

Writes into the output folder, atomically: each picture with its boxes, class names and scores drawn (a
JPEG stays JPEG, anything else becomes PNG; pictures under ``DISPLAY_MIN`` pixels are enlarged for
reading, the boxes with them), ``detections.json`` (COCO results: original image pixels, COCO category
ids) and ``images.json`` (the image ids, files and sizes those results refer to, and the categories).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from qdetr_deploy.bench.preprocess import load_image
from qdetr_deploy.bench.run import detect_batch, run_batch_for
from qdetr_deploy.engines import Engine, InputSpec, open_engine
from qdetr_deploy.engines.base import detect_engine_kind
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
ENGINE_SUFFIXES = (".onnx", ".ortengine", ".qdtorch", ".engine", ".plan", ".trt")
#: pictures whose longer side is shorter are drawn enlarged (nearest neighbour) by a whole factor
DISPLAY_MIN = 480
#: distinct colours that keep white or black text readable (by category id, cycling)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
           (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
           (255, 225, 25), (128, 128, 128)]
#: a checkpoint's post-processing by its architecture (``detr_config.arch``; a DetrConfig has none: DETR)
SCORING = {"detr": "softmax", "smca": "sigmoid"}


class CheckpointEngine(Engine):
    """A checkpoint's PyTorch model behind the :class:`Engine` interface (CPU, float32, fake quantization
    for a quantized model): input ``images [B,3,H,W]`` at ``input_size``, outputs ``pred_logits`` and
    ``pred_boxes``, and the metadata an export of it would carry (``export.onnx_export.export_metadata``)
    plus ``scoring``, the architecture's post-processing (:data:`SCORING`)."""

    backend = "torch (checkpoint)"

    def __init__(self, path: Path, model: Any, metadata: dict) -> None:
        self.path, self.model, self._metadata = path, model, metadata

    @classmethod
    def load(cls, path: str | os.PathLike, input_size: tuple[int, int] | None = None, trust: bool = False,
             bits: str | None = None, **_: Any) -> CheckpointEngine:
        """``bits``: for a released Q-DETR checkpoint, whose files store none (``load_checkpoint``)."""
        from qdetr_deploy.checkpoints import load_checkpoint
        from qdetr_deploy.deploy_format import default_size
        from qdetr_deploy.export.onnx_export import export_metadata
        from qdetr_deploy.quant import QuantConfig

        ckpt = load_checkpoint(path, trust=trust, quant_config=QuantConfig.from_bits(bits) if bits else None)
        size = tuple(input_size) if input_size else default_size(ckpt.meta)
        meta = export_metadata(ckpt, size, target="onnxruntime", postprocess=False, batch=None)
        arch = getattr(ckpt.detr_config, "arch", "detr")
        if arch not in SCORING:
            raise QDetrError(f"no post-processing known for architecture {arch!r}", path)
        meta["scoring"] = SCORING[arch]
        return cls(Path(path), ckpt.model.eval(), meta)

    @property
    def input_spec(self) -> InputSpec:
        H, W = self._metadata["input_size"]
        return InputSpec("images", ["batch", 3, H, W], "float32")

    @property
    def metadata(self) -> dict:
        return self._metadata

    @property
    def max_batch(self) -> int | None:
        return None

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model(torch.from_numpy(images))  # no mask: the padding is part of the canvas
        return {k: out[k].float().numpy() for k in ("pred_logits", "pred_boxes")}


def open_model(path: str | os.PathLike, input_size: tuple[int, int] | None = None,
               trust: bool = False, bits: str | None = None) -> Engine:
    """A checkpoint (by its suffix) as :class:`CheckpointEngine`, anything else through
    ``engines.open_engine`` (by its content)."""
    path = Path(path)
    if not path.exists():
        raise QDetrError("model not found", path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return CheckpointEngine.load(path, input_size=input_size, trust=trust, bits=bits)
    if detect_engine_kind(path) is None and path.suffix.lower() not in ENGINE_SUFFIXES:
        raise QDetrError("unknown model type: expected a checkpoint (.safetensors, .pth), an ONNX export "
                         "(.onnx) or an engine (.ortengine, a qdetr TensorRT engine, .qdtorch)", path)
    return open_engine(path, input_size=input_size)


def collect_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (a folder's images, sorted, not recursive), in order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise QDetrError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder", item)
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise QDetrError("image or folder not found", item)
    if not files:
        raise QDetrError("no images given")
    return files


def _image_ids(files: list[Path]) -> list[int]:
    """COCO file names carry the image id (``000000000009.jpg`` -> 9): use those when every name is a
    distinct number, else 1..N in order."""
    stems = [f.stem for f in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


def _out_names(files: list[Path], out_dir: Path) -> list[Path]:
    names: list[Path] = []
    for f in files:
        ext = ".jpg" if f.suffix.lower() in (".jpg", ".jpeg") else ".png"
        name, k = out_dir / f"{f.stem}{ext}", 2
        while name in names:
            name, k = out_dir / f"{f.stem}_{k}{ext}", k + 1
        names.append(name)
    return names


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(image: Image.Image, detections: list[dict], names: dict[int, str]) -> Image.Image:
    """A copy of ``image`` with each COCO result drawn: a box in its category's colour and a filled
    label "name score" above it (inside the picture). Small pictures are enlarged first (``DISPLAY_MIN``)."""
    factor = max(1, math.ceil(DISPLAY_MIN / max(image.size))) if max(image.size) < DISPLAY_MIN else 1
    canvas = image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 240))
    font = _font(max(12, round(max(canvas.size) / 40)))
    for d in sorted(detections, key=lambda d: d["score"]):  # the most confident drawn last, on top
        x, y, w, h = (v * factor for v in d["bbox"])
        colour = PALETTE[d["category_id"] % len(PALETTE)]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        text = f"{names.get(d['category_id'], str(d['category_id']))} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * width, bottom - top + 2 * width
        tx = min(max(0.0, x), max(0.0, canvas.width - tw))
        ty = y - th if y - th >= 0 else min(y + width, canvas.height - th)
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        luma = sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114)))
        ink = (0, 0, 0) if luma > 150 else (255, 255, 255)
        draw.text((tx + width - left, ty + width - top), text, fill=ink, font=font)
    return canvas


def category_names(metadata: dict) -> dict[int, str]:
    """COCO category id -> class name, from the model's metadata (empty when it names none)."""
    names = metadata.get("class_names") or []
    ids = metadata.get("category_ids") or list(range(len(names)))
    return {int(c): str(n) for c, n in zip(ids, names)}


def _save_picture(image: Image.Image, path: Path) -> None:
    fmt = "JPEG" if path.suffix == ".jpg" else "PNG"
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"optimize": True}))


def predict(model: str | os.PathLike | Engine, inputs: list[str | os.PathLike], out_dir: str | os.PathLike,
            score_threshold: float = 0.5, topk: int = 100, input_size: tuple[int, int] | None = None,
            trust: bool = False, bits: str | None = None, progress: bool = True) -> dict:
    """Detect on each image of ``inputs`` (files or folders) with ``model`` (a path, see
    :func:`open_model`, or an open Engine); write the pictures and the JSON files into ``out_dir``
    (created when its parent exists). Returns ``{"pictures", "detections", "images", "num_detections"}``
    (paths as strings)."""
    if not 0.0 <= score_threshold <= 1.0:
        raise QDetrError(f"score threshold {score_threshold} is not in [0, 1]")
    files = collect_images(inputs)
    out = Path(out_dir)
    if not out.parent.is_dir():
        raise QDetrError(f"parent folder {out.parent} does not exist", out)
    if out.exists() and not out.is_dir():
        raise QDetrError("output path is not a folder", out)
    if any(f.resolve().parent == out.resolve() for f in files):
        raise QDetrError("the output folder holds input images that predict would overwrite: choose another",
                         out)
    engine = model if isinstance(model, Engine) else open_model(model, input_size, trust, bits)
    if not engine.metadata.get("outputs_recognised", True):
        raise QDetrError(f"its outputs {engine.metadata.get('output_names')} are not a DETR's "
                         "(pred_logits/pred_boxes or scores/labels/boxes): no detections to draw",
                         engine.path)
    run_batch = run_batch_for(engine, 1)
    names = category_names(engine.metadata)
    out.mkdir(exist_ok=True)
    pictures, results, images = _out_names(files, out), [], []
    for image_id, f, picture in tqdm(list(zip(_image_ids(files), files, pictures)), desc="predict",
                                     unit="image", disable=not progress, file=sys.stderr):
        dets = detect_batch(engine, [(image_id, f)], run_batch, score_threshold, topk)
        image = load_image(f)
        _save_picture(draw_detections(image, dets, names), picture)
        results += dets
        images.append({"id": image_id, "file_name": str(f), "width": image.width, "height": image.height,
                       "picture": picture.name})
    detections = write_json(out / "detections.json", results)
    index = write_json(out / "images.json", {
        "images": images, "categories": [{"id": c, "name": n} for c, n in sorted(names.items())],
        "model": str(engine.path), "score_threshold": score_threshold})
    return {"pictures": [str(p) for p in pictures], "detections": str(detections), "images": str(index),
            "num_detections": len(results)}
