"""``qdetr-deploy evaluate``: COCO bbox evaluation of a detections JSON (thin wrapper)."""

from __future__ import annotations

import json

import click

from qdetr_deploy.bench.cocoeval import evaluate_coco


@click.command("evaluate")
@click.option("--ann", "ann_file", required=True, type=click.Path(dir_okay=False),
              help="COCO ground-truth annotations JSON.")
@click.option("--detections", "detections", required=True, type=click.Path(dir_okay=False),
              help="COCO results JSON: [{image_id, category_id, bbox [x,y,w,h], score}, ...].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def evaluate(ann_file: str, detections: str, as_json: bool) -> None:
    """COCO bbox AP/AR of DETECTIONS against ANN (pycocotools, its 12 statistics)."""
    result = evaluate_coco(ann_file, detections)
    if as_json:
        click.echo(json.dumps(result))
        return
    for name, value in zip(result["names"], result["stats"]):
        click.echo(f"{name:<6} {value:.4f}")
    click.echo(f"{result['num_detections']} detections on {result['num_images']} images")


COMMANDS = [evaluate]
