"""Benchmark reports: JSON (atomic), a side-by-side Markdown table with ratios against the first engine and
per-class AP, and PNG plots (latency distribution per engine; AP vs p50 latency), matplotlib Agg backend."""

from __future__ import annotations

import os
import re
from pathlib import Path

from qdetr_deploy.bench.cocoeval import STAT_NAMES
from qdetr_deploy.bench.latency import BLOCK
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path, write_json, write_text


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(row: dict, key: str) -> str:
    r = (row.get("ratio_vs_first") or {}).get(key)
    return "" if r is None else f" (x{r:.2f})"


def _latency_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for key, label in (("engine_latency", "engine"), ("e2e_latency", "end-to-end")):
        if not any(r.get(key) for r in rows):
            continue
        out.append([f"{label} p50 ms (x vs first)"] + [_fmt((r[key] or {}).get("p50_ms")) + _ratio(r, key)
                                                       for r in rows])
        for stat in ("p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms"):
            values = [_fmt((r[key] or {}).get(stat)) for r in rows]
            out.append([f"{label} {stat.replace('_ms', '')} ms", *values])
        out.append([f"{label} images/s"] + [_fmt((r[key] or {}).get("throughput_ips"), ".1f") for r in rows])
    return out


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def markdown_report(result: dict) -> str:
    """Side-by-side Markdown: engines as columns, latency ratios against the first engine, COCO stats and
    per-class AP when the run had images and annotations."""
    rows = result["engines"]
    cfg = result["config"]
    head = ["", *[r["name"] for r in rows]]
    info = [["backend"] + [r["backend"] for r in rows], ["device"] + [r["device"] for r in rows],
            ["bits"] + [str(r.get("bits")) for r in rows],
            ["graph (from its ops)"] + [(r.get("graph") or {}).get("label", "-") for r in rows],
            ["input"] + ["x".join(str(d) for d in r["input_spec"]["shape"]) for r in rows],
            ["run batch"] + [str(r["run_batch"]) for r in rows]]
    rss = [f"{_fmt(r['memory']['host_rss_mb'], '.0f')} / {_fmt(r['memory']['host_peak_rss_mb'], '.0f')}"
           for r in rows]
    mem = [["host RSS MB (now / process peak)", *rss],
           ["device peak MB"] + [_fmt(r["memory"]["device_peak_mb"], ".0f") for r in rows]]
    lines = [f"# Benchmark ({result['mode']})", "",
             f"batch {cfg['batch']}, warm-up {cfg['warmup']}, {cfg['iters']} timed iterations per engine, "
             + ("each engine alone in its own process, one after the other; " if cfg.get("isolated") else
                f"engines taking turns in blocks of {BLOCK} (one untimed run per turn); ") +
             f"images: {cfg['num_images'] or 'random input'}. "
             "Ratios are latency relative to the first engine (x0.50 = half its latency).", ""]
    lines += _table(head, info + _latency_rows(rows) + mem)
    lines += _load_line(cfg.get("machine_load"))
    coco = [r for r in rows if r.get("coco")]
    if coco:
        lines += ["", "## COCO bbox", ""]
        stats = [[name] + [_fmt(((r.get("coco") or {}).get("stats") or [None] * 12)[i], ".4f") for r in rows]
                 for i, name in enumerate(STAT_NAMES)]
        lines += _table(head, stats)
        lines += ["", "## Per-class AP (IoU .50:.95)", ""]
        classes = list(coco[0]["coco"]["per_class"])
        lines += _table(["class", *head[1:]],
                        [[c] + [_fmt((r.get("coco") or {}).get("per_class", {}).get(c), ".3f") for r in rows]
                         for c in classes])
    notes = _notes(rows)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _load_line(load: dict | None) -> list[str]:
    if not load or not load.get("warning"):
        return []
    return ["", f"Warning: {load['warning']}."]


def _notes(rows: list[dict]) -> list[str]:
    """Per engine: what bench assumed, detections it ignored, evaluations that failed."""
    out = []
    for r in rows:
        out += [f"{r['name']}: {n}" for n in r.get("notes", [])]
        c = r.get("coco") or {}
        if c.get("ignored_detections"):
            ids = c["ignored_category_ids"]
            out.append(f"{r['name']}: {c['ignored_detections']} detection(s) name {len(ids)} category id(s) "
                       f"not in the annotations (e.g. {ids[0]}): ignored, as pycocotools does")
        if r.get("coco_error"):
            out.append(r["coco_error"])
    return out


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_latency(result: dict, path: str | os.PathLike) -> Path:
    """Box plot of per-iteration latency per engine (engine-only, and end-to-end when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["engines"]
    kinds = [k for k in ("engine_latencies_ms", "e2e_latencies_ms") if any(r.get(k) for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 + 1.5 * len(rows) * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ax.boxplot([r.get(kind) or [0.0] for r in rows], showfliers=True)
        ax.set_xticks(range(1, len(rows) + 1), [r["name"] for r in rows], rotation=20, ha="right")
        ax.set_ylabel("latency per batch (ms)")
        ax.set_title("engine only" if kind.startswith("engine") else "end to end (with preprocessing)")
        ax.grid(axis="y", alpha=0.3)
    try:
        return _savefig(fig, Path(path))
    finally:
        plt.close(fig)


def plot_ap_vs_latency(result: dict, path: str | os.PathLike) -> Path:
    """Scatter of COCO AP against engine-only p50 latency, one labelled point per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in (r for r in result["engines"] if r.get("coco")):
        x, y = r["engine_latency"]["p50_ms"], r["coco"]["stats"][0]
        ax.scatter([x], [y])
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("engine p50 latency (ms)")
    ax.set_ylabel("COCO AP @[.50:.95]")
    ax.grid(alpha=0.3)
    try:
        return _savefig(fig, Path(path))
    finally:
        plt.close(fig)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_reports(result: dict, report_dir: str | os.PathLike,
                  detections: dict[str, list] | None = None) -> dict[str, str]:
    """Write bench.json, bench.md, latency.png, ap_vs_latency.png (with COCO) and one detections JSON per
    engine (with images) into ``report_dir`` (created if its parent exists); returns {kind: path}."""
    out = Path(report_dir)
    if not out.parent.is_dir():
        raise QDetrError(f"parent folder {out.parent} does not exist", out)
    out.mkdir(exist_ok=True)
    files = {"json": out / "bench.json", "markdown": out / "bench.md", "latency_plot": out / "latency.png"}
    if any(r.get("coco") for r in result["engines"]):
        files["ap_plot"] = out / "ap_vs_latency.png"
    for name, dets in (detections or {}).items():
        path = files[f"detections:{name}"] = out / f"detections_{_safe(name)}.json"
        write_json(path, dets)
        next(r for r in result["engines"] if r["name"] == name)["detections_file"] = str(path)
    paths = {k: str(v) for k, v in files.items()}
    result["report_files"] = paths
    write_text(files["markdown"], markdown_report(result))
    plot_latency(result, files["latency_plot"])
    if "ap_plot" in files:
        plot_ap_vs_latency(result, files["ap_plot"])
    write_json(files["json"], result)
    return paths
