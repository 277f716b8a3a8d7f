"""TensorRT backend (10.x, e.g. 10.3 on JetPack 6, and 11.x): build, the engine file header, run.

Engine file = ``b"QDETRTRT"`` + little-endian uint32 JSON length + JSON header
``{trt_version, gpu_name, compute_capability, metadata, created, build}`` + the serialized plan. The header
lets :meth:`TrtEngine.load` refuse, in one line, a plan built with another TensorRT or on another GPU. Header
reading and checking are pure functions (no TensorRT needed).

Precision: networks are strongly typed (on 10.x the STRONGLY_TYPED flag; 11.x has no other kind), so
precision follows the ONNX types: the int8 container graph runs its Q/DQ layers in int8 and its float
parts in the ONNX float type. ``fp16=True`` only takes effect on 10.x for a plain float graph
(``int8_container=False``), built weakly typed with the FP16 flag.

Before parsing, the graph is prepared (:func:`network_graph`: ``--bits 8`` makes INT4 weights INT8 exactly,
``--bits 4`` maps 4-bit linears onto the ``kernels/trt_plugins`` plugins, with ``aot`` from TensorRT 10.9)
and linted for the installed TensorRT and GPU (``export/trt_lint.py``). TensorRT below 10.3 is refused.

``tensorrt`` and ``torch`` (device buffers at run time) are imported lazily, only on this path; the build
reads the GPU name and compute capability through torch or, without it, cuda-python.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qdetr_deploy.deploy_format import read_onnx_metadata as read_metadata
from qdetr_deploy.engines.base import TRT_MAGIC, Engine, InputSpec
from qdetr_deploy.engines.trt_graph import int4_to_int8
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path

HEADER_FORMAT = "qdetr-trt/1"
NOT_INSTALLED = ("TensorRT is not installed (on a Jetson: JetPack's TensorRT, seen from a venv made with "
                 "--system-site-packages; elsewhere: pip install 'qdetr-deploy[tensorrt]')")
NO_INT4 = ("4-bit TensorRT plugins are not available in this build: use --bits 8 (int8 container graph) "
           "or --backend torch")
_LEN = struct.Struct("<I")
log = logging.getLogger(__name__)


# --- header: pure functions ------------------------------------------------------------------------------

@dataclass
class TrtHeader:
    """The JSON header of a qdetr TensorRT engine file and where its plan starts."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    metadata: dict
    created: str
    build: dict = field(default_factory=dict)
    plan_offset: int = 0

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


def encode_trt_header(header: dict) -> bytes:
    """Magic + length + JSON: the bytes that precede the plan."""
    blob = json.dumps(header, sort_keys=True).encode()
    return TRT_MAGIC + _LEN.pack(len(blob)) + blob


def parse_trt_header(data: bytes, path: str | os.PathLike = "<bytes>") -> TrtHeader:
    """Decode the header at the start of ``data`` (at least the header bytes)."""
    if data[: len(TRT_MAGIC)] != TRT_MAGIC:
        raise QDetrError("not a qdetr TensorRT engine (no QDETRTRT header)", path)
    start = len(TRT_MAGIC) + _LEN.size
    if len(data) < start:
        raise QDetrError("truncated TensorRT engine header", path)
    (n,) = _LEN.unpack_from(data, len(TRT_MAGIC))
    if len(data) < start + n:
        raise QDetrError("truncated TensorRT engine header", path)
    try:
        h = json.loads(data[start: start + n].decode())
        cc = h["compute_capability"]
        return TrtHeader(str(h["trt_version"]), str(h["gpu_name"]), (int(cc[0]), int(cc[1])),
                         dict(h["metadata"]), str(h.get("created", "")), dict(h.get("build", {})), start + n)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise QDetrError(f"malformed TensorRT engine header ({type(e).__name__}: {e})", path) from None


