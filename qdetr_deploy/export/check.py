"""Parity check of an exported model: ONNX checker, an ONNX Runtime session, and the same images through
PyTorch fake-quant and ONNX Runtime.

Compared: class probabilities (softmax of the logits, no-object included) and normalised boxes
(cx,cy,w,h), taken from the graph's internal head outputs and from its final outputs (post-processed
boxes are divided by the canvas size), and the integer codes of every activation quantizer: in ONNX the
QuantizeLinear outputs (or the Clip of a float fake-quant subgraph) are exposed as extra outputs of a
copy of the model; in PyTorch forward hooks on each ActQuantizer compute ``lsq.act_codes``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.onnx_export import QUANTIZERS_KEY
from qdetr_deploy.export.trt_lint import LintViolation, lint_tensorrt
from qdetr_deploy.quant.api import act_quantizers
from qdetr_deploy.quant.lsq import act_codes

ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


@dataclass
class CheckReport:
    """Outcome of :func:`check_onnx`; ``passed`` when every criterion holds."""

    passed: bool
    checker_ok: bool
    checker_error: str
    n_images: int
    max_prob_diff: float
    max_box_diff: float
    label_agreement: float
    codes_compared: int
    codes_equal: int
    tolerance: float
    min_code_agreement: float
    worst_quantizers: list[tuple[str, float]] = field(default_factory=list)
    first_mismatch: tuple[str, int, int] | None = None  # (quantizer, codes equal, codes) first in graph order
    lint: list[LintViolation] | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def code_agreement(self) -> float:
        return self.codes_equal / self.codes_compared if self.codes_compared else 1.0

    def table(self) -> str:
        """A short human-readable table."""
        ok = lambda good: "ok" if good else "FAIL"  # noqa: E731
        rows = [
            ("onnx.checker (full_check)", "passed" if self.checker_ok else self.checker_error,
             ok(self.checker_ok)),
            ("max |prob diff|", f"{self.max_prob_diff:.3g} (tol {self.tolerance:g})",
             ok(self.max_prob_diff <= self.tolerance)),
            ("max |box diff| (normalised)", f"{self.max_box_diff:.3g} (tol {self.tolerance:g})",
             ok(self.max_box_diff <= self.tolerance)),
            ("labels equal", f"{100 * self.label_agreement:.2f}%", ""),
            ("integer codes equal", f"{100 * self.code_agreement:.4f}% of {self.codes_compared} "
             f"(min {100 * self.min_code_agreement:g}%)", ok(self.code_agreement >= self.min_code_agreement)),
        ]
        if self.lint is not None:
            rows.append(("TensorRT lint", f"{len(self.lint)} violations", ok(not self.lint)))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value}  {mark}".rstrip() for name, value, mark in rows]
        lines += [f"  lint {v.node}: {v.rule}: {v.message}" for v in (self.lint or [])[:20]]
        if self.first_mismatch is not None:
            name, eq, total = self.first_mismatch
            lines.append(f"  first disagreement {name}: {total - eq} of {total} codes (later ones may be its "
                         "cascade: a value within float rounding of a code boundary)")
        lines += [f"  worst codes {n}: {100 * a:.3f}%" for n, a in self.worst_quantizers if a < 1.0][:5]
        lines.append(f"parity check {'PASSED' if self.passed else 'FAILED'} on {self.n_images} images")
        return "\n".join(lines)


def random_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic normalised-looking images [n,3,H,W] float32 (standard normal)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, int(size[0]), int(size[1]), generator=g).numpy()


def check_onnx(onnx_path: str | os.PathLike, model: nn.Module, images: np.ndarray | None = None, *,
               tolerance: float = 1e-4, min_code_agreement: float = 0.999, lint: bool | None = None,
               threads: int | None = None) -> CheckReport:
    """Check ``onnx_path`` (written by export_onnx) against ``model`` (the checkpoint's model, run in eval).

    ``images``: float32 [N,3,H,W] on the canvas (None: 2 batches of deterministic random images).
    ``lint``: run the TensorRT lint (default: when the model's target is tensorrt).
    """
    path = Path(onnx_path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    if QUANTIZERS_KEY not in props:
        raise QDetrError("not written by qdetr-deploy export (no quantizer records)", path)
    records = json.loads(props[QUANTIZERS_KEY])
    checker_ok, checker_error = _run_checker(path)
    dims = [d.dim_value or None for d in proto.graph.input[0].type.tensor_type.shape.dim]
    batch, (H, W) = dims[0] or 2, dims[2:]
    if images is None:
        images = random_images(2 * batch, (H, W))
    images = np.ascontiguousarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (3, H, W):
        raise QDetrError(f"check images have shape {list(images.shape)}, the model takes [B,3,{H},{W}]", path)
    if len(images) % batch:  # whole (static) batches: repeat images to fill the last one
        images = np.resize(images, (-(-len(images) // batch) * batch, *images.shape[1:]))
    session = _session(proto.SerializeToString(), threads)
    probe = _session(_with_probes(proto, records).SerializeToString(), threads)
    torch_out = _torch_run(as_exported(model, records), images, batch)
    prob_diff = box_diff = 0.0
    labels_equal = labels_total = 0
    codes_equal, codes_total = 0, 0
    per_q: dict[str, list[int]] = {}
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        ref = torch_out[start // batch]
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
        pout = dict(zip([o.name for o in probe.get_outputs()], probe.run(None, {"images": x})))
        for (prob, ref_p), (box, ref_b) in _heads(out, pout, records, ref, (H, W)):
            prob_diff = max(prob_diff, float(np.abs(prob - ref_p).max()))
            box_diff = max(box_diff, float(np.abs(box - ref_b).max()))
        if "labels" in out:
            labels_equal += int((out["labels"] == ref["prob"][..., :-1].argmax(-1)).sum())
            labels_total += out["labels"].size
        for rec in records["acts"]:
            eq, total = _compare_codes(pout[f"probe/{rec['module']}"], ref["codes"].get(rec["module"]), rec)
            per_q.setdefault(rec["module"], [0, 0])
            per_q[rec["module"]][0] += eq
            per_q[rec["module"]][1] += total
            codes_equal, codes_total = codes_equal + eq, codes_total + total
    do_lint = lint if lint is not None else records["target"] == "tensorrt"
    worst = sorted(((n, e / t if t else 1.0) for n, (e, t) in per_q.items()), key=lambda r: r[1])[:10]
    first = next(((n, e, t) for n, (e, t) in per_q.items() if e != t), None)  # records are in graph order
    report = CheckReport(False, checker_ok, checker_error, len(images), prob_diff, box_diff,
                         labels_equal / labels_total if labels_total else 1.0, codes_total, codes_equal,
                         tolerance, min_code_agreement, worst, first,
                         lint_tensorrt(proto) if do_lint else None)
    report.failures = _failures(report)
    report.passed = not report.failures
    return report


def _failures(r: CheckReport) -> list[str]:
    fails = []
    if not r.checker_ok:
        fails.append(f"onnx.checker: {r.checker_error}")
    if r.max_prob_diff > r.tolerance:
        fails.append(f"class probabilities differ by {r.max_prob_diff:.3g} > {r.tolerance:g}")
    if r.max_box_diff > r.tolerance:
        fails.append(f"boxes differ by {r.max_box_diff:.3g} > {r.tolerance:g}")
    if r.code_agreement < r.min_code_agreement:
        fails.append(f"only {100 * r.code_agreement:.3f}% of integer codes agree")
    if r.lint:
        fails.append(f"{len(r.lint)} TensorRT lint violations")
    return fails


def _run_checker(path: Path) -> tuple[bool, str]:
    """onnx.checker with full_check (strict shape inference included); the path form handles > 2 GB."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True, ""
    except Exception as e:  # onnx raises several unrelated exception types
        return False, " ".join(str(e).split())[:200]


def _session(model_bytes: bytes, threads: int | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared machines: no busy-waiting
    so.log_severity_level = 3
    # ONNX Runtime turns "DequantizeLinear weight -> MatMul" with a float activation into MatMulNBits and, by
    # default (accuracy level 4), quantizes that activation to int8 on the fly: not the ONNX semantics.
    so.add_session_config_entry(ACCURACY_KEY, "0")
    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def _with_probes(proto: onnx.ModelProto, records: dict) -> onnx.ModelProto:
    """A copy of the model with every quantizer's codes (as INT32) and the head tensors as extra outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    graph = probe.graph
    for rec in records["acts"]:
        name = f"probe/{rec['module']}"
        graph.node.append(helper.make_node("Cast", [rec["codes"]], [name], name=f"{name}/Cast",
                                           to=TensorProto.INT32))
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT32, None))
    existing = {o.name for o in graph.output}
    for tensor in records["tensors"].values():
        if tensor not in existing:
            graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    return probe


def _heads(out: dict, pout: dict, records: dict, ref: dict, size: tuple[int, int]):
    """((probabilities, reference), (normalised cxcywh boxes, reference)) from the probe copy's head tensors
    and from the deployed graph's outputs (scores are the max probability over real classes)."""
    tensors = records["tensors"]
    prob, box = ref["prob"], ref["boxes"]
    logits = pout[tensors.get("pred_logits", "pred_logits")]
    yield (_softmax(logits), prob), (pout[tensors.get("pred_boxes", "pred_boxes")], box)
    if "scores" in out:
        H, W = size
        xyxy = out["boxes"] / np.array([W, H, W, H], np.float32)
        cxcy, wh = (xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]
        yield (out["scores"], prob[..., :-1].max(-1)), (np.concatenate([cxcy, wh], -1), box)
    else:
        yield (_softmax(out["pred_logits"]), prob), (out["pred_boxes"], box)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@torch.no_grad()
def as_exported(model: nn.Module, records: dict) -> nn.Module:
    """``model``, or a copy with the conv biases the export rounded onto the int32 grid (conv_bias="int32":
    ``records["bias_deltas"]``, the delta added to the ``bias`` of the conv's batch norm or of the conv)."""
    deltas = records.get("bias_deltas") or {}
    if not deltas:
        return model
    model = copy.deepcopy(model)
    for entry in deltas.values():
        module = model.get_submodule(entry["module"])
        delta = torch.tensor(entry["delta"], dtype=torch.float64)
        if getattr(module, "bias", None) is None:  # a conv without bias: give it one
            module.bias = nn.Parameter(torch.zeros(delta.numel()))
        bias = module.bias
        bias.copy_((bias.double() + delta).to(bias.dtype))
    return model


@torch.no_grad()
def _torch_run(model: nn.Module, images: np.ndarray, batch: int) -> list[dict]:
    """PyTorch fake-quant outputs and the codes of every ActQuantizer, one dict per batch."""
    model.eval()
    codes: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(mod, inputs, _output):
            x = inputs[0]
            qn, qp = mod.qrange()
            c = act_codes(x, mod._view(mod.alpha, x), mod._view(mod.zero_point, x), qn, qp)
            codes[name] = c.to(torch.int64).numpy()
        return fn

    handles = [q.register_forward_hook(hook(n)) for n, q in act_quantizers(model)]
    outs = []
    try:
        for start in range(0, len(images), batch):
            codes = {}
            res = model(torch.from_numpy(images[start:start + batch]))
            outs.append({"prob": res["pred_logits"].softmax(-1).numpy(), "boxes": res["pred_boxes"].numpy(),
                         "codes": codes})
    finally:
        for h in handles:
            h.remove()
    return outs


def _compare_codes(onnx_codes: np.ndarray, torch_codes: np.ndarray | None, rec: dict) -> tuple[int, int]:
    """(equal, compared) between graph codes (minus the dtype shift) and PyTorch's."""
    if torch_codes is None:
        return 0, int(onnx_codes.size)
    shift = np.asarray(rec["shift"], np.int64)
    if rec["axis"] is not None and shift.size > 1:
        shape = [1] * onnx_codes.ndim
        shape[rec["axis"]] = -1
        shift = shift.reshape(shape)
    c = onnx_codes.astype(np.int64) - shift
    if rec["layout"] == "kT":
        c = np.swapaxes(c, -1, -2)
    c = np.broadcast_to(c, torch_codes.shape)
    return int((c == torch_codes).sum()), int(torch_codes.size)
