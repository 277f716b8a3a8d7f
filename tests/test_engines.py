"""Engines: ONNX Runtime build/run round trip, integer-kernel report, errors, TensorRT header (pure)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx_fixtures import build_fixture_model

from qdetr_deploy.cli import cli
from qdetr_deploy.engines import open_engine, read_metadata
from qdetr_deploy.engines.onnxruntime import OrtEngine, integer_kernel_report, kernel_report_summary
from qdetr_deploy.engines.tensorrt import (
    NO_INT4,
    NOT_INSTALLED,
    TrtHeader,
    check_trt_header,
    encode_trt_header,
    read_trt_header,
)
from qdetr_deploy.errors import QDetrError

ROOT = Path(__file__).resolve().parents[1]


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "static": build_fixture_model(d / "static.onnx"),
        "dynamic": build_fixture_model(d / "dynamic.onnx", dynamic_batch=True, postprocess=True),
        "int8": build_fixture_model(d / "int8.onnx", int8=True, dynamic_batch=True),
        "int8_shared": build_fixture_model(d / "int8_shared.onnx", int8=True, share_q=True),
        "plain": build_fixture_model(d / "plain.onnx", metadata={}),
    }


def _ref(model: Path, x: np.ndarray) -> list[np.ndarray]:
    """Outputs of the plain ONNX model in a default onnxruntime session."""
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"images": x})


def _build(*args) -> str:
    """``build-engine ARGS...`` expected to fail: exit 2 and one line on stderr."""
    return _one_line_exit_2(CliRunner().invoke(cli, ["build-engine", *map(str, args)]))


def _one_line_exit_2(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- onnxruntime -----------------------------------------------------------------------------------------

def test_build_engine_onnxruntime_round_trip(models, tmp_path):
    out = tmp_path / "m.ortengine"
    res = CliRunner().invoke(cli, ["build-engine", str(models["dynamic"]), "-o", str(out),
                                   "--backend", "onnxruntime", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "conv/matmul/gemm layers run as integer kernels" in res.stdout
    side = json.loads((tmp_path / "m.ortengine.json").read_text())
    build = side["build"]
    assert build["onnxruntime_version"] == ort.__version__ and build["provider"] == "cpu"
    assert build["saved_opt_level"] == "extended" and build["run_opt_level"] == "all"
    assert build["threads"] == 1 and "Conv" in " ".join(build["op_types"])
    saved = onnx.load(str(out))
    assert not any(n.domain == "com.microsoft.nchwc" for n in saved.graph.node)  # no layout-specific ops

    engine = open_engine(out)
    assert isinstance(engine, OrtEngine) and engine.backend == "onnxruntime" and engine.device == "cpu"
    assert engine.metadata == read_metadata(models["dynamic"]) == read_metadata(out)
    name, shape, dtype = engine.input_spec
    assert name == "images" and shape[1:] == [3, 64, 64] and isinstance(shape[0], str) and dtype == "float32"
    assert engine.max_batch is None
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    got = engine.run(x)
    ref = dict(zip(["scores", "labels", "boxes"], _ref(models["dynamic"], x)))
    assert set(got) == {"scores", "labels", "boxes"}
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5)


def test_ort_engine_imports_no_torch_in_fresh_process(models):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from qdetr_deploy.engines import open_engine
        from qdetr_deploy.bench.preprocess import outputs_to_detections, detections_to_coco
        engine = open_engine({str(models['static'])!r})
        out = engine.run(np.zeros((1, 3, 64, 64), np.float32))
        scores, labels, boxes = outputs_to_detections(out, engine.metadata)
        detections_to_coco(scores[0], labels[0], boxes[0], 0.5, 1, None, image_size=(128, 128))
        assert out["pred_logits"].shape == (1, 10, 81)
        from qdetr_deploy.bench.run import bench_engines
        bench_engines([{str(models['static'])!r}], warmup=0, iters=2, progress=False)
        assert "torch" not in sys.modules, "torch was imported on the onnxruntime path"
        assert "onnxruntime" in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_integer_kernel_report_int8_fixture(models, tmp_path):
    from qdetr_deploy.engines.onnxruntime import build_ort_engine

    engine = build_ort_engine(models["int8"], tmp_path / "int8.ortengine")
    rows = {r["node"]: r for r in integer_kernel_report(engine)}
    assert rows["conv1"]["op_type"] == "QLinearConv" and rows["conv1"]["integer"]
    assert rows["class_embed"]["op_type"] == "QLinearMatMul" and rows["class_embed"]["integer"]
    assert rows["bbox_embed"]["op_type"] == "MatMulIntegerToFloat" and rows["bbox_embed"]["integer"]
    assert not rows["conv2"]["integer"] and "output not quantized (no Q after it)" in rows["conv2"]["reason"]
    assert "QLinearConv not formed" in rows["conv2"]["reason"]
    assert not rows["bbox_float"]["integer"] and "weight not quantized" in rows["bbox_float"]["reason"]
    summary = kernel_report_summary(list(rows.values()))
    assert summary["integer"] == 3 and summary["float"] == 2
    # the engine still computes what the Q/DQ graph computes
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref = _ref(models["int8"], x)
    got = open_engine(engine).run(x)
    np.testing.assert_allclose(got["pred_boxes"], ref[1], atol=1e-5)


def test_integer_kernel_report_shared_int8_q_stays_float(models, tmp_path):
    from qdetr_deploy.engines.onnxruntime import build_ort_engine

    report = integer_kernel_report(build_ort_engine(models["int8_shared"], tmp_path / "s.ortengine"))
    by_node = {r["node"]: r for r in report}
    assert not by_node["conv1"]["integer"] and "activation is int8" in by_node["conv1"]["reason"]
    assert "several DequantizeLinear" in by_node["conv1"]["reason"]


def test_engine_errors(models, tmp_path):
    with pytest.raises(QDetrError, match="file not found"):
        open_engine(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 this is not a protobuf" * 10)
    with pytest.raises(QDetrError, match="not an ONNX file"):
        open_engine(junk)
    plain = open_engine(models["plain"])  # no qdetr metadata: opened as a DETR-style file (test_bench_truth)
    assert plain.metadata["foreign"] and plain.metadata["input_size"] == [64, 64]
    with pytest.raises(QDetrError, match="not a qdetr-deploy model"):
        read_metadata(models["plain"])
    engine = open_engine(models["static"])
    assert engine.max_batch == 1 and engine.static_batch == 1
    with pytest.raises(QDetrError, match="batch 2 is larger than the engine allows"):
        engine.run(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(QDetrError, match=r"wrong input shape \[1, 3, 32, 32\]"):
        engine.run(np.zeros((1, 3, 32, 32), np.float32))
    (tmp_path / "x.qdtorch").write_bytes(b"x")
    if not _has("qdetr_deploy.engines.torch_gpu"):
        with pytest.raises(QDetrError, match="torch GPU engine is not available"):
            open_engine(tmp_path / "x.qdtorch")
    (tmp_path / "x.engine").write_bytes(b"not a plan")
    with pytest.raises(QDetrError, match="no QDETRTRT header"):
        open_engine(tmp_path / "x.engine")
    for e in (junk, models["plain"]):
        msg = str(pytest.raises(QDetrError, read_metadata, e).value)
        assert "\n" not in msg and str(e) in msg


def test_build_engine_cli_errors(models, tmp_path):
    assert "not a qdetr-deploy model" in _build(models["plain"], "-o", tmp_path / "p.ortengine")
    assert "file not found" in _build(tmp_path / "nope.onnx", "-o", tmp_path / "a.ortengine")
    assert "needs the suffix" in _build(models["static"], "-o", tmp_path / "a.bin")
    assert "overwrite its source" in _build(models["static"], "-o", models["static"])
    if not _has("qdetr_deploy.engines.torch_gpu"):
        line = _build(models["static"], "-o", tmp_path / "m.qdtorch", "--backend", "torch")
        assert "the torch GPU engine is not available in this build" in line
    if not _has("kernels.trt_plugins"):
        line = _build(models["int8"], "-o", tmp_path / "m.engine", "--backend", "tensorrt", "--bits", "4")
        assert NO_INT4 in line
    if not _has("tensorrt"):
        assert NOT_INSTALLED in _build(models["int8"], "-o", tmp_path / "m.engine", "--backend", "tensorrt")


# --- TensorRT header: pure functions, no TensorRT needed -------------------------------------------------

def _header(**kw) -> dict:
    h = {"format": "qdetr-trt/1", "trt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": [8, 7],
         "metadata": {"input_size": [64, 64]}, "created": "2025-01-01T00:00:00Z", "build": {"bits": 8}}
    h.update(kw)
    return h


def test_trt_header_round_trip(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(encode_trt_header(_header()) + b"PLAN-BYTES")
    h = read_trt_header(path)
    assert isinstance(h, TrtHeader) and h.trt_version == "10.3.0" and h.sm == "sm_87"
    assert h.metadata == {"input_size": [64, 64]} and h.build == {"bits": 8}
    assert path.read_bytes()[h.plan_offset:] == b"PLAN-BYTES"
    check_trt_header(h, "10.3.0", "Orin", (8, 7))  # same: no error
    check_trt_header(h, "10.3", "orin", (8, 7))  # version "10.3" == "10.3.0", name case-insensitive


def test_trt_header_mismatch_messages(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(encode_trt_header(_header()) + b"PLAN")
    h = read_trt_header(path)
    with pytest.raises(QDetrError) as e:
        check_trt_header(h, "10.16.0", "NVIDIA H200", (9, 0), path)
    assert str(e.value) == (f"{path}: built with TensorRT 10.3.0 on Orin (sm_87), this is TensorRT 10.16.0 "
                            "on NVIDIA H200 (sm_90): rebuild the engine")
    with pytest.raises(QDetrError, match=r"TensorRT 10\.3\.0 on Orin .* TensorRT 10\.3\.1 on Orin"):
        check_trt_header(h, "10.3.1", "Orin", (8, 7))
    with pytest.raises(QDetrError, match=r"on Orin \(sm_87\), this is TensorRT 10\.3\.0 on Thor \(sm_87\)"):
        check_trt_header(h, "10.3.0", "Thor", (8, 7))
    with pytest.raises(QDetrError, match=r"\(sm_87\), this is .*\(sm_89\)"):
        check_trt_header(h, "10.3.0", "Orin", (8, 9))


def test_trt_header_malformed(tmp_path):
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"QDETRTRT" + (1000).to_bytes(4, "little") + b"{}")
    with pytest.raises(QDetrError, match="truncated"):
        read_trt_header(bad)
    bad.write_bytes(b"QDETRTRT" + (2).to_bytes(4, "little") + b"{}PLAN")
    with pytest.raises(QDetrError, match="malformed TensorRT engine header"):
        read_trt_header(bad)
    bad.write_bytes(b"PLANPLANPLAN")
    with pytest.raises(QDetrError, match="no QDETRTRT header"):
        read_trt_header(bad)


def test_open_headered_engine_without_tensorrt(tmp_path):
    if _has("tensorrt"):
        pytest.skip("TensorRT is installed here: covered by the real TensorRT test")
    path = tmp_path / "m.engine"
    path.write_bytes(encode_trt_header(_header()) + b"PLAN")
    with pytest.raises(QDetrError, match=r"TensorRT is not installed"):
        open_engine(path)


# --- TensorRT for real (never faked) ---------------------------------------------------------------------

def test_tensorrt_build_and_run(models, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (not installable on this machine)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from qdetr_deploy.engines.tensorrt import TrtEngine, build_trt_engine

    out = build_trt_engine(models["dynamic"], tmp_path / "m.engine", max_batch=4,
                           timing_cache=tmp_path / "cache.bin")
    assert (tmp_path / "cache.bin").is_file()
    engine = open_engine(out)
    assert isinstance(engine, TrtEngine) and engine.max_batch == 4
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref = _ref(models["dynamic"], x)
    got = engine.run(x)
    np.testing.assert_allclose(got["scores"], ref[0], atol=2e-2)
    with pytest.raises(QDetrError, match="larger than the engine allows"):
        engine.run(np.zeros((5, 3, 64, 64), np.float32))


def test_cli_bench_of_ort_engine_imports_no_torch(models, tmp_path):
    """The command line, not only the library: `qdetr-deploy bench` on ONNX Runtime needs no torch."""
    engine = tmp_path / "m.ortengine"
    script = textwrap.dedent(f"""
        import atexit, sys
        from qdetr_deploy.cli import cli
        atexit.register(lambda: print("torch" in sys.modules))
        cli(["build-engine", {str(models['static'])!r}, "-o", {str(engine)!r}])
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().endswith("False"), res.stdout + res.stderr
    script = script.replace(f'["build-engine", {str(models["static"])!r}, "-o", {str(engine)!r}]',
                            f'["bench", {str(engine)!r}, "--iters", "2", "--warmup", "0"]')
    assert '"bench"' in script
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().endswith("False"), res.stdout + res.stderr


