"""The one ``Engine`` interface and ``open_engine`` (backend chosen by the file's content, suffix as a hint).

Nothing here imports a runtime: backends are imported when a file of their kind is opened, so the
onnxruntime path never pulls in torch or TensorRT. The metadata record and its readers live in
``qdetr_deploy.deploy_format`` (re-exported here: ``METADATA_KEY``, ``parse_metadata``, ``read_metadata``).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any

import numpy as np

from qdetr_deploy.deploy_format import METADATA_KEY, REQUIRED_METADATA, parse_metadata
from qdetr_deploy.deploy_format import read_onnx_metadata as read_metadata
from qdetr_deploy.errors import QDetrError

__all__ = ["METADATA_KEY", "REQUIRED_METADATA", "Engine", "InputSpec", "check_batch", "detect_engine_kind",
           "open_engine", "parse_metadata", "read_metadata"]

TRT_MAGIC = b"QDETRTRT"
ZIP_MAGIC = b"PK\x03\x04"  # a torch.export archive (.qdtorch) is a zip
ONNX_FIRST_BYTE = 0x08  # ModelProto field 1 (ir_version, varint): onnx writes it first
ORT_SUFFIXES = (".onnx", ".ortengine")
TORCH_SUFFIX = ".qdtorch"
TRT_SUFFIXES = (".engine", ".plan", ".trt")


class InputSpec(tuple):
    """``(name, shape, dtype)``; ``shape[0]`` is an int for a static batch, a str/None when dynamic."""

    __slots__ = ()

    def __new__(cls, name: str, shape: list, dtype: str) -> InputSpec:
        return super().__new__(cls, (name, list(shape), dtype))

    name = property(lambda self: self[0])
    shape = property(lambda self: self[1])
    dtype = property(lambda self: self[2])


class Engine(abc.ABC):
    """A loaded detector: one float32 ``[B,3,H,W]`` input, outputs keyed by the ONNX output names."""

    backend: str = "?"
    path: Path

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str | os.PathLike, **opts: Any) -> Engine:
        """Open the engine file; every failure is a one-line :class:`QDetrError`."""

    @property
    @abc.abstractmethod
    def input_spec(self) -> InputSpec: ...

    @property
    @abc.abstractmethod
    def metadata(self) -> dict: ...

    @property
    @abc.abstractmethod
    def max_batch(self) -> int | None:
        """Largest batch the engine accepts (static batch: exactly that batch); None: unbounded."""

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def static_batch(self) -> int | None:
        """The fixed batch of a static-batch engine, else None."""
        first = self.input_spec.shape[0]
        return first if isinstance(first, int) and first > 0 else None

    @abc.abstractmethod
    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run on a float32 ``[B,3,H,W]`` batch (checked against :attr:`input_spec`)."""
        return self._run(self.check_input(images))

    def peak_device_memory(self) -> int | None:
        """Peak device memory in bytes, where the backend can tell; None otherwise."""
        return None

    def graph_summary(self) -> dict | None:
        """What the engine's graph contains (``onnx_graph.graph_precision``: label, quantization ops,
        integer weights), where the backend can read its graph; None otherwise."""
        return None

    def check_input(self, images: np.ndarray) -> np.ndarray:
        """Validate shape and batch; return a contiguous float32 array."""
        images = np.asarray(images)
        _, shape, _ = self.input_spec
        if images.ndim != 4 or list(images.shape[1:]) != [int(d) for d in shape[1:]]:
            want = "x".join(str(d) for d in ["B", *shape[1:]])
            raise QDetrError(f"wrong input shape {list(images.shape)}: the engine takes [{want}] float32",
                             self.path)
        check_batch(self, images.shape[0])
        return np.ascontiguousarray(images, dtype=np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backend={self.backend}, device={self.device})"


def check_batch(engine: Engine, batch: int) -> None:
    """Raise when ``batch`` does not fit the engine (static batch: must match; dynamic: <= max)."""
    static, limit = engine.static_batch, engine.max_batch
    if static is not None and batch > static:
        raise QDetrError(f"batch {batch} is larger than the engine allows (static batch {static})",
                         engine.path)
    if static is not None and batch != static:
        raise QDetrError(f"batch {batch} does not match the engine's static batch {static}", engine.path)
    if limit is not None and batch > limit:
        raise QDetrError(f"batch {batch} is larger than the engine allows (max batch {limit})", engine.path)


def detect_engine_kind(path: Path) -> str | None:
    """"tensorrt", "torch" or "onnxruntime" from the first bytes of the file; None when they say nothing."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(max(len(TRT_MAGIC), len(ZIP_MAGIC)))
    if head.startswith(TRT_MAGIC):
        return "tensorrt"
    if head.startswith(ZIP_MAGIC):
        return "torch"
    if len(head) >= 2 and head[0] == ONNX_FIRST_BYTE and 0 < head[1] < 0x80:
        return "onnxruntime"
    return None


def _kind_from_suffix(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in ORT_SUFFIXES:
        return "onnxruntime"
    if suffix == TORCH_SUFFIX:
        return "torch"
    if suffix in TRT_SUFFIXES:
        raise QDetrError("not a qdetr TensorRT engine (no QDETRTRT header): build it with qdetr-deploy "
                         "build-engine --backend tensorrt", path)
    return None


def open_engine(path: str | os.PathLike, **opts: Any) -> Engine:
    """Open an engine, choosing the backend from the file's content (the ``QDETRTRT`` header: TensorRT; a
    zip: our torch GPU engine, a ``torch.export`` archive; an ONNX protobuf: onnxruntime), the suffix only
    when the content says nothing (``.onnx``/``.ortengine``, ``.qdtorch``)."""
    path = Path(path)
    if not path.exists():
        raise QDetrError("file not found", path)
    kind = detect_engine_kind(path) or _kind_from_suffix(path)
    if kind == "tensorrt":
        from qdetr_deploy.engines.tensorrt import TrtEngine

        return TrtEngine.load(path, **opts)
    if kind == "onnxruntime":
        from qdetr_deploy.engines.onnxruntime import OrtEngine

        return OrtEngine.load(path, **opts)
    if kind == "torch":
        from qdetr_deploy.engines.torch_gpu import TorchGpuEngine

        return TorchGpuEngine.load(path, **opts)
    raise QDetrError("unknown engine type: by its content neither an ONNX model, a qdetr TensorRT engine "
                     "(QDETRTRT header) nor a .qdtorch archive, and the suffix is not .onnx, .ortengine, "
                     ".engine or .qdtorch", path)
