"""ONNX Runtime backend: ``OrtEngine``, ``build_ort_engine`` and the integer-kernel report.

An "ortengine" is one ONNX file holding the graph as ONNX Runtime optimised it (QDQ fusions done: QLinearConv,
QLinearMatMul, MatMulIntegerToFloat, ...), with the ``qdetr`` metadata and the build info
(``metadata_props["qdetr_ort_build"]``), plus the sidecar ``<engine>.json``. The file is saved at level
"extended" even when the engine runs at "all": level "all" adds NCHWc layout ops that tie a saved file to
the CPU it was built on, so those are applied again when the session is created.

This module imports no torch (checked by a test in a fresh process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qdetr_deploy.deploy_format import METADATA_KEY, parse_metadata, read_onnx_metadata, sha256_file
from qdetr_deploy.engines.base import (
    ORT_SUFFIXES,
    Engine,
    InputSpec,
)
from qdetr_deploy.engines.onnx_graph import foreign_metadata, graph_precision
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path, read_json, write_json

__all__ = ["OrtEngine", "build_ort_engine", "integer_kernel_report", "kernel_report_summary",
           "format_kernel_report", "session_options", "providers_for"]

BUILD_KEY = "qdetr_ort_build"
ENGINE_FORMAT = "qdetr-ortengine/1"
BUILD_SUFFIXES = (*ORT_SUFFIXES, ".engine")  # open_engine recognises the ONNX content whatever the suffix
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
SAVE_LEVEL = {"disable": "disable", "basic": "basic", "extended": "extended", "all": "extended"}
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


# onnxruntime_session_options_config_keys.h (kOrtSessionOptionsQDQMatMulNBitsAccuracyLevel)
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def providers_for(provider: str) -> list[str]:
    """Execution providers for ``provider`` ("cpu", "cuda", "tensorrt"); fail when this ORT lacks one."""
    if provider not in PROVIDERS:
        raise QDetrError(f"unknown onnxruntime provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise QDetrError(f"{wanted[0]} is not available in this onnxruntime build "
                         f"(available: {', '.join(available)}); install onnxruntime-gpu on a CUDA machine")
    return [p for p in wanted if p in available]


def session_options(threads: int | None = None, opt_level: str = "all") -> ort.SessionOptions:
    """Latency-oriented options: intra-op threads, one inter-op thread, sequential execution."""
    if opt_level not in OPT_LEVELS:
        raise QDetrError(f"unknown optimisation level {opt_level!r}: use one of {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime picks the physical core count
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3  # errors only: keep the CLI output clean
    # DequantizeLinear(int weight) -> MatMul with a float activation becomes MatMulNBits, which by default
    # (accuracy level 4) quantizes that activation to int8 on the fly: not the ONNX semantics. Level 0
    # keeps the float activation (the 4-bit weight is still unpacked in the kernel).
    so.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, "0")
    return so


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    for marker in ("INVALID_PROTOBUF", "NO_SUCHFILE", "INVALID_GRAPH", "NOT_IMPLEMENTED", "FAIL :"):
        if marker in text:
            return text[text.index(marker):][:300]
    return text[:300]


def _session(path: Path, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime's pybind errors have no common public base class
        if "INVALID_PROTOBUF" in str(e):
            raise QDetrError("not an ONNX file (protobuf parsing failed)", path) from None
        raise QDetrError(f"onnxruntime cannot load it: {_short(e)}", path) from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _build_info(path: Path) -> dict:
    """Build info from the sidecar of a built engine; {} for a plain ONNX model."""
    side = _sidecar(path)
    if not side.is_file():
        return {}
    data = read_json(side)
    return data.get("build", {}) if isinstance(data, dict) and data.get("format") == ENGINE_FORMAT else {}


class OrtEngine(Engine):
    """An ONNX model (or built ortengine) in an ``onnxruntime.InferenceSession``."""

    backend = "onnxruntime"

    def __init__(self, path: Path, session: ort.InferenceSession, metadata: dict, build: dict) -> None:
        self.path = path
        self.session = session
        self._metadata = metadata
        self.build = build
        inp = session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) == 4:  # a dynamic height and width take the metadata's size (--input-size)
            shape[2:] = [d if isinstance(d, int) and d > 0 else int(s)
                         for d, s in zip(shape[2:], metadata["input_size"])]
        self._spec = InputSpec(inp.name, shape, DTYPES.get(inp.type, inp.type))
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, path: str | os.PathLike, provider: str | None = None, threads: int | None = None,
             opt_level: str | None = None, input_size: tuple[int, int] | None = None,
             **_: Any) -> OrtEngine:
        """Open ``path``; provider/threads/level default to the engine's build info, else cpu/auto/all.
        A file without ``qdetr`` metadata (not written by qdetr-deploy) is opened as a DETR-style model:
        its input size read from the graph, else ``input_size`` (``engines/onnx_graph.py``)."""
        path = Path(path)
        if not path.is_file():
            raise QDetrError("file not found" if not path.exists() else "not a file", path)
        build = _build_info(path)
        provider = provider or build.get("provider", "cpu")
        threads = threads if threads is not None else build.get("threads")
        so = session_options(threads, opt_level or build.get("run_opt_level", "all"))
        session = _session(path, so, providers_for(provider))
        meta_map = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY in meta_map:
            metadata = parse_metadata(meta_map[METADATA_KEY], path)
            _check_size(metadata, input_size, path)
        else:
            metadata = foreign_metadata(session.get_inputs(), session.get_outputs(), path, input_size)
        if not build and BUILD_KEY in meta_map:
            build = json.loads(meta_map[BUILD_KEY])
        if len(session.get_inputs()) != 1:
            raise QDetrError(f"expected one input 'images', found {len(session.get_inputs())}", path)
        return cls(path, session, metadata, build)

    @property
    def input_spec(self) -> InputSpec:
        return self._spec

    @property
    def metadata(self) -> dict:
        return self._metadata

    @property
    def max_batch(self) -> int | None:
        return self.static_batch

    @property
    def device(self) -> str:
        return "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def graph_summary(self) -> dict | None:
        """The precision of the graph, read from its ops and initializers (``onnx_graph.graph_precision``)."""
        import onnx

        try:
            return graph_precision(onnx.load(str(self.path), load_external_data=False))
        except Exception:  # the session loaded it, so this is unexpected: the metadata stands alone then
            return None

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(self.output_names, {self._spec.name: images})
        except Exception as e:  # onnxruntime's pybind errors
            raise QDetrError(f"onnxruntime failed to run: {_short(e)}", self.path) from None
        return dict(zip(self.output_names, outs))


def _check_size(metadata: dict, input_size: tuple[int, int] | None, path: Path) -> None:
    if input_size is not None and [int(v) for v in input_size] != [int(v) for v in metadata["input_size"]]:
        H, W = metadata["input_size"]
        raise QDetrError(f"the model takes {H}x{W} images (its metadata): leave --input-size out or use "
                         f"{H} {W}", path)


def _op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def build_ort_engine(onnx_path: str | os.PathLike, out_path: str | os.PathLike, provider: str = "cpu",
                     threads: int | None = None, opt_level: str = "all") -> Path:
    """Optimise ``onnx_path`` with ONNX Runtime and save the optimised graph (+ build info) to
    ``out_path`` (``.ortengine``, ``.ort.onnx`` or ``.engine``) and the sidecar ``<out_path>.json``."""
    import onnx
    from onnx import helper

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    metadata = read_onnx_metadata(onnx_path)
    if out_path.suffix.lower() not in BUILD_SUFFIXES:
        raise QDetrError(f"an onnxruntime engine needs the suffix {', '.join(BUILD_SUFFIXES)}", out_path)
    if out_path.resolve() == onnx_path.resolve():
        raise QDetrError("the engine would overwrite its source model: choose another output path", out_path)
    save_level = SAVE_LEVEL.get(opt_level, opt_level)
    with atomic_path(out_path) as tmp:
        so = session_options(threads, save_level)
        so.optimized_model_filepath = str(tmp)
        _session(onnx_path, so, providers_for(provider))
        model = onnx.load(str(tmp))
        build = {
            "format": ENGINE_FORMAT, "onnxruntime_version": ort.__version__, "provider": provider,
            "providers": providers_for(provider), "threads": threads, "saved_opt_level": save_level,
            "run_opt_level": opt_level, "source": str(onnx_path), "source_sha256": sha256_file(onnx_path),
            "op_types": _op_counts(model),
            "integer_kernels": kernel_report_summary(integer_kernel_report(model)),
        }
        props = {p.key: p.value for p in model.metadata_props}
        props[METADATA_KEY] = json.dumps(metadata)
        props[BUILD_KEY] = json.dumps(build)
        del model.metadata_props[:]
        helper.set_model_props(model, props)
        onnx.save(model, str(tmp))
    write_json(_sidecar(out_path), {"format": ENGINE_FORMAT, "engine": out_path.name, "build": build,
                                    "qdetr": metadata})
    return out_path


# --- integer-kernel report -------------------------------------------------------------------------------

INTEGER_OPS = {
    "QLinearConv": "int8 conv, quantized output",
    "ConvInteger": "int8 conv, int32 output",
    "QLinearMatMul": "int8 matmul, quantized output",
    "MatMulInteger": "int8 matmul, int32 output",
    "MatMulIntegerToFloat": "int8 matmul, float output (no Q after it)",
    "DynamicQuantizeMatMul": "activation quantized at run time, int8 matmul",
    "MatMulNBits": "4-bit (n-bit) weight matmul",
    "QGemm": "int8 gemm",
    "QAttention": "int8 attention",
}
FLOAT_OPS = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}
_Q_FORMED = {"Conv": "QLinearConv", "FusedConv": "QLinearConv", "Gemm": "QGemm", "FusedGemm": "QGemm",
             "MatMul": "QLinearMatMul", "FusedMatMul": "QLinearMatMul"}


class _GraphIndex:
    """Producers, consumers and initializer dtypes of one graph."""

    def __init__(self, graph: Any) -> None:
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.init_dtype = {t.name: t.data_type for t in graph.initializer}
        self.value_dtype = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}

    def dq_input_dtype(self, dq: Any) -> int:
        """Element type of the integer tensor a DequantizeLinear reads (zero point's, else uint8)."""
        from onnx import TensorProto

        for name in (dq.input[0], dq.input[2] if len(dq.input) > 2 else ""):
            if name in self.init_dtype:
                return self.init_dtype[name]
        src = self.producer.get(dq.input[0])
        if src is not None and src.op_type == "QuantizeLinear" and len(src.input) > 2:
            return self.init_dtype.get(src.input[2], TensorProto.UINT8)
        return self.value_dtype.get(dq.input[0], TensorProto.UINT8)


def _dtype_name(elem_type: int) -> str:
    from onnx import helper

    return str(helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else "unknown"


def _weight_reason(node: Any, g: _GraphIndex) -> str | None:
    """Why the weight (second input) keeps the layer float; None when the weight is an 8-bit DQ."""
    from onnx import TensorProto

    w = node.input[1]
    pw = g.producer.get(w)
    if pw is None or pw.op_type != "DequantizeLinear":
        if w in g.init_dtype:
            return "weight not quantized (float initializer, no DequantizeLinear)"
        if pw is not None and pw.op_type != "DequantizeLinear" and g.producer.get(pw.input[0]) is not None \
                and g.producer[pw.input[0]].op_type == "DequantizeLinear":
            return f"weight passes through {pw.op_type} after its DequantizeLinear (fold it into the weight)"
        return "second input not quantized (no DequantizeLinear on it)"
    wdt = g.dq_input_dtype(pw)
    if wdt not in (TensorProto.INT8, TensorProto.UINT8):
        return f"weight DQ not int8 ({_dtype_name(wdt)}) -> no 8-bit integer kernel"
    return None


def _activation_reason(node: Any, g: _GraphIndex) -> str | None:
    """Why the activation (first input) keeps the layer float; None when it is an 8-bit DQ."""
    from onnx import TensorProto

    px = g.producer.get(node.input[0])
    if px is None or px.op_type != "DequantizeLinear":
        return "activation not quantized (no DequantizeLinear on the input)"
    xdt = g.dq_input_dtype(px)
    if xdt == TensorProto.INT8:
        q = g.producer.get(px.input[0])
        shared = q is not None and len(g.consumers.get(q.output[0], [])) > 1
        hint = ("its QuantizeLinear feeds several DequantizeLinear, so QDQS8ToU8 could not make it uint8"
                if shared else "int8 activation was not rewritten to uint8")
        return f"activation is int8 (S8S8) and ORT CPU fuses uint8 activations only: {hint} " \
               "-> export uint8 activations or one Q/DQ pair per consumer"
    if xdt not in (TensorProto.UINT8, TensorProto.INT8):
        return f"activation DQ not 8-bit ({_dtype_name(xdt)})"
    return None


def _float_reason(node: Any, g: _GraphIndex) -> str:
    if len(node.input) < 2:
        return "single-input layer"
    reason = _weight_reason(node, g)
    if reason and "second input" in reason and _activation_reason(node, g):
        return "activation x activation, neither input quantized"
    reason = reason or _activation_reason(node, g)
    if reason:
        return reason
    after = g.consumers.get(node.output[0], [])
    if not any(c.op_type == "QuantizeLinear" for c in after):
        extra = " (a rank-2 MatMul+Add became Gemm before QDQ fusion)" if node.op_type == "Gemm" else ""
        return f"output not quantized (no Q after it) -> {_Q_FORMED.get(node.op_type, 'QLinear op')} " \
               f"not formed{extra}"
    return "Q/DQ around it but not fused by this onnxruntime build/provider"


def _load_model(model: Any) -> Any:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise QDetrError("file not found", path)
        try:
            return onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise QDetrError(f"not an ONNX file ({type(e).__name__})", path) from None
    return model


def integer_kernel_report(model: str | os.PathLike | Any) -> list[dict]:
    """For each Conv/MatMul/Gemm-like layer of an OPTIMISED graph (a built ortengine or ModelProto):
    ``{"node", "op_type", "integer", "reason"}`` saying which run as integer kernels and why others stayed
    float."""
    graph = _load_model(model).graph
    g = _GraphIndex(graph)
    report = []
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            report.append({"node": node.name, "op_type": node.op_type, "integer": True,
                           "reason": INTEGER_OPS[node.op_type]})
        elif node.op_type in FLOAT_OPS:
            report.append({"node": node.name, "op_type": node.op_type, "integer": False,
                           "reason": _float_reason(node, g)})
    return report


def kernel_report_summary(report: list[dict]) -> dict:
    """``{"integer": n, "float": m, "by_op": {op_type: count}, "float_reasons": {reason: count}}``."""
    by_op: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for row in report:
        by_op[row["op_type"]] = by_op.get(row["op_type"], 0) + 1
        if not row["integer"]:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    n_int = sum(r["integer"] for r in report)
    return {"integer": n_int, "float": len(report) - n_int, "by_op": by_op, "float_reasons": reasons}


def format_kernel_report(report: list[dict]) -> str:
    """Human-readable lines: one per layer, then the summary."""
    lines = [f"{'int ' if r['integer'] else 'FLOAT'} {r['op_type']:<22} {r['node']}: {r['reason']}"
             for r in report]
    s = kernel_report_summary(report)
    lines.append(f"{s['integer']} of {len(report)} conv/matmul/gemm layers run as integer kernels")
    return "\n".join(lines)
