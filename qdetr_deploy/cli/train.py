"""``qdetr-deploy train``: train a DETR on a COCO-format set (thin wrapper over ``train.loop.train``).

The data and loop options are shared with ``distill`` (:func:`loop_options`, :func:`train_config`).
Several processes: ``torchrun --nproc_per_node N -m qdetr_deploy train ...``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from qdetr_deploy.train.config import TrainConfig, TrainResult  # torch-free: --help runs without torch

# the names of models.config.PRESETS, spelled out so that --help needs no torch (a test keeps them equal)
ARCHS = ("detr_r101", "detr_r18", "detr_r50", "detr_tiny")


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise click.BadParameter("expected at least one integer")
    return out


def loop_options(default_output: str) -> Callable[[Callable], Callable]:
    """The data and training-loop options of ``train`` and ``distill``."""
    path = click.Path(dir_okay=False)
    folder = click.Path(file_okay=False)
    options = [
        click.option("--images", required=True, type=folder, help="Training image folder."),
        click.option("--ann", required=True, type=path, help="Training annotations (COCO JSON)."),
        click.option("--val-images", type=folder, help="Validation image folder (COCO AP every epoch)."),
        click.option("--val-ann", type=path, help="Validation annotations (COCO JSON)."),
        click.option("--epochs", type=click.IntRange(min=1),
                     help="Epochs [default: 300, or unlimited with --max-steps]."),
        click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimizer steps."),
        click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1),
                     help="Images per process and step."),
        click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True)),
        click.option("--lr-backbone", default=1e-5, show_default=True, type=click.FloatRange(min=0),
                     help="Backbone learning rate (0 freezes the backbone)."),
        click.option("--weight-decay", default=1e-4, show_default=True, type=click.FloatRange(min=0)),
        click.option("--clip-max-norm", default=0.1, show_default=True, type=click.FloatRange(min=0),
                     help="Gradient clipping by global norm (0: off)."),
        click.option("--lr-drop", default="200", show_default=True, callback=_int_list,
                     help="Epochs at which the learning rate is multiplied by 0.1, e.g. 200,400."),
        click.option("--image-size", default=800, show_default=True, type=click.IntRange(min=16),
                     help="Shorter image side at evaluation (and training, without --scales)."),
        click.option("--scales", callback=_int_list,
                     help="Training shorter sides, e.g. 480,512,...,800 [default: upstream's at 800, else "
                          "--image-size]."),
        click.option("--max-size", default=1333, show_default=True, type=click.IntRange(min=16),
                     help="Longest image side."),
        click.option("--random-crop/--no-random-crop", default=None,
                     help="Upstream's random-crop branch [default: on when every scale is >= 384]."),
        click.option("--label-mode", default="auto", show_default=True,
                     type=click.Choice(["auto", "contiguous", "category_id"]),
                     help="Class index per category: 0..C-1, or the category id (upstream COCO models)."),
        click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
                     help="DataLoader worker processes per training process."),
        click.option("--output-dir", default=default_output, show_default=True, type=folder),
        click.option("--resume", is_flag=True, help="Continue the run saved in --output-dir."),
        click.option("--seed", default=42, show_default=True, type=int),
        click.option("--eval-every", default=1, show_default=True, type=click.IntRange(min=0),
                     help="Evaluate every N epochs and when the budget ends (0: never)."),
        click.option("--keep-every", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Also keep checkpoint_epochNNNN.safetensors every N epochs (0: only the latest)."),
        click.option("--on-bad-image", default="fail", show_default=True,
                     type=click.Choice(["fail", "skip"])),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), help="[default: cuda when available]"),
        click.option("--deterministic", is_flag=True, help="torch.use_deterministic_algorithms (warn only)."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars."),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


LOOP_KEYS = (
    "images", "ann", "val_images", "val_ann", "epochs", "max_steps", "batch_size", "lr", "lr_backbone",
    "weight_decay", "clip_max_norm", "lr_drop", "image_size", "scales", "max_size", "random_crop",
    "label_mode",
    "workers", "output_dir", "resume", "seed", "eval_every", "keep_every", "on_bad_image", "device",
    "deterministic", "progress",
)


def train_config(options: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from the parsed :func:`loop_options` (other keys are ignored)."""
    kw = {k: options[k] for k in LOOP_KEYS}
    if kw["epochs"] is None and kw["max_steps"] is None:
        kw["epochs"] = 300
    return TrainConfig(**kw)


def report(result: TrainResult) -> None:
    """Print where the run ended (rank 0 only)."""
    if result.rank != 0:
        return
    click.echo(f"checkpoint {result.checkpoint} (epoch {result.epoch}, step {result.step})")
    if result.metrics:
        m = result.metrics
        click.echo(f"val AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}")
    click.echo(f"log {result.log}")


@click.command("train")
@loop_options("runs/train")
@click.option("--arch", type=click.Choice(ARCHS), help="Model preset [default: detr_r50].")
@click.option("--init", type=click.Path(dir_okay=False),
              help="Start from this checkpoint (ours or upstream DETR); the class head is resized if needed.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow pickled objects in an upstream --init checkpoint.")
def train_cmd(arch: str | None, init: str | None, trust_checkpoint: bool, **options: Any) -> None:
    """Train a DETR with the set loss on a COCO-format dataset (float, or quantized from --init)."""
    from qdetr_deploy.train.loop import train

    if arch is not None and init is not None:
        raise click.UsageError("--arch and --init exclude each other (the init checkpoint fixes the model)")
    report(train(train_config(options), arch=arch or "detr_r50", init=init, trust=trust_checkpoint))


COMMANDS = [train_cmd]
