"""Parity check of an exported model: ONNX checker, an ONNX Runtime session, and the same images through
PyTorch fake-quant and ONNX Runtime, compared two ways on the same batches.

End to end: PyTorch and ONNX Runtime each run the whole network on their own codes. Compared: class
probabilities (softmax of the logits, no-object included) and normalised boxes (cx,cy,w,h), taken from the
graph's internal head outputs and from its final outputs (post-processed boxes are divided by the canvas
size), and the integer codes of every activation quantizer: in ONNX the QuantizeLinear outputs (or the Clip
of a float fake-quant subgraph) are exposed as extra outputs of a copy of the model; in PyTorch forward
hooks on each ActQuantizer compute ``lsq.act_codes``. PyTorch and ONNX Runtime sum floats in different
orders, so now and then a quantizer input lands within an ulp of a rounding boundary and gets the
neighbouring code; at 4 bits that one flip changes every later layer's input and the end-to-end figures
cannot tell the cascade from a folding error.

Per layer ("teacher forced"): PyTorch runs again with every ActQuantizer's output replaced by ONNX
Runtime's codes for it, dequantized exactly as ``lsq.fake_quant_act`` does (``(c - z) * a``; bit-identical
to the fake-quant output wherever the codes agree), while its own codes are still computed from the
quantizer's input. Every layer is then compared given the same quantized inputs, so a flip cannot cascade
and float-only paths (LayerNorm, residual streams, heads) differ by float rounding alone; compared are the
same probabilities and boxes (those of the probe copy, whose codes were forced) and every quantizer's codes,
each quantizer on its own (a folding error shows as codes that disagree right after the broken layer).
The deployed graph's own outputs, which ONNX Runtime may run through fused integer kernels, enter the
end-to-end figures only.

Pass criterion: ``criterion="layer"`` (default) needs the ONNX checker, the TensorRT lint when run and the
per-layer bars; ``"end-to-end"`` needs the end-to-end bars as well.
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
from qdetr_deploy.export.trt_lint import DEFAULT_TRT_VERSION, LintViolation, lint_tensorrt
from qdetr_deploy.quant.api import act_quantizers
from qdetr_deploy.quant.lsq import act_codes, positive_step

ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
CRITERIA = ("layer", "end-to-end")
#: a per-layer disagreement is a float-rounding tie when the codes are one apart and PyTorch's input is
#: within this fraction of a quantizer step from a rounding boundary (CheckReport.layer_ties)
TIE_STEPS = 1e-3


@dataclass
class CheckReport:
    """Outcome of :func:`check_onnx`; ``passed`` when every bar of ``criterion`` holds.

    End to end (each side on its own codes): ``max_prob_diff``, ``max_box_diff``, ``label_agreement``,
    ``codes_equal`` of ``codes_compared``, ``worst_quantizers``, ``first_mismatch``. Per layer (PyTorch's
    quantizer outputs replaced by ONNX Runtime's codes): the ``layer_`` fields, over the same codes;
    ``layer_mismatches`` lists (quantizer, codes equal, codes) of every quantizer with a differing code, in
    graph order. The per-layer code bar holds for each quantizer on its own (a folding error in one small
    layer must not hide in the total). ``layer_ties``: per quantizer, how many of its per-layer
    disagreements are float-rounding ties: codes one apart where PyTorch's input lies within
    :data:`TIE_STEPS` of a step from a rounding boundary (a sum taken in another order lands on the other
    side); they count as agreeing for the bar, so that one tie in a small quantizer whose input does not
    depend on the image (DETR's first decoder layer) cannot fail the check, while an export error (codes
    off anywhere else) still does.
    """

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
    criterion: str = "layer"
    layer_prob_diff: float = 0.0
    layer_box_diff: float = 0.0
    layer_label_agreement: float = 1.0
    layer_codes_equal: int = 0
    layer_first_mismatch: tuple[str, int, int] | None = None
    layer_mismatches: list[tuple[str, int, int]] = field(default_factory=list)
    layer_ties: dict[str, int] = field(default_factory=dict)

    @property
    def code_agreement(self) -> float:
        return self.codes_equal / self.codes_compared if self.codes_compared else 1.0

    @property
    def layer_code_agreement(self) -> float:
        return self.layer_codes_equal / self.codes_compared if self.codes_compared else 1.0

    @property
    def layer_worst_quantizers(self) -> list[tuple[str, float]]:
        """(quantizer, per-layer code agreement), worst first, at most 10 (only quantizers with a flip)."""
        return sorted(((n, e / t) for n, e, t in self.layer_mismatches), key=lambda r: r[1])[:10]

    @property
    def layer_failing_quantizers(self) -> list[tuple[str, int, int]]:
        """Quantizers whose per-layer code agreement is below ``min_code_agreement``, in graph order."""
        return [(n, e, t) for n, e, t in self.layer_mismatches
                if e + self.layer_ties.get(n, 0) < self.min_code_agreement * t]

    @property
    def end_to_end_ok(self) -> bool:
        """The end-to-end figures are within the bars (a criterion only with ``criterion="end-to-end"``)."""
        return (self.max_prob_diff <= self.tolerance and self.max_box_diff <= self.tolerance
                and self.code_agreement >= self.min_code_agreement)

    @property
    def layer_ok(self) -> bool:
        """The per-layer figures are within the bars."""
        return (self.layer_prob_diff <= self.tolerance and self.layer_box_diff <= self.tolerance
                and not self.layer_failing_quantizers)

    def table(self) -> str:
        """A short human-readable table: end-to-end rows, then per-layer rows."""
        ok = lambda good: "ok" if good else "FAIL"  # noqa: E731
        e2e_mark = ok if self.criterion == "end-to-end" else (lambda good: "ok" if good else "over")
        tol = f"(tol {self.tolerance:g})"
        codes = lambda agree: (f"{100 * agree:.4f}% of {self.codes_compared} "  # noqa: E731
                               f"(min {100 * self.min_code_agreement:g}%)")
        rows = [
            ("onnx.checker (full_check)", "passed" if self.checker_ok else self.checker_error,
             ok(self.checker_ok)),
            ("end to end: max |prob diff|", f"{self.max_prob_diff:.3g} {tol}",
             e2e_mark(self.max_prob_diff <= self.tolerance)),
            ("end to end: max |box diff| (normalised)", f"{self.max_box_diff:.3g} {tol}",
             e2e_mark(self.max_box_diff <= self.tolerance)),
            ("end to end: labels equal", f"{100 * self.label_agreement:.2f}%", ""),
            ("end to end: integer codes equal", codes(self.code_agreement),
             e2e_mark(self.code_agreement >= self.min_code_agreement)),
            ("per layer: max |prob diff|", f"{self.layer_prob_diff:.3g} {tol}",
             ok(self.layer_prob_diff <= self.tolerance)),
            ("per layer: max |box diff| (normalised)", f"{self.layer_box_diff:.3g} {tol}",
             ok(self.layer_box_diff <= self.tolerance)),
            ("per layer: labels equal", f"{100 * self.layer_label_agreement:.2f}%", ""),
            ("per layer: integer codes equal", f"{100 * self.layer_code_agreement:.4f}% of "
             f"{self.codes_compared} (min {100 * self.min_code_agreement:g}% in every quantizer)",
             ok(not self.layer_failing_quantizers)),
        ]
        if self.lint is not None:
            rows.append(("TensorRT lint", f"{len(self.lint)} violations", ok(not self.lint)))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value}  {mark}".rstrip() for name, value, mark in rows]
        lines += [f"  lint {v.node}: {v.rule}: {v.message}" for v in (self.lint or [])[:20]]
        if self.first_mismatch is not None:
            name, eq, total = self.first_mismatch
            lines.append(f"  end to end: first disagreement {name}: {total - eq} of {total} codes "
                         "(later ones may be its cascade)")
        lines += [f"  end to end: worst codes {n}: {100 * a:.3f}%" for n, a in self.worst_quantizers
                  if a < 1.0][:5]
        if self.layer_first_mismatch is not None:
            name, eq, total = self.layer_first_mismatch
            lines.append(f"  per layer: first disagreement {name}: {total - eq} of {total} codes")
        counts = {n: (e, t) for n, e, t in self.layer_mismatches}
        for n, a in self.layer_worst_quantizers[:5]:
            e, t = counts[n]
            lines.append(f"  per layer: worst codes {n}: {100 * a:.4f}% ({t - e} of {t} differ)")
        ties = sum(self.layer_ties.values())
        if ties:
            differ = self.codes_compared - self.layer_codes_equal
            lines.append(f"  per layer: {ties} of the {differ} differing codes are float-rounding ties "
                         f"(codes one apart, input within {TIE_STEPS:g} of a step from a rounding boundary)")
        if self.criterion == "layer" and self.passed and not self.end_to_end_ok:
            lines.append(self._cascade_line())
        criterion = "per layer" if self.criterion == "layer" else "end to end and per layer"
        lines.append(f"parity check {'PASSED' if self.passed else 'FAILED'} on {self.n_images} images "
                     f"(criterion: {criterion})")
        return "\n".join(lines)

    def _cascade_line(self) -> str:
        flips = self.codes_compared - self.layer_codes_equal
        if self.first_mismatch is None:
            return ("end to end: float rounding differences grow downstream; every layer matches given the "
                    "same inputs")
        name, eq, total = self.first_mismatch
        return (f"end to end: {flips} code flip{'s' if flips != 1 else ''} from float rounding cascade "
                f"downstream (first: {name}, {total - eq} of {total} codes); every layer matches given the "
                "same inputs")


def random_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic normalised-looking images [n,3,H,W] float32 (standard normal)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, int(size[0]), int(size[1]), generator=g).numpy()


class _Tally:
    """Running maxima and counts of one comparison (end to end or per layer)."""

    def __init__(self) -> None:
        self.prob = self.box = 0.0
        self.labels_equal = self.labels_total = self.codes_equal = self.codes_total = 0
        self.per_q: dict[str, list[int]] = {}
        self.ties: dict[str, int] = {}

    def add(self, out: dict, pout: dict, records: dict, ref: dict, size: tuple[int, int]) -> None:
        for (prob, ref_p), (box, ref_b) in _heads(out, pout, records, ref, size):
            self.prob = max(self.prob, float(np.abs(prob - ref_p).max()))
            self.box = max(self.box, float(np.abs(box - ref_b).max()))
        if "labels" in out:
            self.labels_equal += int((out["labels"] == _ref_labels(ref["prob"], records, out)).sum())
            self.labels_total += out["labels"].size
        for rec in records["acts"]:
            name = rec["module"]
            eq, total = _compare_codes(pout[f"probe/{name}"], ref["codes"].get(name), rec)
            if eq != total and name in ref.get("ties", {}):
                tied = _count_ties(pout[f"probe/{name}"], ref["codes"][name], ref["ties"][name], rec)
                self.ties[name] = self.ties.get(name, 0) + tied
            counts = self.per_q.setdefault(rec["module"], [0, 0])
            counts[0] += eq
            counts[1] += total
            self.codes_equal, self.codes_total = self.codes_equal + eq, self.codes_total + total

    @property
    def label_agreement(self) -> float:
        return self.labels_equal / self.labels_total if self.labels_total else 1.0

    def worst(self) -> list[tuple[str, float]]:
        return sorted(((n, e / t if t else 1.0) for n, (e, t) in self.per_q.items()), key=lambda r: r[1])[:10]

    def mismatches(self) -> list[tuple[str, int, int]]:
        return [(n, e, t) for n, (e, t) in self.per_q.items() if e != t]  # records are in graph order

    def first(self) -> tuple[str, int, int] | None:
        return next(iter(self.mismatches()), None)


def check_onnx(onnx_path: str | os.PathLike, model: nn.Module, images: np.ndarray | None = None, *,
               tolerance: float = 1e-4, min_code_agreement: float = 0.999, lint: bool | None = None,
               threads: int | None = None, criterion: str = "layer", trt_version: str = DEFAULT_TRT_VERSION,
               compute_capability: tuple[int, int] | None = None) -> CheckReport:
    """Check ``onnx_path`` (written by export_onnx) against ``model`` (the checkpoint's model, run in eval).

    ``images``: float32 [N,3,H,W] on the canvas (None: 2 batches of deterministic random images).
    ``lint``: run the TensorRT lint (default: when the model's target is tensorrt) for ``trt_version`` (on a
    GPU of ``compute_capability``, when given).
    ``criterion``: "layer" passes on the onnx checker, the lint when run, and the per-layer (teacher-forced)
    figures: probabilities and boxes within ``tolerance``, codes agreeing >= ``min_code_agreement``;
    "end-to-end" also requires the same bars of the end-to-end figures.
    """
    if criterion not in CRITERIA:
        raise QDetrError(f"unknown check criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
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
    model = as_exported(model, records).eval()
    e2e, layer = _Tally(), _Tally()
    for start in range(0, len(images), batch):  # one batch at a time: the codes of a batch can be large
        x = images[start:start + batch]
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))
        pout = dict(zip([o.name for o in probe.get_outputs()], probe.run(None, {"images": x})))
        own = _hooked_forward(model, x, {}, None, records.get("scoring", "softmax"))  # fake quant
        e2e.add(out, pout, records, own, (H, W))
        onnx_codes = {rec["module"]: pout[f"probe/{rec['module']}"] for rec in records["acts"]}
        # the probe copy's own final outputs: the forced codes are that session's, whose kernels may differ
        layer.add(pout, pout, records, forced_forward(model, x, onnx_codes, records), (H, W))
    do_lint = lint if lint is not None else records["target"] == "tensorrt"
    lint_found = lint_tensorrt(proto, trt_version, compute_capability) if do_lint else None
    report = CheckReport(False, checker_ok, checker_error, len(images), e2e.prob, e2e.box,
                         e2e.label_agreement, e2e.codes_total, e2e.codes_equal, tolerance,
                         min_code_agreement, e2e.worst(), e2e.first(), lint_found, criterion=criterion,
                         layer_prob_diff=layer.prob, layer_box_diff=layer.box,
                         layer_label_agreement=layer.label_agreement, layer_codes_equal=layer.codes_equal,
                         layer_first_mismatch=layer.first(), layer_mismatches=layer.mismatches(),
                         layer_ties=layer.ties)
    report.failures = _failures(report)
    report.passed = not report.failures
    return report


def _failures(r: CheckReport) -> list[str]:
    fails = []
    if not r.checker_ok:
        fails.append(f"onnx.checker: {r.checker_error}")
    if r.layer_prob_diff > r.tolerance:
        fails.append(f"per layer: class probabilities differ by {r.layer_prob_diff:.3g} > {r.tolerance:g}")
    if r.layer_box_diff > r.tolerance:
        fails.append(f"per layer: boxes differ by {r.layer_box_diff:.3g} > {r.tolerance:g}")
    failing = r.layer_failing_quantizers
    if failing:
        name, eq, total = failing[0]
        more = len(failing) - 1
        more = f" (and {more} more quantizer{'s' if more > 1 else ''})" if more else ""
        fails.append(f"per layer: only {100 * eq / total:.3f}% of the integer codes of {name} agree "
                     f"({total - eq} of {total} differ){more}")
    if r.criterion == "end-to-end":
        if r.max_prob_diff > r.tolerance:
            fails.append(f"end to end: class probabilities differ by {r.max_prob_diff:.3g} > {r.tolerance:g}")
        if r.max_box_diff > r.tolerance:
            fails.append(f"end to end: boxes differ by {r.max_box_diff:.3g} > {r.tolerance:g}")
        if r.code_agreement < r.min_code_agreement:
            fails.append(f"end to end: only {100 * r.code_agreement:.3f}% of integer codes agree")
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
    for key, tensor in records["tensors"].items():
        if tensor not in existing:
            dtype = TensorProto.INT64 if key == "topk_index" else TensorProto.FLOAT
            graph.output.append(helper.make_tensor_value_info(tensor, dtype, None))
    return probe


def _heads(out: dict, pout: dict, records: dict, ref: dict, size: tuple[int, int]):
    """((probabilities, reference), (normalised cxcywh boxes, reference)) from the probe copy's head tensors
    and from the deployed graph's outputs (scores: the max probability over real classes, or with sigmoid
    top-k post-processing the probabilities the graph's top-k picked)."""
    tensors = records["tensors"]
    prob, box = ref["prob"], ref["boxes"]
    logits = pout[tensors.get("pred_logits", "pred_logits")]
    score = _sigmoid if records.get("scoring") == "sigmoid" else _softmax
    yield (score(logits), prob), (pout[tensors.get("pred_boxes", "pred_boxes")], box)
    if "scores" not in out:
        yield (score(out["pred_logits"]), prob), (out["pred_boxes"], box)
    elif "topk_index" in tensors:
        # the probe copy's picks (its top-k index), each against the reference at the same flat index; the
        # deployed graph's sorted scores against the reference's top-k, and its boxes against the probe's
        index = pout[tensors["topk_index"]]
        flat = prob.reshape(len(prob), -1)
        query = (index // prob.shape[-1])[..., None].repeat(4, -1)
        yield ((pout["scores"], np.take_along_axis(flat, index, 1)),
               (_cxcywh(pout["boxes"], size), np.take_along_axis(box, query, 1)))
        top = -np.sort(-flat, axis=1)[:, :index.shape[1]]
        yield (out["scores"], top), (_cxcywh(out["boxes"], size), _cxcywh(pout["boxes"], size))
    else:
        yield (out["scores"], prob[..., :-1].max(-1)), (_cxcywh(out["boxes"], size), box)


def _cxcywh(xyxy_pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Post-processed boxes (xyxy in canvas pixels) -> normalised cx,cy,w,h."""
    H, W = size
    xyxy = xyxy_pixels / np.array([W, H, W, H], np.float32)
    cxcy, wh = (xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]
    return np.concatenate([cxcy, wh], -1)


def _ref_labels(prob: np.ndarray, records: dict, out: dict) -> np.ndarray:
    """The reference's labels in the graph's layout: the best real class per query, or the classes of the
    top-k flattened sigmoid scores (ties in index order)."""
    if "topk_index" not in records["tensors"]:
        return prob[..., :-1].argmax(-1)
    order = np.argsort(-prob.reshape(len(prob), -1), axis=1, kind="stable")[:, :out["labels"].shape[1]]
    return order % prob.shape[-1]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@torch.no_grad()
def as_exported(model: nn.Module, records: dict) -> nn.Module:
    """``model``, or a copy with the conv biases the export rounded onto the int32 grid (conv_bias="int32":
    ``records["bias_deltas"]``, the delta added to the ``bias`` of the conv's batch norm or of the conv)."""
    deltas = records.get("bias_deltas") or {}
    if not any(any(entry["delta"]) for entry in deltas.values()):  # none, or all 0 (QuantConfig.conv_bias)
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
def forced_forward(model: nn.Module, images: np.ndarray, onnx_codes: dict[str, np.ndarray], records: dict,
                   *, keep_outputs: bool = False) -> dict:
    """One teacher-forced PyTorch forward of ``images`` (one batch, float32 [B,3,H,W]).

    Every ActQuantizer with an entry in ``onnx_codes`` (module name -> the graph's codes for it, as the probe
    copy outputs them) still computes its own codes from its input, but its output becomes the graph's codes
    dequantized as :func:`~qdetr_deploy.quant.lsq.fake_quant_act` does: ``(c - z) * a`` with ``c`` in
    PyTorch's convention (minus the record's shift, the ``kT`` layout swapped back, broadcast to the input's
    shape), ``z = round(zero_point)`` and ``a = positive_step(alpha)``; bit-identical to the fake-quant output
    where the codes agree. Returns {"prob", "boxes", "codes"} like the end-to-end run, plus "outputs"
    (module -> forced output tensor) when ``keep_outputs``.
    """
    forced = {rec["module"]: (onnx_codes[rec["module"]], rec) for rec in records["acts"]
              if rec["module"] in onnx_codes}
    outputs: dict[str, torch.Tensor] = {}
    res = _hooked_forward(model, images, forced, outputs if keep_outputs else None,
                          records.get("scoring", "softmax"))
    if keep_outputs:
        res["outputs"] = outputs
    return res


@torch.no_grad()
def _hooked_forward(model: nn.Module, images: np.ndarray, forced: dict[str, tuple[np.ndarray, dict]],
                    outputs: dict | None, scoring: str = "softmax") -> dict:
    """``model`` on one batch with hooks on every ActQuantizer: its codes (from its input) are recorded;
    where ``forced`` has the graph's codes, they replace the quantizer's output. ``scoring``: how the
    logits become class probabilities ("softmax", DETR; "sigmoid", SMCA-DETR)."""
    model.eval()
    codes: dict[str, np.ndarray] = {}
    ties: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(mod, inputs, output):
            if mod.observer is not None:
                return None
            x = inputs[0]
            qn, qp = mod.qrange()
            alpha, zero_point = mod._view(mod.alpha, x), mod._view(mod.zero_point, x)
            codes[name] = act_codes(x, alpha, zero_point, qn, qp).to(torch.int64).numpy()
            if name in forced:  # where a sum in another order may land on the other side of a boundary
                v = x / positive_step(alpha)
                ties[name] = ((v - torch.floor(v) - 0.5).abs() <= TIE_STEPS).numpy()
                graph_codes, rec = forced[name]
                c = _to_torch_codes(graph_codes, rec, tuple(x.shape))
                q = torch.from_numpy(np.array(c)).to(output.dtype)
                z, a = torch.round(zero_point), positive_step(alpha)  # as fake_quant_act, same order
                output = (q - z) * a
            if outputs is not None:
                outputs[name] = output
            return output
        return fn

    handles = [q.register_forward_hook(hook(n)) for n, q in act_quantizers(model)]
    try:
        res = model(torch.from_numpy(np.ascontiguousarray(images, np.float32)))
    finally:
        for h in handles:
            h.remove()
    logits = res["pred_logits"]
    prob = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    return {"prob": prob.numpy(), "boxes": res["pred_boxes"].numpy(), "codes": codes, "ties": ties}


def _to_torch_codes(onnx_codes: np.ndarray, rec: dict, shape: tuple[int, ...]) -> np.ndarray:
    """The graph's codes of quantizer ``rec`` in PyTorch's convention: minus the dtype shift, the ``kT``
    layout swapped back (``seq``: the sequence [hw,B,C] back to [B,C,h,w]), broadcast to ``shape`` (PyTorch's
    input shape; int64, possibly a broadcast view)."""
    shift = np.asarray(rec["shift"], np.int64)
    if rec["axis"] is not None and shift.size > 1:
        shift_shape = [1] * onnx_codes.ndim
        shift_shape[rec["axis"]] = -1
        shift = shift.reshape(shift_shape)
    c = onnx_codes.astype(np.int64) - shift
    if rec["layout"] == "kT":
        c = np.swapaxes(c, -1, -2)
    elif rec["layout"] == "seq":  # [hw,B,C] on the graph, [B,C,h,w] in PyTorch
        c = np.transpose(c, (1, 2, 0)).reshape(shape)
    return np.broadcast_to(c, shape)


def _count_ties(onnx_codes: np.ndarray, torch_codes: np.ndarray, ties: np.ndarray, rec: dict) -> int:
    """Disagreements between graph and PyTorch codes that are float-rounding ties (``CheckReport``)."""
    c = _to_torch_codes(onnx_codes, rec, torch_codes.shape)
    return int(((np.abs(c - torch_codes) == 1) & ties).sum())


def _compare_codes(onnx_codes: np.ndarray, torch_codes: np.ndarray | None, rec: dict) -> tuple[int, int]:
    """(equal, compared) between graph codes (minus the dtype shift) and PyTorch's."""
    if torch_codes is None:
        return 0, int(onnx_codes.size)
    c = _to_torch_codes(onnx_codes, rec, torch_codes.shape)
    return int((c == torch_codes).sum()), int(torch_codes.size)
