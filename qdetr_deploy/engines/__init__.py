"""Engines: one :class:`Engine` interface, backends chosen by file (``open_engine``).

Backends are imported lazily: ``onnxruntime`` (CPU, or CUDA/TensorRT execution providers),
``tensorrt`` (TensorRT 10.x/11.x with a qdetr header) and ``torch_gpu`` (our kernels, added later).
"""

from qdetr_deploy.engines.base import Engine, InputSpec, check_batch, open_engine, read_metadata

__all__ = ["Engine", "InputSpec", "check_batch", "open_engine", "read_metadata"]
