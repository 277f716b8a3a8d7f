"""``qdetr-deploy build-engine``: ONNX model -> onnxruntime / TensorRT / torch GPU engine (thin wrapper)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from qdetr_deploy.errors import QDetrError


def build_torch(model: str, out: str, bits: str) -> Path:
    """The torch GPU engine is packed by the exporter (``export.torch_engine``); torch is imported here.
    Says in one line which quantized layers run the int4 kernels and why the others cannot."""
    from qdetr_deploy.engines.torch_gpu import kernel_summary, read_engine_metadata
    from qdetr_deploy.export.torch_engine import build_torch_engine

    path = Path(build_torch_engine(model, out, bits))
    click.echo(kernel_summary(read_engine_metadata(path)))
    return path


def _check_bits(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if value in ("8", "4") or re.fullmatch(r"\d+-\d+-\d+", value):
        return value
    raise click.BadParameter(f"{value!r} is not 8, 4 or W-A-ATTN bits such as 4-4-8")


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
@click.option("--bits", default="8", show_default=True, callback=_check_bits,
              help="TensorRT/torch: 8 = int8 container graph (TensorRT: INT4 weights made INT8 exactly), "
                   "4 = 4-bit kernels (plugins / torch); torch also takes the model's bits W-A-8 (W <= 4), "
                   "which a released Q-DETR file needs: 4-4-8.")
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
    """Build an engine from MODEL.onnx (qdetr-deploy export output); the torch backend also builds from a
    quantized checkpoint (ours, or a released Q-DETR .pth with --bits 4-4-8 / 2-2-8)."""
    if backend == "onnxruntime":
        path = _build_ort(model, out, provider, threads, opt_level)
    elif backend == "tensorrt":
        from qdetr_deploy.engines.tensorrt import build_trt_engine

        if bits not in ("8", "4"):
            raise QDetrError(f"--bits {bits}: TensorRT engines take --bits 8 or 4")

        path = build_trt_engine(model, out, fp16=fp16, int8_container=None,
                                timing_cache=timing_cache, workspace_gb=workspace_gb, min_batch=min_batch,
                                opt_batch=opt_batch, max_batch=max_batch, bits=int(bits),
                                skip_lint=skip_lint)
    else:
        path = build_torch(model, out, bits)
    click.echo(f"wrote {path}")


COMMANDS = [build_engine]
