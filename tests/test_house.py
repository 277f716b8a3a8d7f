"""The house rules of docs/ARCHITECTURE.md: import directions (static, over the package sources), every
``--help`` without torch, and engines recognised by their content."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from qdetr_deploy.cli import LAZY_COMMANDS, cli
from qdetr_deploy.engines import open_engine
from qdetr_deploy.errors import QDetrError
from tests.onnx_fixtures import build_fixture_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qdetr_deploy"

# package (first name under qdetr_deploy) -> packages it must not import (docs/ARCHITECTURE.md)
FORBIDDEN = {
    "models": {"quant", "export", "train", "engines", "bench", "checkpoints", "pipeline", "demo", "cli"},
    "quant": {"export", "train", "engines", "bench", "checkpoints", "pipeline", "demo", "cli"},
    "deploy_format": {"models", "quant", "export", "train", "engines", "bench", "checkpoints", "data"},
    "engines": {"models", "quant", "export", "train", "checkpoints", "data", "pipeline", "demo", "cli"},
    "bench": {"models", "quant", "export", "train", "checkpoints", "data", "pipeline", "demo", "cli"},
    "export": {"train", "engines", "pipeline", "demo", "cli"},
    "train": {"export", "engines", "pipeline", "demo", "cli"},
}
# documented exceptions: (importing package, imported module) that docs/ARCHITECTURE.md allows
# (export.trt_lint: pure onnx, imported inside engines/tensorrt's functions)
ALLOWED = {("engines", "qdetr_deploy.export.trt_lint")}
NO_TORCH_AT_MODULE_LEVEL = ("engines", "bench", "deploy_format", "errors", "io", "cli")
TORCH = ("torch", "torchvision", "kernels.ops")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, module_level: bool) -> list[tuple[int, str]]:
    """(line, imported module) of every import; ``module_level``: only those run when the file is imported
    (not inside a function, nor under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.module is not None:  # relative: resolve it
            base = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
            found.append((node.lineno, ".".join([*base, node.module])))
    return found


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "qdetr_deploy" and len(parts) > 1 else None


def test_import_directions():
    bad = []
    for name, path in _modules().items():
        own = _package(name)
        for line, target in _imports(path, module_level=False):
            if _package(target) in FORBIDDEN.get(own, ()) and (own, target) not in ALLOWED:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_no_torch_at_module_level():
    bad = []
    for name, path in _modules().items():
        if _package(name) not in NO_TORCH_AT_MODULE_LEVEL:
            continue
        for line, target in _imports(path, module_level=True):
            if target.startswith(TORCH):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} at module level")
    assert not bad, "\n".join(bad)


def test_no_package_cycles_at_module_level():
    edges: dict[str, set[str]] = {}
    for name, path in _modules().items():
        own = _package(name)
        for _, target in _imports(path, module_level=True):
            other = _package(target)
            if own and other and other != own:
                edges.setdefault(own, set()).add(other)

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [" -> ".join(c) for p in sorted(edges) if (c := cycle_from(p, p, (p,)))]
    assert not cycles, "package cycles at module level: " + "; ".join(cycles)


BLOCKER = '''
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoTorch())
'''


def test_every_help_without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr  # the blocker works
    script = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from qdetr_deploy.cli import LAZY_COMMANDS, cli
        runner = CliRunner()
        for args in [["--help"]] + [[name, "--help"] for name in sorted(LAZY_COMMANDS)]:
            res = runner.invoke(cli, args)
            if res.exit_code != 0:
                sys.exit(f"{' '.join(args)}: exit {res.exit_code}: {res.output} {res.exception!r}")
        assert "torch" not in sys.modules
    """)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    main = subprocess.run([sys.executable, "-m", "qdetr_deploy", "--help"], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    assert main.returncode == 0 and "distill" in main.stdout, main.stderr


def test_train_arch_choices_are_the_presets():
    from qdetr_deploy.cli.train import ARCHS
    from qdetr_deploy.models.config import PRESETS

    assert sorted(ARCHS) == sorted(PRESETS)


def test_every_lazy_command_loads():
    for name in LAZY_COMMANDS:
        assert cli.get_command(None, name) is not None, name


def test_open_engine_by_content(tmp_path):
    model = build_fixture_model(tmp_path / "m.onnx")
    renamed = tmp_path / "model.engine"
    renamed.write_bytes(model.read_bytes())  # an ONNX model whatever its suffix
    assert open_engine(renamed).backend == "onnxruntime"
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"\x00garbage, no header of any kind")
    msg = str(pytest.raises(QDetrError, open_engine, odd).value)
    assert "unknown engine type" in msg and str(odd) in msg and "\n" not in msg


def test_build_engine_onnxruntime_as_dot_engine(tmp_path):
    model = build_fixture_model(tmp_path / "m.onnx")
    out = tmp_path / "model.engine"
    res = CliRunner().invoke(cli, ["build-engine", str(model), "-o", str(out), "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    engine = open_engine(out)
    assert engine.backend == "onnxruntime" and engine.metadata["input_size"] == [64, 64]


def test_deploy_format_record_round_trip(tmp_path):
    from qdetr_deploy.deploy_format import ONNX_FORMAT, model_metadata, read_sidecar

    record = model_metadata(format=ONNX_FORMAT, input_size=(64, 96), class_names=["a", "b"],
                            category_ids=[1, 3], num_classes=2, postprocess=True, batch=None, bits="4-4-8",
                            quant_config=None, target="onnxruntime", source=None)
    assert list(record) == ["format", "input_size", "mean", "std", "class_names", "category_ids",
                            "num_classes", "postprocess", "dynamic_batch", "batch", "bits", "quant_config",
                            "target", "source"]
    assert record["dynamic_batch"] and record["input_size"] == [64, 96]
    side = tmp_path / "m.onnx.json"
    side.write_text(json.dumps(record))
    assert read_sidecar(side) == record
    side.write_text(json.dumps({"format": ONNX_FORMAT}))
    msg = str(pytest.raises(QDetrError, read_sidecar, side).value)
    assert "lacks input_size, mean, std, postprocess" in msg and str(side) in msg
