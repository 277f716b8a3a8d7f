"""``qdetr-deploy make-dataset KIND --out DIR``: write a procedural detection set (no download needed)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("make-dataset")
@click.argument("kind", type=click.Choice(["shapes"]))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write into (train/, val/, annotations/).")
@click.option("--num-train", default=1200, show_default=True, type=click.IntRange(min=1))
@click.option("--num-val", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=96, show_default=True, type=click.IntRange(min=16), help="Square side.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Regenerate even if a complete set is already there.")
def make_dataset(kind: str, out_dir: Path, num_train: int, num_val: int, image_size: int, seed: int,
                 overwrite: bool) -> None:
    """Write the KIND dataset (only "shapes": coloured shapes, COCO JSON) under --out."""
    from qdetr_deploy.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(out_dir, num_train=num_train, num_val=num_val, image_size=image_size,
                                seed=seed, overwrite=overwrite)
    click.echo(f"{kind} dataset in {paths['root']}")
    for split in ("train", "val"):
        click.echo(f"  {split}: images {paths[f'{split}_images']}  annotations {paths[f'{split}_ann']}")


COMMANDS = [make_dataset]
