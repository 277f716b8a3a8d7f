"""``bench_engines``: latency (and, with images + annotations, COCO accuracy) of several engines at once.

Without images: engine-only latency on random input of each engine's shape. With images and COCO
annotations: one end-to-end pass over the images (load + preprocess + run + post-process, timed per batch)
that also collects the detections for COCO evaluation, then engine-only timing on already preprocessed
batches. In one process (the default of the library function), engines take turns in every phase (drift on a
shared machine hits all alike), in blocks of ``latency.BLOCK`` timed runs after one untimed run each turn
(``latency.interleaved``: an ONNX Runtime session's spinning worker threads would otherwise slow the engine
timed right after it). With ``isolate`` (the CLI's default) each engine is measured alone in its own process
instead (``bench/worker.py``).

COCO evaluation runs after every engine has been timed, in this process, one engine at a time: an
evaluation error is recorded in that engine's row (``coco_error``, naming the engine) and never costs the
latency figures, which are reported and written all the same. Other processes loading the machine while it
times are one warning line (``latency.MachineLoad``). A graph is labelled by what it contains
(``engines/onnx_graph.py``), not only by the metadata it carries.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qdetr_deploy.bench.cocoeval import evaluate_coco, load_coco_gt
from qdetr_deploy.bench.latency import BLOCK, MachineLoad, interleaved, latency_stats, memory_snapshot
from qdetr_deploy.bench.preprocess import detections_to_coco, outputs_to_detections, preprocess
from qdetr_deploy.engines import Engine, check_batch, open_engine
from qdetr_deploy.engines.onnx_graph import reconcile_bits
from qdetr_deploy.errors import QDetrError

log = logging.getLogger(__name__)

KEEP_BATCHES = 4  # preprocessed batches kept per engine for engine-only timing


def _names(engines: list[Engine]) -> list[str]:
    names: list[str] = []
    for e in engines:
        name = e.name
        while name in names:
            name = f"{e.name}#{len(names)}"
        names.append(name)
    return names


def run_batch_for(engine: Engine, batch: int) -> int:
    """Batch the engine is called with: its static batch (``batch`` may be smaller: padded), else batch."""
    if batch < 1:
        raise QDetrError(f"batch must be at least 1, got {batch}")
    static = engine.static_batch
    check_batch(engine, static if static is not None and batch <= static else batch)
    return static if static is not None else batch


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.zeros((n - x.shape[0], *x.shape[1:]), x.dtype)])


def _engine_info(engine: Engine, name: str, run_batch: int) -> dict:
    meta = engine.metadata
    spec = engine.input_spec
    graph = engine.graph_summary()
    return {"name": name, "path": str(engine.path), "backend": engine.backend, "device": engine.device,
            "input_spec": {"name": spec[0], "shape": spec[1], "dtype": spec[2]}, "run_batch": run_batch,
            "bits": reconcile_bits(meta.get("bits"), graph), "metadata_bits": meta.get("bits"),
            "graph": graph, "input_size": meta.get("input_size"), "postprocess": meta.get("postprocess"),
            "notes": _foreign_notes(meta)}


def _foreign_notes(meta: dict) -> list[str]:
    """What bench assumed for a file without qdetr metadata (``engines/onnx_graph.foreign_metadata``)."""
    if not meta.get("foreign"):
        return []
    H, W = meta["input_size"]
    notes = [f"no qdetr metadata: timed at {H}x{W}, DETR preprocessing (ImageNet mean/std) assumed"]
    if meta.get("outputs_recognised"):
        notes.append("no qdetr metadata: its DETR outputs' labels are taken as COCO category ids")
    else:
        notes.append(f"no qdetr metadata and outputs {meta.get('output_names')} are not DETR's "
                     "(pred_logits/pred_boxes or scores/labels/boxes): no detections, no COCO AP")
    return notes


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr, unit="run")


def _random_phase(engines: list[Engine], names: list[str], runs: list[int], batch: int, warmup: int,
                  iters: int, progress: bool) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    inputs = {}
    for e, n, rb in zip(engines, names, runs):
        H, W = (int(d) for d in e.input_spec[1][2:])
        inputs[n] = _pad(rng.standard_normal((batch, 3, H, W)).astype(np.float32), rb)
    runners = {n: (lambda _i, e=e, n=n: e.run(inputs[n])) for e, n in zip(engines, names)}
    with _bar((warmup + iters) * len(engines), "latency", progress) as bar:
        return interleaved(runners, warmup, iters, bar, block=BLOCK)


def select_images(ann_file: str | os.PathLike, images_dir: str | os.PathLike,
                  max_images: int | None) -> list[tuple[int, Path]]:
    """(image id, file) of the annotated images, in annotation order, the first ``max_images``; every
    file must exist (checked up front, one line naming the first missing one)."""
    gt = load_coco_gt(ann_file)
    images = gt.dataset["images"][: max_images or None]
    if not images:
        raise QDetrError("no images in the annotations", ann_file)
    out = []
    for im in images:
        if "file_name" not in im:
            raise QDetrError(f"image {im['id']} has no file_name", ann_file)
        path = Path(images_dir) / im["file_name"]
        if not path.is_file():
            raise QDetrError("image not found", path)
        out.append((int(im["id"]), path))
    return out


def detect_batch(engine: Engine, items: list[tuple[int, Path]], run_batch: int, score_threshold: float = 0.0,
                 topk: int = 100, keep: list | None = None) -> list[dict]:
    """End to end for one batch of (image id, file): preprocess, run, post-process, COCO results (none
    when the engine's outputs are not a detector's it knows)."""
    meta = engine.metadata
    pre = [preprocess(p, meta["input_size"], meta["mean"], meta["std"]) for _, p in items]
    x = _pad(np.stack([p.array for p in pre]), run_batch)
    if keep is not None and len(keep) < KEEP_BATCHES:
        keep.append(x)
    outputs = engine.run(x)
    if not meta.get("outputs_recognised", True):
        return []
    scores, labels, boxes = outputs_to_detections(outputs, meta)
    dets = []
    for j, ((image_id, _), p) in enumerate(zip(items, pre)):
        dets += detections_to_coco(scores[j], labels[j], boxes[j], p.scale, image_id,
                                   meta.get("category_ids"), score_threshold, topk, image_size=p.orig_size)
    return dets


def _image_phase(engines: list[Engine], names: list[str], runs: list[int], items: list, batch: int,
                 warmup: int, progress: bool) -> tuple[dict, dict, dict]:
    """Warm-up, then one timed end-to-end pass over the images, the engines taking turns as in
    :func:`latency.interleaved`; returns times, detections, kept inputs (the first KEEP_BATCHES batches).

    A call for batch ``i`` stores that batch's detections (and input) under ``i``, so the untimed calls
    (warm-up, settle) leave nothing twice: the timed pass overwrites what they stored."""
    chunks = [items[i: i + batch] for i in range(0, len(items), batch)]
    found: dict[str, dict[int, list]] = {n: {} for n in names}
    inputs: dict[str, dict[int, np.ndarray]] = {n: {} for n in names}

    def runner(k: int) -> Callable[[int], None]:
        def run(i: int) -> None:
            i %= len(chunks)
            keep: list | None = [] if i < KEEP_BATCHES else None
            found[names[k]][i] = detect_batch(engines[k], chunks[i], runs[k], keep=keep)
            if keep:
                inputs[names[k]][i] = keep[0]
        return run

    with _bar((warmup + len(chunks)) * len(engines), "images", progress) as bar:
        runners = {n: runner(k) for k, n in enumerate(names)}
        times = interleaved(runners, warmup, len(chunks), bar, block=BLOCK)
    dets = {n: [d for i in sorted(found[n]) for d in found[n][i]] for n in names}
    kept = {n: [inputs[n][i] for i in sorted(inputs[n])] for n in names}
    return times, dets, kept


def _add_ratios(rows: list[dict]) -> None:
    for key in ("engine_latency", "e2e_latency"):
        base = (rows[0].get(key) or {}).get("p50_ms")
        for r in rows:
            p50 = (r.get(key) or {}).get("p50_ms")
            r.setdefault("ratio_vs_first", {})[key] = p50 / base if base and p50 is not None else None


def bench_engines(paths: list[str | os.PathLike], images_dir: str | os.PathLike | None = None,
                  ann_file: str | os.PathLike | None = None, batch: int = 1, warmup: int = 10,
                  iters: int = 50, report_dir: str | os.PathLike | None = None, max_images: int | None = None,
                  progress: bool = True, score_threshold: float = 0.0, topk: int = 100,
                  isolate: bool = False, input_size: tuple[int, int] | None = None) -> dict:
    """Benchmark engines side by side; with ``report_dir`` also write JSON, Markdown, PNGs and detections.
    Returns the JSON-ready result (see ``bench/report.py``); ``result["errors"]`` lists the evaluations
    that failed (one line each, naming the engine), whose latency figures are in the result all the same.

    ``isolate``: measure each engine in its own Python process, one after the other
    (``bench/worker.py``), instead of taking turns in this one. Several ONNX Runtime sessions in one
    process slow each other down on a small CPU even when they take turns (measured on 2 cores: up to
    1.9x), so isolated figures are the ones to compare there; turns in one process protect better against
    drift on a machine whose load changes. ``input_size`` (H, W): for an ONNX file without qdetr metadata
    whose input has no fixed size."""
    if not paths:
        raise QDetrError("no engines given")
    if (images_dir is None) != (ann_file is None):
        raise QDetrError("--images and --ann go together (or leave both out for latency on random input)")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise QDetrError("image folder not found", images_dir)
    items = select_images(ann_file, images_dir, max_images) if images_dir is not None else None
    args = {"images_dir": str(images_dir) if images_dir is not None else None,
            "ann_file": str(ann_file) if ann_file is not None else None, "batch": batch, "warmup": warmup,
            "iters": iters, "max_images": max_images, "score_threshold": score_threshold, "topk": topk,
            "input_size": list(input_size) if input_size else None}
    with MachineLoad() as load:
        if isolate and len(paths) > 1:
            result, detections = _isolated([str(p) for p in paths], args, progress)
        else:
            result, detections = measure_engines([str(p) for p in paths], progress=progress, **args)
    result["config"]["isolated"] = bool(isolate and len(paths) > 1)
    result["config"]["machine_load"] = load.as_dict()
    warning = load.warning()
    result["config"]["machine_load"]["warning"] = warning
    if warning:
        log.warning(warning)
    for row in result["engines"]:
        for note in row.get("notes", []):
            log.warning("%s: %s", row["name"], note)
    if items is not None:
        evaluate_engines(result, detections, str(ann_file), [i for i, _ in items])
    if report_dir is not None:
        from qdetr_deploy.bench.report import write_reports

        result["report_files"] = write_reports(result, report_dir, detections)
    return result


def evaluate_engines(result: dict, detections: dict[str, list], ann_file: str, image_ids: list[int]) -> None:
    """COCO evaluation of each engine's detections into its row; a failure is that row's ``coco_error``
    and a line of ``result["errors"]`` (the latency figures stay)."""
    result["errors"] = []
    for row in result["engines"]:
        row["coco"] = None
        if row["name"] not in detections:
            continue  # outputs bench cannot read as detections: said in the row's notes
        try:
            row["coco"] = evaluate_coco(ann_file, detections[row["name"]], image_ids, name=row["name"])
        except QDetrError as e:
            row["coco_error"] = f"COCO evaluation of {row['name']} failed: {e}"
            result["errors"].append(row["coco_error"])


def measure_engines(paths: list[str], images_dir: str | None, ann_file: str | None, batch: int, warmup: int,
                    iters: int, max_images: int | None, progress: bool, score_threshold: float = 0.0,
                    topk: int = 100, input_size: list[int] | None = None) -> tuple[dict, dict[str, list]]:
    """The measurements of :func:`bench_engines` in this process: (result, detections per engine name;
    only the engines whose outputs are detections). No COCO evaluation here (``bench_engines`` does it)."""
    engines = [open_engine(p, input_size=input_size) for p in paths]
    names = _names(engines)
    runs = [run_batch_for(e, batch) for e in engines]
    rows = [_engine_info(e, n, rb) for e, n, rb in zip(engines, names, runs)]
    items = select_images(ann_file, images_dir, max_images) if images_dir is not None else None
    detections: dict[str, list] = {}
    if items is None:
        eng_times = _random_phase(engines, names, runs, batch, warmup, iters, progress)
        e2e_times: dict[str, list[float]] = {}
    else:
        e2e_times, detections, kept = _image_phase(engines, names, runs, items, batch, warmup, progress)
        detections = {n: detections[n] for e, n in zip(engines, names)
                      if e.metadata.get("outputs_recognised", True)}
        runners = {n: (lambda i, e=e, n=n: e.run(kept[n][i % len(kept[n])])) for e, n in zip(engines, names)}
        with _bar(iters * len(engines), "engine only", progress) as bar:
            eng_times = interleaved(runners, 0, iters, bar, block=BLOCK)
    for e, n, row in zip(engines, names, rows):
        row["engine_latency"] = latency_stats(eng_times[n], batch)
        row["engine_latencies_ms"] = [t * 1e3 for t in eng_times[n]]
        row["e2e_latency"] = latency_stats(e2e_times[n], batch) if n in e2e_times else None
        row["e2e_latencies_ms"] = [t * 1e3 for t in e2e_times.get(n, [])]
        row["memory"] = memory_snapshot(e)
        row["coco"] = None
    _add_ratios(rows)
    result = {
        "format": "qdetr-bench/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "images" if items else "random",
        "config": {"batch": batch, "warmup": warmup, "iters": iters, "max_images": max_images,
                   "images_dir": images_dir, "ann_file": ann_file, "num_images": len(items or []),
                   "input_size": input_size,
                   "host": {"python": platform.python_version(), "machine": platform.machine(),
                            "cpus": os.cpu_count()}},
        "engines": rows,
    }
    return result, detections


def _isolated(paths: list[str], args: dict, progress: bool) -> tuple[dict, dict[str, list]]:
    """:func:`measure_engines` for one engine at a time, each in a fresh ``bench/worker.py`` process."""
    result: dict | None = None
    rows: list[dict] = []
    detections: dict[str, list] = {}
    for path in tqdm(paths, desc="engines (one process each)", disable=not progress, unit="engine",
                     file=sys.stderr):
        proc = subprocess.run([sys.executable, "-m", "qdetr_deploy.bench.worker"], capture_output=True,
                              text=True, input=json.dumps({"paths": [path], "progress": False, **args}))
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
            if proc.returncode == 2:  # the worker's one-line user error, which names its file
                raise QDetrError(lines[-1])
            raise QDetrError(f"benchmark process failed: {lines[-1]}", path)
        out = json.loads(proc.stdout)
        row = out["result"]["engines"][0]
        base, k = row["name"], 1
        while row["name"] in {r["name"] for r in rows}:  # the same file name twice
            row["name"], k = f"{base}#{k}", k + 1
        if base in out["detections"]:
            detections[row["name"]] = out["detections"][base]
        rows.append(row)
        result = result or out["result"]
    assert result is not None
    _add_ratios(rows)
    result["engines"] = rows
    return result, detections
