"""``qdetr-deploy quantize``: full-precision checkpoint -> calibrated low-bit student (thin wrapper)."""

from __future__ import annotations

import click


@click.command("quantize")
@click.argument("teacher", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Student checkpoint to write (.safetensors).")
@click.option("--bits", default="4-4-8", show_default=True, help="W-A-ATTN bits: 2-2-8, 3-3-8, 4-4-8, 8-8-8.")
@click.option("--calib", "calib", required=True, type=click.Path(),
              help="Folder of calibration images (searched recursively).")
@click.option("--calib-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Number of calibration images (first N by file name).")
@click.option("--method", type=click.Choice(["lsq+", "minmax", "percentile"]), default="lsq+",
              show_default=True, help="How steps are initialised from the calibration statistics.")
@click.option("--image-size", nargs=2, type=click.IntRange(min=32), default=(800, 800), show_default=True,
              metavar="H W", help="Canvas the images are letterboxed onto (use the export size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--act-granularity", type=click.Choice(["tensor", "channel"]), default="tensor",
              show_default=True, help="Activation steps per tensor (deployable everywhere) or per channel.")
@click.option("--da", type=click.Choice(["none", "self", "cross", "both"]), default="none", show_default=True,
              help="Distribution alignment of decoder queries (none by default, as in distill: it did not "
                   "beat LSQ+ in docs/RESULTS.md and costs graph nodes).")
@click.option("--preset", type=click.Choice(["onnxruntime", "paper"]), default="onnxruntime",
              show_default=True,
              help="onnxruntime: --residual-bits 8 --conv-bias int32 --downsample-bits 8 "
                   "--shared-block-input --input-proj-bits 8 (an integer ResNet in ONNX Runtime, exported "
                   "exactly); paper: "
                   "the Q-DETR placement exactly. The options below override it.")
@click.option("--residual-bits", type=click.Choice(["none", "8"]), default=None,
              help="Quantize the residual branch of ResNet blocks (8: the block's last conv runs on integer "
                   "kernels in ONNX Runtime/TensorRT; none: the paper's full-precision residual adds). "
                   "Default: the preset's.")
@click.option("--conv-bias", type=click.Choice(["float", "int32"]), default=None,
              help="int32: conv biases (batch norms folded) fake-quantized on the int32 grid of ONNX "
                   "Runtime's QLinearConv, so the export needs no rounding; float: the paper. Default: the "
                   "preset's.")
@click.option("--downsample-bits", type=click.Choice(["none", "8"]), default=None,
              help="Quantize the ResNet downsample convs (8: QLinearConv in ONNX Runtime; none: the paper's "
                   "full precision). Default: the preset's.")
@click.option("--input-proj-bits", type=click.Choice(["none", "8"]), default=None,
              help="Quantize DETR's input_proj (8: the backbone's last conv gets an integer output; none: "
                   "the paper's full precision). Default: the preset's.")
@click.option("--shared-block-input/--own-block-input", default=None,
              help="Each ResNet block's first conv and downsample read the block input's 8-bit residual "
                   "codes (no requantization between blocks) or quantize it again at the activation bits "
                   "(the paper). Default: the preset's.")
@click.option("--zero-points", "act_zero_point", type=click.Choice(["learned", "zero"]), default=None,
              help="Activation zero points: learned (LSQ+, the paper; the default) or zero, with 8-bit "
                   "activations signed (every activation then exports to TensorRT int8 exactly).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled objects in an upstream .pth.")
def quantize_cmd(teacher: str, out: str, bits: str, calib: str, calib_size: int, method: str,
                 image_size: tuple[int, int], batch_size: int, act_granularity: str, da: str,
                 preset: str, residual_bits: str | None, conv_bias: str | None, downsample_bits: str | None,
                 input_proj_bits: str | None, shared_block_input: bool | None, act_zero_point: str | None,
                 trust_checkpoint: bool) -> None:
    """Quantize TEACHER (ours or an upstream DETR .pth) and calibrate it on --calib images."""
    from qdetr_deploy.pipeline import quantize_checkpoint

    path = quantize_checkpoint(teacher, out, bits=bits, calib=calib, calib_size=calib_size, method=method,
                               image_size=tuple(image_size), batch_size=batch_size,
                               act_granularity=act_granularity, da=da, trust=trust_checkpoint,
                               preset=preset, residual_bits=residual_bits, conv_bias=conv_bias,
                               downsample_bits=downsample_bits, input_proj_bits=input_proj_bits,
                               shared_block_input=shared_block_input,
                               act_zero_point=act_zero_point)
    click.echo(f"wrote {path} ({bits}, preset {preset}, calibrated with {method})")


COMMANDS = [quantize_cmd]
