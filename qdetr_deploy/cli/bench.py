"""``qdetr-deploy bench``: latency and COCO accuracy of engines side by side (thin wrapper)."""

from __future__ import annotations

import json
import sys

import click


@click.command("bench")
@click.argument("engines", nargs=-1, required=True, type=click.Path())
@click.option("--images", "images_dir", type=click.Path(), help="Image folder (with --ann: COCO evaluation).")
@click.option("--ann", "ann_file", type=click.Path(), help="COCO annotations of the images.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Images per call.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0), help="Untimed calls.")
@click.option("--iters", default=50, show_default=True, type=click.IntRange(min=1), help="Timed calls.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write bench.json, bench.md, PNG plots and detections here.")
@click.option("--max-images", type=click.IntRange(min=1), help="Use only the first N annotated images.")
@click.option("--isolate/--in-process", default=True, show_default=True,
              help="Measure each engine in its own process, one after the other (sessions in one process "
                   "slow each other down on small CPUs), or all in this process, taking turns.")
@click.option("--input-size", nargs=2, type=click.IntRange(min=1), default=None, metavar="H W",
              help="Input height and width for an ONNX file without qdetr metadata whose input size is "
                   "not fixed.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON instead of Markdown.")
def bench(engines: tuple[str, ...], images_dir: str | None, ann_file: str | None, batch: int, warmup: int,
          iters: int, report_dir: str | None, max_images: int | None, isolate: bool,
          input_size: tuple[int, int] | None, as_json: bool) -> None:
    """Benchmark ENGINE_OR_ONNX... side by side; ratios are against the first one. A failed COCO evaluation
    is one line naming the engine and exit code 2, after the latency figures are printed (and written)."""
    from qdetr_deploy.bench.report import markdown_report
    from qdetr_deploy.bench.run import bench_engines

    result = bench_engines(list(engines), images_dir=images_dir, ann_file=ann_file, batch=batch,
                           warmup=warmup, iters=iters, report_dir=report_dir, max_images=max_images,
                           progress=sys.stderr.isatty(), isolate=isolate,
                           input_size=tuple(input_size) if input_size else None)
    click.echo(json.dumps(result) if as_json else markdown_report(result))
    for error in result.get("errors", []):
        click.echo(f"error: {error}", err=True)
    if result.get("errors"):
        sys.exit(2)


COMMANDS = [bench]
