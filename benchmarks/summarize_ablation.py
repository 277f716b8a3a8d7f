"""Summarise a benchmarks/run_ablation.sh study: table, paired statistics and a plot.

Usage: python benchmarks/summarize_ablation.py OUT_DIR [--png PATH]

Reads ``OUT_DIR/cells/<bits>/<variant>/seed<N>/log.jsonl`` (last evaluation of each run; DRD statistics
averaged over the run's steps) and the teacher's and student_fp's last evaluations. For every cell: mean and
sample standard deviation over seeds of AP50 and AP; against the baseline of the same bits, the paired
difference over the seeds both have (mean, standard deviation) and a two-sided paired t-test p-value
(scipy). Writes ``OUT_DIR/results.md``, ``results.json`` and ``ablation.png`` (AP50 per cell, mean with
one-standard-deviation error bars and the individual seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

FLAGS = {
    "baseline": "--no-da --no-fqm", "da": "--da self", "fqm": "--fqm", "both": "--da self --fqm",
    "both_d": "+ --drd-feature d", "both_role": "+ --fqm-match role",
    "both_d_role": "+ --drd-feature d --fqm-match role", "both_tau_none": "+ --tau none",
}
ORDER = list(FLAGS)


def describe(variant: str) -> str:
    """The distill flags of a variant name (``base[_l2][_lam<x>]``)."""
    base, extra = variant, []
    if "_lam" in base:
        base, lam = base.split("_lam")
        extra.append(f"--lambda-drd {lam}")
    if base.endswith("_l2"):
        base = base[: -len("_l2")]
        extra.insert(0, "--drd-distance l2")
    return " ".join([FLAGS.get(base, base), *extra])


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def read_run(run: Path) -> dict | None:
    """Last evaluation and mean DRD statistics of one finished run (None if it has no evaluation)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return None
    recs = _records(log)
    evals = [r for r in recs if r["event"] == "eval"]
    if not evals:
        return None
    steps = [r for r in recs if r["event"] == "step"]
    out = {k: evals[-1].get(k) for k in ("AP", "AP50", "AP75", "step")}
    for key in ("drd_pairs", "drd_role_mismatch", "loss_drd"):
        vals = [r[key] for r in steps if key in r]
        out[key] = statistics.fmean(vals) if vals else None
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def paired(base: dict[int, float], other: dict[int, float]) -> dict:
    """Paired difference other - base over the common seeds: mean, std, n, two-sided paired t-test p."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(base) & set(other))
    diffs = [other[s] - base[s] for s in seeds]
    if not diffs:
        return {"n": 0}
    mean, std = _mean_std(diffs)
    p = None
    if len(diffs) > 1:
        p = float(ttest_rel([other[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return {"n": len(diffs), "mean": mean, "std": std, "p": None if p is None or math.isnan(p) else p}


def collect(out: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{bits: {variant: {seed: run}}}`` for every finished run under ``out/cells``."""
    cells: dict[str, dict[str, dict[int, dict]]] = {}
    for run in sorted((out / "cells").glob("*/*/seed*")):
        rec = read_run(run)
        if rec is not None:
            bits, variant, seed = run.parent.parent.name, run.parent.name, int(run.name[len("seed"):])
            cells.setdefault(bits, {}).setdefault(variant, {})[seed] = rec
    return cells


def _order(variant: str) -> tuple[int, int, str]:
    """The cells of FLAGS in their order, then the sweep cells (``_l2``/``_lam`` suffixes) by name."""
    base = variant.split("_lam")[0].removesuffix("_l2")
    return (int(base != variant), ORDER.index(base) if base in ORDER else len(ORDER), variant)


