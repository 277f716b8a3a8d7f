"""The deployment file format, owned here and nowhere else: the ``qdetr`` metadata record that travels with
every exported model and engine (docs/ARCHITECTURE.md "ONNX model"), where it is stored, how it is read back,
the normalisation constants it names, and file hashing.

Torch-free (stdlib only; ``onnx`` is imported inside :func:`read_onnx_metadata`), so both the exporters and
the engines import it and neither imports the other.

Where the record lives:

- ONNX models and ortengines: ``metadata_props[METADATA_KEY]`` (a JSON string), and for exported models
  also the sidecar ``<model>.onnx.json``;
- ``.qdtorch`` engines: the extra file ``METADATA_FILE`` of the ``torch.export`` zip archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qdetr_deploy.errors import QDetrError

ONNX_FORMAT = "qdetr-onnx/1"
TORCH_FORMAT = "qdetr-torch/1"
METADATA_KEY = "qdetr"  # ONNX metadata_props key
METADATA_FILE = "qdetr.json"  # extra file of a .qdtorch archive
REQUIRED_METADATA = ("input_size", "mean", "std", "postprocess")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = (800, 800)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_metadata(*, format: str, input_size: Sequence[int], class_names: Sequence[str],
                   category_ids: Sequence[int] | None, num_classes: int, postprocess: bool, batch: int | None,
                   bits: str, quant_config: dict | None, target: str, source: dict | None,
                   max_batch: int | None = None, **extra: Any) -> dict[str, Any]:
    """The ``qdetr`` metadata record, keys in the documented order. ``batch=None``: a dynamic batch;
    ``max_batch``: recorded (after ``batch``) by engines that have one; ``extra`` is appended (the torch
    engine's ``outputs`` and ``engine``)."""
    record = {
        "format": format, "input_size": [int(input_size[0]), int(input_size[1])], "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD), "class_names": list(class_names),
        "category_ids": list(category_ids) if category_ids is not None else None,
        "num_classes": int(num_classes), "postprocess": bool(postprocess), "dynamic_batch": batch is None,
        "batch": batch,
    }
    if max_batch is not None:
        record["max_batch"] = max_batch
    record.update({"bits": bits, "quant_config": quant_config, "target": target, "source": source})
    record.update(extra)
    return record


def class_names_of(config: Any) -> list[str]:
    """A ``DetrConfig``'s class names, or ``class_<i>`` placeholders when it has none."""
    if config.class_names:
        return list(config.class_names)
    return [f"class_{i}" for i in range(config.num_classes)]


def default_size(checkpoint_meta: Any, model_meta: dict | None = None) -> tuple[int, int]:
    """The input size to export/build at when none is given: the ONNX model's own ``input_size``, else the
    checkpoint's calibration size (``meta["calibration"]["image_size"]``), else :data:`DEFAULT_IMAGE_SIZE`."""
    if model_meta and model_meta.get("input_size"):
        return tuple(int(v) for v in model_meta["input_size"])
    meta = checkpoint_meta if isinstance(checkpoint_meta, dict) else {}
    size = (meta.get("calibration") or {}).get("image_size")
    return (int(size[0]), int(size[1])) if size else DEFAULT_IMAGE_SIZE


def parse_metadata(text: str | None, path: str | os.PathLike) -> dict:
    """Decode and minimally validate the ``qdetr`` metadata JSON string."""
    if text is None:
        raise QDetrError("not a qdetr-deploy model (no 'qdetr' metadata): export it with qdetr-deploy export",
                         path)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise QDetrError(f"malformed 'qdetr' metadata JSON: {e.msg}", path) from None
    if not isinstance(meta, dict):
        raise QDetrError("malformed 'qdetr' metadata: not a JSON object", path)
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise QDetrError(f"'qdetr' metadata lacks {', '.join(missing)}", path)
    return meta


def read_onnx_metadata(onnx_path: str | os.PathLike) -> dict:
    """``metadata_props["qdetr"]`` of an ONNX file as a dict (weights are not loaded into a runtime)."""
    import onnx  # local: only this reader needs the onnx package

    path = Path(onnx_path)
    if not path.is_file():
        raise QDetrError("file not found", path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise QDetrError(f"not an ONNX file ({type(e).__name__})", path) from None
    if not model.graph.node and not model.graph.input:
        raise QDetrError("not an ONNX file (no graph)", path)
    props = {p.key: p.value for p in model.metadata_props}
    return parse_metadata(props.get(METADATA_KEY), path)


def read_sidecar(sidecar_path: str | os.PathLike) -> dict:
    """The sidecar ``<model>.onnx.json`` written by the exporter, validated like the embedded record."""
    path = Path(sidecar_path)
    if not path.is_file():
        raise QDetrError("file not found", path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise QDetrError(f"cannot read the metadata sidecar ({type(e).__name__})", path) from None
    return parse_metadata(text, path)


def read_qdtorch_metadata(path: str | os.PathLike) -> dict:
    """The ``qdetr.json`` metadata of a ``.qdtorch`` file, without torch; one-line QDetrError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise QDetrError("file not found", path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{METADATA_FILE}")]
            if not names:
                raise QDetrError("not a qdetr torch engine (no qdetr.json in the archive)", path)
            meta = json.loads(z.read(names[0]).decode())
    except (zipfile.BadZipFile, OSError) as e:
        raise QDetrError(f"not a qdetr torch engine ({type(e).__name__}): rebuild it with build-engine "
                         "--backend torch", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise QDetrError("malformed qdetr.json metadata in the engine", path) from None
    if not isinstance(meta, dict) or meta.get("format") != TORCH_FORMAT or "engine" not in meta:
        raise QDetrError(f"not a {TORCH_FORMAT} engine (unknown metadata format)", path)
    return meta