def read_trt_header(path: str | os.PathLike) -> TrtHeader:
    """Read only the header of an engine file."""
    path = Path(path)
    if not path.is_file():
        raise QDetrError("file not found", path)
    with open(path, "rb") as f:
        head = f.read(len(TRT_MAGIC) + _LEN.size)
        if head[: len(TRT_MAGIC)] != TRT_MAGIC or len(head) < len(TRT_MAGIC) + _LEN.size:
            return parse_trt_header(head, path)
        (n,) = _LEN.unpack_from(head, len(TRT_MAGIC))
        return parse_trt_header(head + f.read(n), path)


def _version_key(version: str) -> tuple[int, ...]:
    parts = [int(p) if p.isdigit() else 0 for p in str(version).split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def check_trt_header(header: TrtHeader, trt_version: str, gpu_name: str, cc: tuple[int, int],
                     path: str | os.PathLike | None = None) -> None:
    """Fail in one line when the plan was built with another TensorRT (major.minor.patch) or GPU."""
    same_trt = _version_key(header.trt_version) == _version_key(trt_version)
    same_gpu = header.gpu_name.strip().lower() == gpu_name.strip().lower() \
        and tuple(header.compute_capability) == tuple(cc)
    if same_trt and same_gpu:
        return
    here = f"sm_{cc[0]}{cc[1]}"
    raise QDetrError(f"built with TensorRT {header.trt_version} on {header.gpu_name} ({header.sm}), "
                     f"this is TensorRT {trt_version} on {gpu_name} ({here}): rebuild the engine", path)


# --- runtime imports ----------------------------------------------------------------------------------

def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line QDetrError, also below TensorRT 10.3 (on 8.6, ``create_network(0)``
    would mean implicit batch: nothing here is written for it)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise QDetrError(NOT_INSTALLED) from None
    from qdetr_deploy.export.trt_lint import check_trt_version

    check_trt_version(trt.__version__, "the installed TensorRT")
    return trt


def _cuda() -> Any:
    """torch with a usable CUDA device (device buffers), else QDetrError."""
    try:
        import torch
    except ImportError:
        raise QDetrError("the TensorRT backend needs torch with CUDA for device buffers") from None
    if not torch.cuda.is_available():
        raise QDetrError("the TensorRT backend needs an NVIDIA GPU: torch sees no CUDA device")
    return torch


def gpu_identity() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of the current CUDA device: through torch when it has CUDA, else
    through cuda-python (a Jetson build needs no torch: ``build-engine --bits 8``)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability())
    return _cuda_python_identity()


