"""``qdetr-deploy demo``: the main job on a built-in default (no download, no GPU needed)."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default="qdetr_demo", show_default=True,
              help="Where data, checkpoints, exports, engines and reports go.")
@click.option("--quick", is_flag=True, help="Smoke version (tiny budgets): checks the pipeline only.")
@click.option("--fresh", is_flag=True, help="Start over instead of reusing finished stages.")
def demo(workdir: str, quick: bool, fresh: bool) -> None:
    """Shapes data -> teacher -> 4-4-8 student (DA + FQM) -> ONNX -> engines -> bench, then one table."""
    from qdetr_deploy.demo import format_table, run_demo

    summary = run_demo(workdir, quick=quick, fresh=fresh, say=lambda m: click.echo(m, err=True))
    click.echo("\n" + format_table(summary))
    big = summary["speed_size"]
    click.echo(f"\nsize and operations as deployed (docs/ACCOUNTING.md); latency: ONNX Runtime on this CPU, "
               f"batch 1, the two engines taking turns in one process: on the validation images (96x96) "
               f"and, same checkpoints, at {big}x{big} on random input, where the integer kernels outweigh "
               f"the graph overhead.\nreport and plots: {summary['report_dir']}/ (bench.md, latency.png, "
               f"ap_vs_latency.png); all artefacts: {summary['workdir']}/")


COMMANDS = [demo]
