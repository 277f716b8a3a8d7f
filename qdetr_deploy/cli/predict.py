"""``qdetr-deploy predict``: draw detections on pictures and write them as COCO results (thin wrapper)."""

from __future__ import annotations

import sys

import click


@click.command("predict")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the pictures, detections.json and images.json (created if its parent exists).")
@click.option("--score-threshold", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Keep detections scoring at least this.")
@click.option("--topk", default=100, show_default=True, type=click.IntRange(min=1),
              help="At most this many detections per image.")
@click.option("--image-size", nargs=2, type=click.IntRange(min=32), default=None, metavar="H W",
              help="Canvas for a checkpoint (default: its calibration size, else 800 800) or for an ONNX "
                   "file without qdetr metadata whose input size is not fixed.")
@click.option("--bits", default=None, metavar="W-A-ATTN",
              help="Bits of a released Q-DETR checkpoint (4-4-8 or 2-2-8; its files store none).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow pickled Python objects in a .pth checkpoint (only for files you trust).")
def predict_cmd(model: str, images: tuple[str, ...], out_dir: str, score_threshold: float, topk: int,
                image_size: tuple[int, int] | None, bits: str | None, trust_checkpoint: bool) -> None:
    """Run MODEL (a checkpoint, an ONNX export or an engine) on IMAGE_OR_FOLDER... and draw its detections."""
    from qdetr_deploy.predict import predict

    result = predict(model, list(images), out_dir, score_threshold=score_threshold, topk=topk,
                     input_size=tuple(image_size) if image_size else None, trust=trust_checkpoint, bits=bits,
                     progress=sys.stderr.isatty())
    click.echo(f"{len(result['pictures'])} picture(s) and {result['num_detections']} detection(s) written: "
               f"{result['detections']}")


COMMANDS = [predict_cmd]