def _cuda_python_identity() -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of device 0 with cuda-python's runtime bindings (12.x: ``cuda.bindings``,
    older: ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise QDetrError("the TensorRT backend needs an NVIDIA GPU seen by torch (with CUDA) or by "
                             "cuda-python (pip install cuda-python), and neither is available") from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise QDetrError(f"cuda-python sees no usable GPU ({err})")
    name = props.name.split(b"\0")[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, (int(props.major), int(props.minor))


def int4_plugin_registrar() -> Any:
    """``kernels.trt_plugins.register_plugins`` for ``--bits 4``, else QDetrError(NO_INT4)."""
    try:
        from kernels import trt_plugins
    except ModuleNotFoundError as e:
        if e.name not in ("kernels", "kernels.trt_plugins"):
            raise QDetrError(f"{NO_INT4} ({e.name} is missing)") from None
        raise QDetrError(NO_INT4) from None
    if not callable(getattr(trt_plugins, "register_plugins", None)):
        raise QDetrError(NO_INT4)
    return trt_plugins.register_plugins


def register_int4_plugins(register_plugins: Any) -> str:
    """Call the kernels' plugin registration, its ``KernelError`` translated to a one-line QDetrError."""
    from kernels.errors import KernelError

    try:
        return register_plugins()
    except KernelError as e:
        raise QDetrError(str(e)) from None


def _make_logger(trt: Any) -> Any:
    class _Logger(trt.ILogger):
        """Keeps errors so a failed build can say why in one line."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))

    return _Logger()


# --- build ---------------------------------------------------------------------------------------------

def _parser_errors(parser: Any) -> str:
    """Every parser error with its node name and operator (TensorRT 10+ API), one line."""
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else f"#{err.node()}"
        op = err.node_operator() if hasattr(err, "node_operator") else "?"
        msgs.append(f"node {name or '?'} ({op}): {err.desc()}")
    return "; ".join(msgs) or "unknown parser error"


def network_graph(onnx_path: Path, bits: int, plugin_form: str | None = None) -> onnx.ModelProto:
    """The graph the parser gets: ``bits`` 8, every INT4 initializer made INT8 exactly (or a one-line
    refusal, ``trt_graph.int4_to_int8``); 4, the 4-bit linears rewritten to ``qdetr::W4A8Linear`` with the
    attribute ``aot`` when ``plugin_form`` is "qdp-aot" (TensorRT 10.9+), the 4-bit convs made INT8."""
    model = onnx.load(str(onnx_path))
    if bits == 8:
        int4_to_int8(model, onnx_path)
        return model
    from kernels.trt_plugins import aot_attribute, rewrite_int4_linears

    rewrite_int4_linears(model, aot=aot_attribute(plugin_form or "v3") == 1)
    int4_to_int8(model, onnx_path)  # what the rewrite left 4-bit (a layer it could not map) runs on INT8
    return model


def lint_network(model: onnx.ModelProto, trt_version: str, cc: tuple[int, int], path: Path) -> None:
    """The static TensorRT lint of the graph about to be parsed; a one-line QDetrError on violations. An
    opset beyond the documented range is only logged: the parser may still take the graph (an fp32 export
    at opset 21 on 10.3, say), and TensorRT has the last word."""
    from qdetr_deploy.export.trt_lint import lint_tensorrt

    found = lint_tensorrt(model, trt_version, cc)
    for v in (v for v in found if v.rule == "opset"):
        log.warning("%s: %s (export with --target tensorrt --trt-version %s to stay inside it)", path,
                    v.message, trt_version)
    found = [v for v in found if v.rule != "opset"]
    if found:
        v = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise QDetrError(f"TensorRT {trt_version} would reject it: {v.node}: {v.rule}: {v.message}{more}; "
                         "re-export with --target tensorrt, or --skip-lint to let TensorRT decide", path)


def _network(trt: Any, builder: Any, strongly_typed: bool) -> Any:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    weak_api = hasattr(trt.BuilderFlag, "FP16")  # 11.x removed weak typing: strong typing is implicit
    if strongly_typed and flag is not None and weak_api:
        return builder.create_network(1 << int(flag))
    return builder.create_network(0)


def _profile(trt: Any, builder: Any, network: Any, batches: tuple[int, int, int]) -> Any | None:
    inp = network.get_input(0)
    shape = list(inp.shape)
    if shape[0] != -1:
        return None
    lo, opt, hi = batches
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, [lo, *shape[1:]], [opt, *shape[1:]], [hi, *shape[1:]])
    return profile


def _check_batches(min_batch: int, opt_batch: int | None, max_batch: int | None) -> tuple[int, int, int]:
    hi = max_batch or max(min_batch, opt_batch or 1, 8)
    opt = opt_batch or min(max(min_batch, 1), hi)
    if not 1 <= min_batch <= opt <= hi:
        raise QDetrError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {min_batch}/{opt}/{hi}")
    return min_batch, opt, hi


def _load_timing_cache(config: Any, timing_cache: Path | None) -> None:
    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)


def _save_timing_cache(config: Any, timing_cache: Path | None) -> None:
    if timing_cache is None:
        return
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))


def build_trt_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, fp16: bool = True,
                     int8_container: bool | None = True, timing_cache: str | os.PathLike | None = None,
                     workspace_gb: float = 4, min_batch: int = 1, opt_batch: int | None = None,
                     max_batch: int | None = None, bits: int = 8, skip_lint: bool = False) -> Path:
    """Build a TensorRT engine from a qdetr ONNX model and write it with the qdetr header.
    ``int8_container=None``: decided by the metadata (``bits`` other than "fp32" -> Q/DQ container graph).
    The graph (:func:`network_graph`) is linted for the installed TensorRT and GPU first, unless
    ``skip_lint``."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if bits not in (4, 8):
        raise QDetrError(f"--bits must be 8 or 4, got {bits}")
    metadata = read_metadata(onnx_path)
    if int8_container is None:
        int8_container = str(metadata.get("bits", "fp32")) != "fp32"
    register_plugins = int4_plugin_registrar() if bits == 4 else None
    trt = import_tensorrt()
    gpu_name, cc = gpu_identity()
    form = register_int4_plugins(register_plugins) if register_plugins is not None else None
    graph = network_graph(onnx_path, bits, form)
    if not skip_lint:
        lint_network(graph, trt.__version__, cc, onnx_path)
    batches = _check_batches(min_batch, opt_batch, max_batch)
    strongly_typed = int8_container or not hasattr(trt.BuilderFlag, "FP16")
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = _network(trt, builder, strongly_typed)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.SerializeToString(), str(onnx_path)):
        raise QDetrError(f"TensorRT cannot parse it: {_parser_errors(parser)}", onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    use_fp16 = fp16 and not strongly_typed
    if use_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = _profile(trt, builder, network, batches)
    if profile is not None:
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    _load_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        why = "; ".join(logger.errors[-3:]) or "no reason given"
        raise QDetrError(f"TensorRT failed to build the engine: {why}", onnx_path)
    _save_timing_cache(config, cache_path)
    header = {
        "format": HEADER_FORMAT, "trt_version": trt.__version__, "gpu_name": gpu_name,
        "compute_capability": list(cc), "metadata": metadata,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build": {"strongly_typed": strongly_typed, "fp16_flag": use_fp16, "bits": bits,
                  "plugin_form": form,
                  "precision": "follows the ONNX types (strongly typed)" if strongly_typed else "fp32+fp16",
                  "workspace_gb": workspace_gb, "profile": list(batches) if profile is not None else None,
                  "source": str(onnx_path)},
    }
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        f.write(encode_trt_header(header))
        f.write(memoryview(plan))
    return out_path


