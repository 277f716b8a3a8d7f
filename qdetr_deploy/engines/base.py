"""The one ``Engine`` interface, the qdetr metadata reader and ``open_engine`` (backend chosen by file).

Nothing here imports a runtime: backends are imported when a file of their kind is opened, so the
onnxruntime path never pulls in torch or TensorRT.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qdetr_deploy.errors import QDetrError

METADATA_KEY = "qdetr"
TRT_MAGIC = b"QDETRTRT"
ORT_SUFFIXES = (".onnx", ".ortengine")
TORCH_SUFFIX = ".qdtorch"
REQUIRED_METADATA = ("input_size", "mean", "std", "postprocess")


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


def read_metadata(onnx_path: str | os.PathLike) -> dict:
    """``metadata_props["qdetr"]`` of an ONNX file as a dict (weights are not loaded into a runtime)."""
    import onnx  # local: only this helper and the builders need the onnx package

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


def _has_trt_header(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(TRT_MAGIC)) == TRT_MAGIC


def open_engine(path: str | os.PathLike, **opts: Any) -> Engine:
    """Open an engine, choosing the backend from the file: TensorRT header, ``.onnx``/``.ortengine``
    (onnxruntime), ``.qdtorch`` (our torch GPU engine)."""
    path = Path(path)
    if not path.exists():
        raise QDetrError("file not found", path)
    if path.is_file() and _has_trt_header(path):
        from qdetr_deploy.engines.tensorrt import TrtEngine

        return TrtEngine.load(path, **opts)
    suffix = path.suffix.lower()
    if suffix in ORT_SUFFIXES:
        from qdetr_deploy.engines.onnxruntime import OrtEngine

        return OrtEngine.load(path, **opts)
    if suffix == TORCH_SUFFIX:
        return _open_torch_engine(path, **opts)
    if suffix in (".engine", ".plan", ".trt"):
        raise QDetrError("not a qdetr TensorRT engine (no QDETRTRT header): build it with qdetr-deploy "
                         "build-engine --backend tensorrt", path)
    raise QDetrError("unknown engine type: expected .onnx, .ortengine, a qdetr TensorRT engine or .qdtorch",
                     path)


def _open_torch_engine(path: Path, **opts: Any) -> Engine:
    """Dispatch to ``qdetr_deploy.engines.torch_gpu`` (added by a later change) when it exists."""
    name = "qdetr_deploy.engines.torch_gpu"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise QDetrError(f"the torch GPU engine needs {e.name}, which is not installed", path) from None
        raise QDetrError("the torch GPU engine is not available in this build "
                         "(qdetr_deploy.engines.torch_gpu is missing)", path) from None
    for attr in ("load_engine", "open_engine"):
        if hasattr(module, attr):
            return getattr(module, attr)(path, **opts)
    for attr in ("TorchGpuEngine", "TorchEngine"):
        if hasattr(module, attr):
            return getattr(module, attr).load(path, **opts)
    raise QDetrError(f"{name} provides no load_engine(path) or TorchGpuEngine.load(path)", path)
