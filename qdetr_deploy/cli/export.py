"""``qdetr-deploy export``: checkpoint -> ONNX Q/DQ model + sidecar JSON, with an optional parity check."""

from __future__ import annotations

import sys

import click

from qdetr_deploy.errors import QDetrError


@click.command("export")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="MODEL.onnx")
@click.option("--opset", type=int, default=None,
              help="17..21; INT4 weights need 21 (default: 21; tensorrt: the highest opset --trt-version "
                   "documents, 20 for 10.3).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="tensorrt: what TensorRT accepts: zero-point-0 per-tensor int8 Q/DQ, "
              "INT8 weights (INT4 only for weight-only GEMMs, block-quantized).")
@click.option("--trt-version", default="10.3", show_default=True,
              help="tensorrt: the TensorRT that builds the engine (10.3 = JetPack 6, the oldest supported): "
                   "the opset and the --check lint follow its rules.")
@click.option("--trt-sm", default=None, metavar="MAJOR.MINOR",
              help="tensorrt --check: the GPU's compute capability (e.g. 8.7 for Orin), for the FP8 rule.")
@click.option("--image-size", nargs=2, type=click.IntRange(min=32), default=None, metavar="H W",
              help="Fixed input canvas (default: the checkpoint's calibration size, else 800 800).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch.")
@click.option("--dynamic-batch", is_flag=True, help="Dynamic batch dimension instead of --batch.")
@click.option("--postprocess/--no-postprocess", default=True, show_default=True,
              help="scores/labels/boxes in the graph, or raw pred_logits/pred_boxes.")
@click.option("--weight-container", type=click.Choice(["int4", "int8"]), default=None,
              help="int8 (onnxruntime's default): every weight (and activation) in 8-bit containers, which "
                   "onnxruntime runs as integer kernels; int4 (tensorrt's default): INT4 weights for <= 4 "
                   "bits, the smallest file (opset 21; tensorrt: only weight-only GEMM weights, "
                   "block-quantized; all others INT8).")
@click.option("--conv-bias", type=click.Choice(["float", "int32"]), default=None,
              help="int32 (onnxruntime's default): conv biases on the int32 x_step*w_step grid where the "
                   "conv can run as QLinearConv: exact for a student quantized with --conv-bias int32 "
                   "(quantize's default preset), else rounded by <= half a grid step (reported; --check "
                   "compares against the same rounding); float (tensorrt's default): exact bias Add.")
@click.option("--strict-trt", is_flag=True, help="tensorrt: refuse instead of writing float fake-quant "
              "fallbacks for quantizers int8 Q/DQ cannot express.")
@click.option("--check", is_flag=True, help="Compare ONNX Runtime with PyTorch fake-quant after writing.")
@click.option("--check-images", type=click.Path(), help="Images for --check (default: random ones).")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="--check: largest allowed difference of class probabilities and normalised boxes.")
@click.option("--check-criterion", type=click.Choice(["layer", "end-to-end"]), default="layer",
              show_default=True, help="--check: layer: every layer matches given the same quantized inputs; "
              "end-to-end: the whole network too.")
@click.option("--bits", help="A released Q-DETR checkpoint's bits, 4-4-8 or 2-2-8 (its model-zoo files store "
              "none).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled objects in an upstream .pth.")
def export_cmd(ckpt: str, out: str, opset: int | None, target: str, trt_version: str, trt_sm: str | None,
               image_size: tuple[int, int] | None, batch: int,
               dynamic_batch: bool, postprocess: bool, weight_container: str | None, conv_bias: str | None,
               strict_trt: bool,
               check: bool, check_images: str | None, tolerance: float, check_criterion: str,
               bits: str | None, trust_checkpoint: bool) -> None:
    """Export CKPT (a quantized or float checkpoint, or a released Q-DETR one) to an ONNX model for TARGET."""
    from qdetr_deploy.checkpoints import load_checkpoint
    from qdetr_deploy.export.calibration import list_images
    from qdetr_deploy.export.onnx_export import export_onnx
    from qdetr_deploy.io import check_output_path
    from qdetr_deploy.quant import QuantConfig
    from qdetr_deploy.released import FORMAT_NAME

    check_output_path(out)
    cc = _compute_capability(trt_sm)
    files = list_images(check_images, 16) if check and check_images else None
    loaded = load_checkpoint(ckpt, trust=trust_checkpoint,
                             quant_config=QuantConfig.from_bits(bits) if bits else None)
    if bits and (loaded.meta or {}).get("source") != FORMAT_NAME:
        raise QDetrError(f"--bits is for {FORMAT_NAME} checkpoints, which store no bit widths; quantize "
                         "this one with qdetr-deploy quantize", ckpt)
    result = export_onnx(loaded, out, opset=opset, target=target, trt_version=trt_version,
                         image_size=tuple(image_size) if image_size else None, batch=batch,
                         dynamic_batch=dynamic_batch, postprocess=postprocess,
                         weight_container=weight_container, strict_trt=strict_trt, conv_bias=conv_bias)
    modes = ", ".join(f"{n} {m}" for m, n in sorted(result.act_modes.items())) or "no quantizers"
    click.echo(f"wrote {result.path} and {result.sidecar.name} ({result.metadata['bits']}, target {target}; "
               f"activation quantizers: {modes})")
    if result.rounded_biases:
        click.echo(f"  {len(result.rounded_biases)} conv biases rounded onto the int32 grid (the student was "
                   f"not quantized with --conv-bias int32; --check compares against the rounded model)")
    _print_fallbacks(result.fallbacks)
    if check:
        _check(result, loaded.model, files, tolerance, check_criterion, trt_version, cc)


def _print_fallbacks(fallbacks: list[tuple[str, str]], each: int = 8) -> None:
    """One line per fallback, or per reason (with a count and the first names) when there are many."""
    if len(fallbacks) <= each:
        for name, reason in fallbacks:
            click.echo(f"  float fake-quant fallback {name}: {reason}")
        return
    by_reason: dict[str, list[str]] = {}
    for name, reason in fallbacks:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f", ... ({len(names) - 2} more)" if len(names) > 2 else ""
        click.echo(f"  float fake-quant fallback for {len(names)} quantizers ({', '.join(names[:2])}{more}): "
                   f"{reason}")


def _compute_capability(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    major, _, minor = text.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise QDetrError(f"--trt-sm {text!r} is not MAJOR.MINOR (e.g. 8.7 for Jetson Orin)")
    return int(major), int(minor)


def _check(result, model, files, tolerance: float, criterion: str, trt_version: str,
           cc: tuple[int, int] | None) -> None:
    from qdetr_deploy.export.calibration import load_images
    from qdetr_deploy.export.check import check_onnx

    images = load_images(files, tuple(result.metadata["input_size"])) if files else None
    report = check_onnx(result.path, model, images, tolerance=tolerance, criterion=criterion,
                        trt_version=trt_version, compute_capability=cc)
    click.echo(report.table())
    if not report.passed:
        click.echo("check failed: " + "; ".join(report.failures), err=True)
        sys.exit(1)


COMMANDS = [export_cmd]