# --- run -----------------------------------------------------------------------------------------------

class TrtEngine(Engine):
    """A deserialized TensorRT plan; device buffers are torch CUDA tensors."""

    backend = "tensorrt"

    def __init__(self, path: Path, header: TrtHeader, engine: Any, trt: Any, torch: Any) -> None:
        self.path, self.header, self.engine, self.trt, self.torch = path, header, engine, trt, torch
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise QDetrError(f"expected one input 'images', found {len(inputs)}", path)
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        shape = list(engine.get_tensor_shape(self.input_name))
        self._spec = InputSpec(self.input_name, ["batch" if d < 0 else int(d) for d in shape], "float32")
        self._max = None if shape[0] >= 0 else int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])

    @classmethod
    def load(cls, path: str | os.PathLike, **_: Any) -> TrtEngine:
        path = Path(path)
        header = read_trt_header(path)
        trt = import_tensorrt()
        torch = _cuda()
        gpu_name, cc = gpu_identity()
        check_trt_header(header, trt.__version__, gpu_name, cc, path)
        with open(path, "rb") as f:
            f.seek(header.plan_offset)
            plan = f.read()
        if header.build.get("bits") == 4:  # the plan holds qdetr::W4A8Linear plugins
            register_int4_plugins(int4_plugin_registrar())
        runtime = trt.Runtime(_make_logger(trt))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise QDetrError("TensorRT could not deserialize the plan: rebuild the engine", path)
        return cls(path, header, engine, trt, torch)

    @property
    def input_spec(self) -> InputSpec:
        return self._spec

    @property
    def metadata(self) -> dict:
        return self.header.metadata

    @property
    def max_batch(self) -> int | None:
        return self.static_batch or self._max

    @property
    def device(self) -> str:
        return "cuda"

    def _torch_dtype(self, name: str) -> Any:
        return getattr(self.torch, np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).name)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(images).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise QDetrError("TensorRT execution failed", self.path)
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def peak_device_memory(self) -> int | None:
        eng = self.engine
        size = getattr(eng, "device_memory_size_v2", None) or getattr(eng, "device_memory_size", 0)
        return int(self.torch.cuda.max_memory_allocated()) + int(size or 0)
