"""Torch GPU engine (``.qdtorch``): a ``torch.export`` program that runs our integer kernels.

The file is a ``torch.export.save`` archive (a zip) whose extra file ``qdetr.json`` holds the ONNX-model
metadata plus ``engine`` (device type, GPU name, compute capability, dtype); it is read with ``zipfile``
first, so an engine built for another device is refused in one line before torch loads anything.

On CUDA each batch size gets a CUDA graph: a static input buffer, warm-up calls on a side stream (Triton
autotuning happens there), one capture, then ``copy_ + replay`` per call; :meth:`peak_device_memory` is
``torch.cuda.max_memory_allocated``. On CPU the program runs eagerly on the integer reference ops.

This module imports torch and ``kernels.ops`` only, inside :func:`_import_torch` (no model, quantization or
export code); the builder is ``qdetr_deploy.export.torch_engine.build_torch_engine``, which the CLI calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from qdetr_deploy.deploy_format import read_qdtorch_metadata
from qdetr_deploy.engines.base import Engine, InputSpec
from qdetr_deploy.errors import QDetrError

__all__ = ["TorchGpuEngine", "check_device", "current_device_info", "describe_device", "kernel_summary",
           "load_engine", "read_engine_metadata"]
WARMUP_CALLS = 3


def read_engine_metadata(path: str | os.PathLike) -> dict:
    """The ``qdetr.json`` metadata of a ``.qdtorch`` file, without torch (``deploy_format``'s reader)."""
    return read_qdtorch_metadata(path)


def describe_device(info: dict) -> str:
    """``"NVIDIA H200 (sm_90)"`` or ``"cpu"`` from the metadata's ``engine.device``."""
    if info.get("type") != "cuda":
        return "cpu"
    cc = info.get("compute_capability") or ["?", "?"]
    return f"{info.get('name')} (sm_{cc[0]}{cc[1]})"


def current_device_info(torch: Any, device_type: str) -> dict:
    """The same fields for this machine's device of ``device_type`` (name None when CUDA is absent)."""
    if device_type != "cuda":
        return {"type": "cpu", "name": "cpu", "compute_capability": None}
    if not torch.cuda.is_available():
        return {"type": "cuda", "name": None, "compute_capability": None}
    return {"type": "cuda", "name": torch.cuda.get_device_name(),
            "compute_capability": list(torch.cuda.get_device_capability())}


def check_device(built: dict, here: dict, path: str | os.PathLike | None = None) -> None:
    """Refuse, in one line, a CUDA engine on a machine without CUDA or with another GPU model."""
    if built.get("type") != "cuda":
        return
    if here.get("name") is None:
        raise QDetrError(f"engine built for {describe_device(built)}, but this machine has no CUDA GPU: "
                         "rebuild it here with build-engine --backend torch", path)
    same = str(here["name"]).strip().lower() == str(built.get("name", "")).strip().lower() and \
        list(here["compute_capability"]) == list(built.get("compute_capability") or [])
    if not same:
        raise QDetrError(f"engine built for {describe_device(built)}, this is {describe_device(here)}: "
                         "rebuild the engine on this GPU", path)


def _import_torch() -> Any:
    try:
        import torch

        import kernels.ops  # noqa: F401  (torch.ops.qdetr.* must exist before torch.export.load)
    except ImportError as e:
        raise QDetrError(f"the torch engine needs {e.name or 'torch'}, which is not installed") from None
    return torch


class TorchGpuEngine(Engine):
    """A loaded ``.qdtorch`` program; CUDA graphs per batch size on CUDA, eager on CPU."""

    backend = "torch"

    def __init__(self, path: Path, meta: dict, module: Any, torch: Any, cuda_graphs: bool = True) -> None:
        self.path, self._meta, self.module, self.torch = path, meta, module, torch
        self._device = meta["engine"]["device"]["type"]
        self.use_graphs = cuda_graphs and self._device == "cuda"
        self.output_names = list(meta.get("outputs") or ["scores", "labels", "boxes"])
        h, w = (int(v) for v in meta["input_size"])
        first = "batch" if meta.get("dynamic_batch") else int(meta.get("batch") or 1)
        self._spec = InputSpec("images", [first, 3, h, w], "float32")
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, cuda_graphs: bool = True, **_: Any) -> TorchGpuEngine:
        """Read and check the metadata, then ``torch.export.load`` the program on its device."""
        path = Path(path)
        meta = read_engine_metadata(path)
        torch = _import_torch()
        built = meta["engine"]["device"]
        check_device(built, current_device_info(torch, built.get("type", "cpu")), path)
        try:
            with open(path, "rb") as f:
                program = torch.export.load(f)
        except Exception as e:  # a damaged archive or another torch's serialization
            why = " ".join(str(e).split())[:160]
            raise QDetrError(f"torch.export.load failed ({type(e).__name__}: {why}): rebuild the engine with "
                             f"torch {torch.__version__}", path) from None
        return cls(path, meta, program.module(), torch, cuda_graphs)

    @property
    def input_spec(self) -> InputSpec:
        return self._spec

    @property
    def metadata(self) -> dict:
        return self._meta

    @property
    def max_batch(self) -> int | None:
        return self.static_batch or int(self._meta.get("max_batch") or 0) or None

    @property
    def device(self) -> str:
        return self._device

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(images)
        with torch.inference_mode():
            if self.use_graphs:
                outs = self._replay(x)
            else:
                outs = self.module(x.to(self._device))
            return {n: o.cpu().numpy() for n, o in zip(self.output_names, outs)}

    def _replay(self, x: Any) -> tuple[Any, ...]:
        """Copy into the static input of this batch size's CUDA graph (captured on first use) and replay."""
        batch = int(x.shape[0])
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch)
        graph, static_in, static_out = self._graphs[batch]
        static_in.copy_(x, non_blocking=False)
        graph.replay()
        return static_out

    def _capture(self, batch: int) -> tuple[Any, Any, Any]:
        """Warm up on a side stream (autotuning, lazy init), then capture one call into a CUDA graph."""
        torch = self.torch
        static_in = torch.zeros([batch, *self._spec.shape[1:]], dtype=torch.float32, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.module(static_in)
        return graph, static_in, tuple(static_out)

    def peak_device_memory(self) -> int | None:
        """``torch.cuda.max_memory_allocated()`` on CUDA (bytes); None on CPU."""
        if self._device != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated())


def kernel_summary(meta: dict) -> str:
    """One line: how many quantized layers run the int4 kernels, and what the others lack (grouped by
    reason, with a count and the first layer of each), from the metadata's ``engine``."""
    eng = meta.get("engine") or {}
    fake: dict[str, str] = eng.get("fake_quant_layers") or {}
    n_int = int(eng.get("int_layers") or 0)
    line = f"int4 kernels: {n_int} of {n_int + len(fake)} quantized layers"
    if not fake:
        return line
    groups: dict[str, list[str]] = {}
    for name, reason in fake.items():
        groups.setdefault(reason, []).append(name)
    parts = [f"{len(names)} with {reason} (e.g. {names[0]})" for reason, names in groups.items()]
    return f"{line}; float fake-quant: " + "; ".join(parts)


def load_engine(path: str | os.PathLike, **opts: Any) -> TorchGpuEngine:
    """``open_engine``'s entry point for ``.qdtorch`` files."""
    return TorchGpuEngine.load(path, **opts)