def summarize(out: Path) -> dict:
    cells = collect(out)
    result: dict = {"reference": {}, "cells": {}}
    for name in ("teacher", "student_fp"):
        rec = read_run(out / name)
        if rec:
            result["reference"][name] = {"AP": rec["AP"], "AP50": rec["AP50"]}
    for bits in sorted(cells, reverse=True):
        base = {s: r["AP50"] for s, r in cells[bits].get("baseline", {}).items()}
        base_ap = {s: r["AP"] for s, r in cells[bits].get("baseline", {}).items()}
        for variant in sorted(cells[bits], key=_order):
            runs = cells[bits][variant]
            ap50 = {s: r["AP50"] for s, r in runs.items()}
            ap = {s: r["AP"] for s, r in runs.items()}
            row = {"bits": bits, "variant": variant, "flags": describe(variant), "seeds": sorted(runs),
                   "AP50": ap50, "AP": ap, "AP50_mean_std": _mean_std(list(ap50.values())),
                   "AP_mean_std": _mean_std(list(ap.values()))}
            for key in ("drd_pairs", "drd_role_mismatch"):
                vals = [r[key] for r in runs.values() if r[key] is not None]
                row[key] = statistics.fmean(vals) if vals else None
            if variant != "baseline" and base:
                row["paired_AP50"], row["paired_AP"] = paired(base, ap50), paired(base_ap, ap)
            result["cells"][f"{bits}:{variant}"] = row
    return result


def _pm(ms: tuple[float, float], scale: float = 100) -> str:
    m, s = ms
    return f"{scale * m:.1f} ± {scale * s:.1f}" if not math.isnan(s) else f"{scale * m:.1f}"


def table(result: dict) -> str:
    lines = ["AP x100 on the shapes val set; mean ± sample std over seeds; Δ = paired difference against the",
             "baseline of the same bits (same seeds), mean ± std of the differences, p = paired t-test.", ""]
    ref = result["reference"]
    for name, label in (("teacher", "teacher (full precision)"), ("student_fp", "student start")):
        if name in ref:
            lines.append(f"- {label}: AP {100 * ref[name]['AP']:.1f}, AP50 {100 * ref[name]['AP50']:.1f}")
    lines += ["", "| bits | cell | flags | n | AP50 | AP | Δ AP50 | p | Δ AP | p | pairs/step | role "
              "mismatch |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["cells"].values():
        d50, dap = row.get("paired_AP50", {}), row.get("paired_AP", {})

        def delta(d: dict) -> tuple[str, str]:
            if not d.get("n"):
                return "", ""
            p = f"{d['p']:.2f}" if d.get("p") is not None else "n/a"
            return (f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}" if d["n"] > 1 else
                    f"{100 * d['mean']:+.1f}"), p

        (a, pa), (b, pb) = delta(d50), delta(dap)
        pairs = f"{row['drd_pairs']:.1f}" if row["drd_pairs"] is not None else "-"
        mis = f"{100 * row['drd_role_mismatch']:.0f}%" if row["drd_role_mismatch"] is not None else "-"
        lines.append(f"| {row['bits']} | {row['variant']} | `{row['flags']}` | {len(row['seeds'])} | "
                     f"{_pm(row['AP50_mean_std'])} | {_pm(row['AP_mean_std'])} | {a} | {pa} | {b} | {pb} | "
                     f"{pairs} | {mis} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result["cells"].values())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(rows) + 2), 3.6), dpi=90)
    colors = {"4-4-8": "tab:blue", "2-2-8": "tab:red"}
    for x, row in enumerate(rows):
        m, s = row["AP50_mean_std"]
        c = colors.get(row["bits"], "tab:gray")
        ax.errorbar([x], [100 * m], yerr=[0 if math.isnan(s) else 100 * s], fmt="o", color=c, capsize=3)
        ax.scatter([x] * len(row["AP50"]), [100 * v for v in row["AP50"].values()], s=8, color=c, alpha=0.4)
    for name, style in (("teacher", "--"), ("student_fp", ":")):
        if name in result["reference"]:
            ax.axhline(100 * result["reference"][name]["AP50"], ls=style, color="k", lw=0.8, label=name)
    ax.set_xticks(range(len(rows)), [f"{r['bits']}\n{r['variant']}" for r in rows], rotation=60,
                  ha="right", fontsize=7)
    ax.set_ylabel("AP50 (x100)")
    ax.set_title("Q-DETR ablation on shapes: AP50 per cell (mean ± std over seeds, dots = seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--png", type=Path, help="plot path [default: OUT/ablation.png]")
    args = ap.parse_args()
    result = summarize(args.out)
    text = table(result)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    if result["cells"]:
        plot(result, args.png or args.out / "ablation.png")
    print(text)


if __name__ == "__main__":
    main()