def test_tensorrt_bits8_build_path_imports_no_torch(models, tmp_path):
    """A Jetson build machine needs no torch for --bits 8: everything before the first TensorRT call (the
    metadata, the INT4 -> INT8 graph, the lint) runs without importing it; there the GPU identity comes
    from torch or cuda-python (gpu_identity)."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from qdetr_deploy.engines.tensorrt import build_trt_engine, network_graph
        from qdetr_deploy.export.trt_lint import lint_tensorrt
        from qdetr_deploy.errors import QDetrError
        graph = network_graph(Path({str(models['int8'])!r}), 8)
        lint_tensorrt(graph, "10.3")
        try:
            import tensorrt
        except ImportError:  # here: the build stops at the import, still without torch
            try:
                build_trt_engine({str(models['int8'])!r}, {str(tmp_path / 'm.engine')!r}, bits=8)
            except QDetrError as e:
                print(e)
        print("torch" in sys.modules)
        """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().endswith("False"), res.stdout + res.stderr
    if not _has("tensorrt"):
        assert NOT_INSTALLED in res.stdout


def test_build_lint_refuses_in_one_line_and_only_logs_the_opset(models, tmp_path, caplog):
    """The lint build-engine runs before parsing: what TensorRT rejects is one line naming the file and the
    node; an opset past the documented range (an fp32 export at 21 on 10.3) is logged, not refused."""
    from qdetr_deploy.engines.tensorrt import lint_network, network_graph

    graph = network_graph(models["int8"], 8)
    graph.opset_import[0].version = 21
    with caplog.at_level("WARNING"):
        lint_network(graph, "10.3", (8, 7), models["int8"])
    assert "opset 21 is outside TensorRT 10.3's documented 9..20" in caplog.text
    q = next(n for n in graph.graph.node if n.op_type == "QuantizeLinear")
    bad = next(t for t in graph.graph.initializer if t.name == q.input[2])
    value = onnx.numpy_helper.to_array(bad)
    bad.CopyFrom(onnx.numpy_helper.from_array(np.full_like(value, 3), bad.name))  # a zero point that is not 0
    with pytest.raises(QDetrError) as e:
        lint_network(graph, "10.3", (8, 7), models["int8"])
    msg = str(e.value)
    assert "\n" not in msg and str(models["int8"]) in msg and "zero-point" in msg and "--skip-lint" in msg
