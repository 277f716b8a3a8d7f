"""``qdetr-deploy build-engine``: ONNX model -> onnxruntime / TensorRT / torch GPU engine (thin wrapper)."""

from __future__ import annotations

from pathlib import Path

import click


def build_torch(model: str, out: str, bits: int) -> Path:
    """The torch GPU engine is packed by the exporter (``export.torch_engine``); torch is imported here."""
    from qdetr_deploy.export.torch_engine import build_torch_engine

    return Path(build_torch_engine(model, out, bits))


def _build_ort(model: str, out: str, provider: str, threads: int | None, opt_level: str) -> Path:
    from qdetr_deploy.engines.onnxruntime import (
        build_ort_engine,
        format_kernel_report,
        integer_kernel_report,
    )

    path = build_ort_engine(model, out, provider=provider, threads=threads, opt_level=opt_level)
    click.echo(format_kernel_report(integer_kernel_report(path)))
    return path


@click.command("build-engine")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Engine file (.ortengine or .engine for onnxruntime, .engine for TensorRT, .qdtorch for "
                   "torch).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="TensorRT/torch: 8 = int8 container graph (TensorRT: INT4 weights made INT8 exactly), "
                   "4 = 4-bit kernels (plugins / torch).")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (default: cores).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--opt-level", type=click.Choice(["basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimisation level for running.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache (read+written).")
@click.option("--workspace-gb", type=float, default=4, show_default=True, help="TensorRT workspace limit.")
@click.option("--fp16/--no-fp16", default=True, show_default=True,
              help="TensorRT 10.x, float graphs only (strongly typed graphs follow the ONNX types).")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(min=1))
@click.option("--max-batch", type=click.IntRange(min=1))
@click.option("--skip-lint", is_flag=True, help="TensorRT: parse even when the static lint of the graph "
              "(for the installed TensorRT and GPU) finds violations.")
def build_engine(model: str, out: str, backend: str, bits: str, threads: int | None, provider: str,
                 opt_level: str, timing_cache: str | None, workspace_gb: float, fp16: bool, min_batch: int,
                 opt_batch: int | None, max_batch: int | None, skip_lint: bool) -> None:
    """Build an engine from MODEL.onnx (qdetr-deploy export output)."""
    if backend == "onnxruntime":
        path = _build_ort(model, out, provider, threads, opt_level)
    elif backend == "tensorrt":
        from qdetr_deploy.engines.tensorrt import build_trt_engine

        path = build_trt_engine(model, out, fp16=fp16, int8_container=None,
                                timing_cache=timing_cache, workspace_gb=workspace_gb, min_batch=min_batch,
                                opt_batch=opt_batch, max_batch=max_batch, bits=int(bits),
                                skip_lint=skip_lint)
    else:
        path = build_torch(model, out, int(bits))
    click.echo(f"wrote {path}")


COMMANDS = [build_engine]
