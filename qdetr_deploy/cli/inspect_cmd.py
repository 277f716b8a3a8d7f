"""``qdetr-deploy inspect``: per-layer bits and steps, model size and operations."""

from __future__ import annotations

import json

import click

from qdetr_deploy.errors import QDetrError


def _load(ckpt: str | None, arch: str | None, bits: str | None, trust: bool):
    """(model, where it came from)."""
    from qdetr_deploy.checkpoints import load_checkpoint
    from qdetr_deploy.models import build_model, get_preset
    from qdetr_deploy.quant import QuantConfig, quantize
    from qdetr_deploy.released import FORMAT_NAME

    qconfig = QuantConfig.from_bits(bits) if bits and bits != "fp32" else None
    if ckpt:
        loaded = load_checkpoint(ckpt, trust=trust, quant_config=qconfig)
        source = {"upstream": "upstream DETR format", FORMAT_NAME: FORMAT_NAME}
        return loaded.model, source.get(loaded.meta.get("source"), "qdetr-deploy checkpoint")
    if not arch:
        raise QDetrError("give a checkpoint or --arch (e.g. --arch detr_r50 --bits 4-4-8)")
    try:
        model = build_model(get_preset(arch))
    except KeyError as e:
        raise QDetrError(str(e.args[0])) from None
    return (quantize(model, qconfig) if qconfig else model), f"untrained {arch}"


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    h, w = report["input_size"]
    table = Table(title=f"layers ({report['bits']}, input {h}x{w})")
    for col in ("layer", "kind", "W bits", "A bits", "params", "MMACs", "step mean", "step min..max"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in report["layers"]:
        steps = ("", "") if r["step_mean"] is None else (
            f"{r['step_mean']:.3g}", f"{r['step_min']:.2g}..{r['step_max']:.2g}")
        bits = ["fp" if b >= 32 else str(b) for b in (r["w_bits"], r["a_bits"])]
        table.add_row(r["name"], r["kind"], *bits, f"{r['params']:,}", f"{r['macs'] / 1e6:,.1f}", *steps)
    console = Console(width=None if Console().is_terminal else 160)
    if report["layers"]:  # --no-layers: the summary alone, no empty table
        console.print(table)
    _print_summary(console, report)


def _print_summary(console, report: dict) -> None:
    e = report["exact"]
    console.print(report["model"])
    console.print(
        f"size {report['size_mb']:.2f} MB (full precision {report['fp_size_mb']:.2f} MB, "
        f"x{report['size_reduction']:.2f}); operations {report['gops']:.2f} G (full precision "
        f"{report['fp_gops']:.2f} G, x{report['ops_reduction']:.2f}) at input "
        f"{report['input_size'][0]}x{report['input_size'][1]}, counted as in the paper "
        f"(docs/ACCOUNTING.md); as deployed: {e['size_mb']:.2f} MB, {e['gops']:.2f} G")


@click.command("inspect")
@click.argument("ckpt", required=False, type=click.Path(dir_okay=False))
@click.option("--arch", help="Preset for an untrained model: detr_r50, detr_r101, detr_r18, detr_tiny, "
              "smca_r50, smca_small.")
@click.option("--bits", help="W-A-ATTN bits (e.g. 4-4-8) to quantize with, or fp32; for a released Q-DETR "
              "checkpoint, its bits (4-4-8 or 2-2-8: the file does not store them).")
@click.option("--input-size", nargs=2, type=click.IntRange(min=32), default=None, metavar="H W",
              help="Input size for the operation count (default 800 1133).")
@click.option("--accounting", type=click.Choice(["paper", "exact"]), default="paper", show_default=True,
              help="paper: Q-DETR's counting; exact: only what is quantized counts as low-bit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--layers/--no-layers", default=True, help="Include the per-layer table.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled upstream training checkpoints.")
def inspect_cmd(ckpt, arch, bits, input_size, accounting, as_json, layers, trust_checkpoint) -> None:
    """Per-layer bits and step sizes, model size (MB) and operations (G) with reduction factors."""
    from qdetr_deploy.quant.accounting import DEFAULT_INPUT_SIZE, inspect_model

    model, source = _load(ckpt, arch, bits, trust_checkpoint)
    report = inspect_model(model, tuple(input_size or DEFAULT_INPUT_SIZE), accounting, source)
    if not layers:
        report.pop("layers")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_table(report if layers else {**report, "layers": []})


COMMANDS = [inspect_cmd]
