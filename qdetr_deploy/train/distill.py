"""Q-DETR training: a quantized student learns from ground truth and from a frozen full-precision teacher.

Objective (QDETR_METHOD.md §3): ``L = L_GT + lambda * L_DRD``. ``L_GT`` is DETR's set loss (Hungarian
matching, CE with no-object weight 0.1, L1 5, GIoU 2, auxiliary losses on every decoder layer). ``L_DRD``:
per image, FQM keeps the student queries whose GIoU with some ground-truth box exceeds ``tau`` times that
box's best GIoU, pairs each kept query with the teacher query maximising ``2 GIoU - 5 L1`` and distils the
decoder features of the pairs (``train/fqm.py``: ``fqm_match``, ``drd_loss``).

The student is a quantized DETR: a checkpoint written by ``quantize`` (used as is), a float checkpoint
(quantized with ``bits``/``da``), or ``"from-teacher"`` (the teacher's weights, quantized). A freshly
quantized student is calibrated (``quant.calibrate``, LSQ+ rule) on the first ``calib_batches`` training
batches before the first step. The teacher is loaded frozen, in eval mode, and run under ``no_grad``.

Choices where the paper is open (defaults first; each is an option, see also docs/RESULTS.md):
- feature ``hs``: the decoder layer output after the final decoder norm, the feature the class and box
  heads read. ``d``: the method's co-attention output ``D = Qa(A) Qa(v)`` of decoder cross-attention, heads
  merged, *before* the output projection (the input of ``multihead_attn.out_proj``, before its own input
  quantizer), captured by a forward pre-hook: the attention module's outputs do not change. ``cross``: the
  cross-attention module's output (after the output projection, before the residual add and norm).
- matching rule ``argmax`` (the paper): each kept student query takes the teacher query maximising
  ``2 GIoU - 5 L1``. ``role``: each kept student query that the Hungarian matcher of ``L_GT`` assigns to a
  ground truth is paired with the teacher query assigned to the same ground truth (one to one); the others
  are dropped. Every DRD step logs ``drd_pairs`` (kept pairs, last distilled layer) and
  ``drd_role_mismatch`` (the fraction of those pairs whose two queries have different Hungarian roles: another
  object, or an object and "no object"; 0 by construction for ``role``).
- layers ``last``: the last decoder layer only. ``all``: every decoder layer, losses averaged; layer ``i``
  is matched with layer ``i``'s own predicted boxes (student and teacher need the same decoder depth).
  FQM always uses the boxes of the layer being distilled (for ``last`` these are ``pred_boxes``).
- distance ``l2``: the L2 norm of the feature difference per kept pair (the paper's formula), averaged
  over all kept pairs of the batch; ``mse``: the mean squared difference per channel. A batch without kept
  pairs (common early on: a ground truth that no student box overlaps selects nothing) adds exactly 0.
- ablation switches (defaults: both off, see docs/RESULTS.md): ``da="none"`` (``--no-da``) removes
  distribution alignment; ``fqm=False`` (``--no-fqm``) removes the whole DRD term (the paper's "+DA" row
  has no distillation at all), so the LSQ+ baseline is ``da="none", fqm=False`` and the teacher is not
  even run. ``tau=None`` distils every
  query (the paper's "tau = 0" row).
- two-stage (``two_stage``, paper §4): stage 1 quantizes only the backbone (the config's ``fp_modules``
  plus ``transformer.*``), starting from the student's float weights; stage 2 quantizes the whole model,
  starting from stage 1's weights and learned backbone steps (the new transformer quantizers are calibrated
  first). The budget is split: stage 1 gets ``round(stage1_fraction * epochs)`` epochs (and the same
  fraction of ``max_steps``), stage 2 the rest (at least 1 each); ``lr_drop`` epochs are scaled by each
  stage's share. Stage 1 writes to ``output_dir/stage1``, stage 2 to ``output_dir`` (the final student);
  stage 2 reshuffles data with ``seed + 1``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qdetr_deploy.checkpoints import load_checkpoint
from qdetr_deploy.deploy_format import sha256_file
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models import build_detr
from qdetr_deploy.quant import QuantConfig, calibrate, quantize
from qdetr_deploy.quant.config import DA_PLACEMENTS, DEFAULT_FP_MODULES
from qdetr_deploy.train import distributed as D
from qdetr_deploy.train.config import CHECKPOINT_NAME, TrainConfig, TrainResult
from qdetr_deploy.train.criterion import SetCriterion
from qdetr_deploy.train.datasets import Data, check_classes, load_data, train_loader
from qdetr_deploy.train.fqm import (
    DISTANCES,
    MATCH_RULES,
    PAPER_LAMBDA,
    PAPER_TAU,
    drd_loss,
    fqm_pairs,
    query_roles,
    role_mismatches,
)
from qdetr_deploy.train.loop import fit
from qdetr_deploy.train.matcher import HungarianMatcher
from qdetr_deploy.train.recipe import set_criterion
from qdetr_deploy.train.state import read_resume_state, resume_model, seed_all

FROM_TEACHER = "from-teacher"
DRD_FEATURES = ("hs", "d", "cross")
BACKBONE_ONLY = ("transformer.*",)


@dataclass
class DistillConfig:
    """Q-DETR settings on top of :class:`TrainConfig` (see the module docstring for each choice).

    Defaults follow the multi-seed ablation (docs/RESULTS.md): no DA and no DRD term (``fqm=False``), the
    LSQ+ baseline, because neither beat it beyond seed noise at demo scale; ``fqm=True`` and ``da="self"``
    give the paper's Q-DETR.
    ``bits``/``da``: for a student that is quantized here (None: "4-4-8" and no DA, "none");
    a quantized STUDENT checkpoint keeps its own and must not contradict them. ``act_granularity``:
    activation steps per tensor or per channel/head (students quantized here only).
    """

    bits: str | None = None
    da: str | None = None
    fqm: bool = False  # measured: no gain over the LSQ+ baseline (docs/RESULTS.md)
    tau: float | None = PAPER_TAU
    lambda_drd: float = PAPER_LAMBDA
    drd_layers: str = "last"
    drd_feature: str = "hs"
    drd_distance: str = "mse"  # measured: "l2" at lambda 2.5 swamps L_GT (docs/RESULTS.md)
    fqm_match: str = "argmax"
    two_stage: bool = False
    stage1_fraction: float = 0.5
    calib_batches: int = 4
    calib_method: str = "lsq+"
    act_granularity: str = "tensor"

    def __post_init__(self) -> None:
        checks = [
            (self.da is None or self.da in DA_PLACEMENTS, f"da must be one of {list(DA_PLACEMENTS)}"),
            (self.tau is None or 0 <= self.tau < 1, f"tau must be in [0, 1), got {self.tau}"),
            (self.lambda_drd >= 0, f"lambda_drd must be >= 0, got {self.lambda_drd}"),
            (self.drd_layers in ("last", "all"), "drd_layers must be 'last' or 'all'"),
            (self.drd_feature in DRD_FEATURES, f"drd_feature must be one of {list(DRD_FEATURES)}"),
            (self.fqm_match in MATCH_RULES, f"fqm_match must be one of {list(MATCH_RULES)}"),
            (self.drd_distance in DISTANCES, f"drd_distance must be one of {list(DISTANCES)}"),
            (0 < self.stage1_fraction < 1, "stage1_fraction must be in (0, 1)"),
            (self.calib_batches >= 1, "calib_batches must be >= 1"),
            (self.act_granularity in ("tensor", "channel"), "act_granularity must be 'tensor' or 'channel'"),
        ]
        for ok, message in checks:
            if not ok:
                raise QDetrError(message)

    def quant_config(self, backbone_only: bool = False) -> QuantConfig:
        fp = DEFAULT_FP_MODULES + (BACKBONE_ONLY if backbone_only else ())
        return QuantConfig.from_bits(self.bits or "4-4-8", da=self.da or "none", fp_modules=fp,
                                     act_granularity=self.act_granularity)


# -- DRD on captured features --------------------------------------------------------------------------
class DecoderCapture:
    """Hooks on every decoder layer's cross-attention; ``take()`` -> ``[L,B,Q,D]``.

    ``feature="cross"``: the output of ``multihead_attn`` (forward hook); ``"d"``: the input of
    ``multihead_attn.out_proj`` (forward pre-hook), i.e. the merged heads of ``Qa(A) Qa(v)``.
    """

    def __init__(self, model: nn.Module, feature: str) -> None:
        self.active, self.feats = False, []
        layers = model.transformer.decoder.layers
        if feature == "d":
            self.handles = [layer.multihead_attn.out_proj.register_forward_pre_hook(self._pre_hook)
                            for layer in layers]
        else:
            self.handles = [layer.multihead_attn.register_forward_hook(self._hook) for layer in layers]

    def _keep(self, feat: Tensor) -> None:
        if self.active:
            self.feats.append(feat.transpose(0, 1))  # [Q,B,D] -> [B,Q,D]

    def _hook(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._keep(output)

    def _pre_hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._keep(inputs[0])

    def start(self) -> None:
        self.active, self.feats = True, []

    def take(self) -> Tensor:
        self.active = False
        feats, self.feats = self.feats, []
        return torch.stack(feats)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_outputs(outputs: dict, layer: int, num_layers: int) -> dict:
    """Predictions of decoder layer ``layer`` (the final ones for the last layer or without aux)."""
    aux = outputs.get("aux_outputs") or []
    if layer == num_layers - 1 or layer >= len(aux):
        return outputs
    return aux[layer]


def layer_boxes(outputs: dict, layer: int, num_layers: int) -> Tensor:
    """Predicted boxes of decoder layer ``layer`` (the final ones for the last layer or without aux)."""
    return layer_outputs(outputs, layer, num_layers)["pred_boxes"]


def _roles(outputs: dict, targets: list[dict], matcher: HungarianMatcher) -> list[Tensor]:
    """Per image, the Hungarian role of every query (``fqm.query_roles``)."""
    num_queries = outputs["pred_boxes"].shape[1]
    return [query_roles(ij, num_queries) for ij in matcher(outputs, targets)]


def drd_term(s_out: dict, t_out: dict, s_feats: Tensor, t_feats: Tensor, targets: list[dict],
             cfg: DistillConfig, matcher: HungarianMatcher | None = None) -> tuple[Tensor, dict[str, float]]:
    """L_DRD over the configured layers, and its statistics for the last distilled layer: ``drd_pairs``
    (kept pairs) and ``drd_role_mismatch`` (fraction of them joining queries of different roles)."""
    matcher = matcher or HungarianMatcher()
    ls, lt = s_feats.shape[0], t_feats.shape[0]
    layers = list(zip(range(ls), range(lt))) if cfg.drd_layers == "all" else [(ls - 1, lt - 1)]
    losses, stats = [], {}
    for i, k in layers:
        so, to = layer_outputs(s_out, i, ls), layer_outputs(t_out, k, lt)
        s_roles, t_roles = _roles(so, targets, matcher), _roles(to, targets, matcher)
        pairs = [fqm_pairs(t["boxes"], so["pred_boxes"][b], to["pred_boxes"][b], cfg.tau, cfg.fqm_match,
                           s_roles[b], t_roles[b]) for b, t in enumerate(targets)]
        losses.append(drd_loss(s_feats[i], t_feats[k], pairs, cfg.drd_distance))
        num_pairs = sum(int(s.numel()) for s, _ in pairs)
        mismatched = sum(role_mismatches(p, s_roles[b], t_roles[b]) for b, p in enumerate(pairs))
        stats = {"drd_pairs": float(num_pairs), "drd_role_mismatch": mismatched / max(num_pairs, 1)}
    return torch.stack(losses).mean(), stats


class DistillObjective:
    """``L_GT + lambda * L_DRD`` for the loop; with ``cfg.fqm`` off, ``L_GT`` alone (no teacher run)."""

    def __init__(self, criterion: SetCriterion, student: nn.Module, teacher: nn.Module | None,
                 cfg: DistillConfig) -> None:
        self.criterion, self.teacher, self.cfg = criterion, teacher, cfg
        use_drd = cfg.fqm and teacher is not None
        hooked = use_drd and cfg.drd_feature != "hs"
        self.s_cap = DecoderCapture(student, cfg.drd_feature) if hooked else None
        self.t_cap = DecoderCapture(teacher, cfg.drd_feature) if hooked else None
        self.use_drd = use_drd

    def __call__(self, model: nn.Module, images: Tensor, mask: Tensor, targets: list) -> tuple[Tensor, dict]:
        if self.s_cap:
            self.s_cap.start()
        out = model(images, mask)
        s_feats = self.s_cap.take() if self.s_cap else out["hs"]
        terms = self.criterion(out, targets)
        loss = self.criterion.total(terms)
        if not self.use_drd:
            return loss, terms
        with torch.no_grad():
            if self.t_cap:
                self.t_cap.start()
            t_out = self.teacher(images, mask)
            t_feats = self.t_cap.take() if self.t_cap else t_out["hs"]
        drd, stats = drd_term(out, t_out, s_feats, t_feats, targets, self.cfg, self.criterion.matcher)
        terms["loss_drd"] = drd
        terms.update(stats)
        return loss + self.cfg.lambda_drd * drd, terms


# -- student and teacher -------------------------------------------------------------------------------
def load_teacher(path: str, trust: bool, device: torch.device) -> nn.Module:
    teacher = load_checkpoint(path, trust=trust).model.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def _calib_batches(data: Data, config: TrainConfig, env: D.DistEnv, n: int) -> Iterator[tuple]:
    loader, sampler = train_loader(data, dataclasses.replace(config, workers=0), env)
    sampler.set_epoch(0)
    for images, mask, _ in itertools.islice(loader, n):
        yield images.to(env.device), mask.to(env.device)


def quantize_and_calibrate(model: nn.Module, qconfig: QuantConfig, data: Data, config: TrainConfig,
                           dcfg: DistillConfig, env: D.DistEnv) -> nn.Module:
    """Quantize a float DETR in place and initialise every step on the first training batches."""
    quantize(model.to(env.device), qconfig)
    calibrate(model, _calib_batches(data, config, env, dcfg.calib_batches), dcfg.calib_method,
              progress=env.is_main and config.progress)
    return model


def _check_quantized_student(qc: QuantConfig, dcfg: DistillConfig, path: str) -> None:
    if dcfg.two_stage:
        raise QDetrError("--two-stage needs a float student ('from-teacher' or a float checkpoint)", path)
    if dcfg.bits is not None and QuantConfig.from_bits(dcfg.bits).bits != qc.bits:
        raise QDetrError(f"student is quantized to {qc.bits}, not {dcfg.bits}: drop --bits", path)
    if dcfg.da is not None and dcfg.da != qc.da:
        raise QDetrError(f"student has DA placement {qc.da!r}, not {dcfg.da!r}: drop --da/--no-da", path)


def _float_student(student: str, teacher: str, trust: bool) -> tuple[nn.Module, QuantConfig | None]:
    """The student model as loaded and its QuantConfig (None: float, still to be quantized)."""
    src = teacher if student == FROM_TEACHER else student
    ckpt = load_checkpoint(src, trust=trust)
    if student == FROM_TEACHER and ckpt.quant_config is not None:
        raise QDetrError("the teacher is a quantized checkpoint: 'from-teacher' needs a float teacher", src)
    return ckpt.model, ckpt.quant_config


def _check_pair(student: nn.Module, teacher: nn.Module, dcfg: DistillConfig) -> None:
    s, t = student.config, teacher.config
    if dcfg.fqm and s.hidden_dim != t.hidden_dim:
        raise QDetrError(f"DRD needs equal feature widths: student hidden_dim {s.hidden_dim}, teacher "
                         f"{t.hidden_dim}")
    if dcfg.fqm and dcfg.drd_layers == "all" and s.dec_layers != t.dec_layers:
        raise QDetrError(f"--drd-layers all needs equal decoder depths: student {s.dec_layers}, teacher "
                         f"{t.dec_layers}")


def _load_matching(model: nn.Module, state: dict[str, Tensor]) -> None:
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                          strict=False)


def stage2_student(stage1: nn.Module, dcfg: DistillConfig, data: Data, config: TrainConfig,
                   env: D.DistEnv) -> nn.Module:
    """The whole-model student from a backbone-only one: same weights and backbone steps, new transformer
    quantizers calibrated on the first training batches."""
    model = build_detr(stage1.config).to(env.device)
    quantize(model, dcfg.quant_config())
    state = stage1.state_dict()
    _load_matching(model, state)  # float weights, so that calibration sees the trained model
    calibrate(model, _calib_batches(data, config, env, dcfg.calib_batches), dcfg.calib_method,
              progress=env.is_main and config.progress)
    _load_matching(model, state)  # the backbone's learned steps win over the fresh calibration
    return model


# -- the `distill` command -----------------------------------------------------------------------------
def split_budget(config: TrainConfig, fraction: float) -> tuple[TrainConfig, TrainConfig]:
    """Stage 1 and stage 2 configs of a two-stage run (see the module docstring)."""
    def part(total: int | None, first: bool) -> int | None:
        if total is None:
            return None
        n1 = max(1, round(total * fraction))
        return n1 if first else max(1, total - n1)

    out = Path(config.output_dir)
    stages = []
    for first in (True, False):
        epochs = part(config.epochs, first)
        scale = (epochs / config.epochs) if epochs and config.epochs else 1.0
        drops = tuple(sorted({max(1, round(d * scale)) for d in config.lr_drop}))
        stages.append(dataclasses.replace(
            config, epochs=epochs, max_steps=part(config.max_steps, first), lr_drop=drops,
            output_dir=str(out / "stage1") if first else str(out), seed=config.seed + (0 if first else 1)))
    return stages[0], stages[1]


def _stage_done(state: dict[str, Any] | None, config: TrainConfig) -> bool:
    if state is None:
        return False
    return (config.epochs is not None and state["epoch"] >= config.epochs) or \
        (config.max_steps is not None and state["step"] >= config.max_steps)


def _run_stage(model: nn.Module, teacher: nn.Module, data: Data, config: TrainConfig, dcfg: DistillConfig,
               meta: dict[str, Any], env: D.DistEnv, state: dict[str, Any] | None) -> TrainResult:
    c = model.config
    criterion = set_criterion(data.num_classes, c.dec_layers, c.aux_loss, config)
    objective = DistillObjective(criterion, model, teacher if dcfg.fqm else None, dcfg)
    return fit(model, data, objective, config, meta, env, state)


def _resume_model(config: TrainConfig, state: dict[str, Any]) -> nn.Module:
    return resume_model(load_checkpoint(Path(config.output_dir) / CHECKPOINT_NAME), state)


def _say(env: D.DistEnv, message: str) -> None:
    if env.is_main:
        tqdm.write(message)


def distill(student: str, teacher: str, config: TrainConfig, dcfg: DistillConfig | None = None,
            trust: bool = False) -> TrainResult:
    """Train a quantized DETR with ``L_GT + lambda * L_DRD`` from a frozen full-precision teacher.

    ``student``: a quantized checkpoint, a float one (quantized with ``dcfg.bits``/``dcfg.da`` and
    calibrated), or ``"from-teacher"``. ``teacher``: our checkpoint or an upstream DETR one (``trust`` for
    pickled upstream training checkpoints). Returns the final stage's result; its checkpoint is the
    quantized student (``load_checkpoint`` restores its QuantConfig).
    """
    dcfg = dcfg or DistillConfig()
    env = D.init_distributed(config.device)
    try:
        seed_all(config.seed)
        teacher_model = load_teacher(teacher, trust, env.device) if dcfg.fqm else None
        meta = {"stage": "distill", "student": student, "distill": dataclasses.asdict(dcfg),
                "teacher": {"path": str(teacher), "sha256": sha256_file(teacher)}}
        if dcfg.two_stage:
            return _two_stage(student, teacher, teacher_model, config, dcfg, meta, env, trust)
        state = read_resume_state(config)
        if state is not None:
            model = _resume_model(config, state)
            data = load_data(config, model.config.num_classes)
        else:
            model, data = _fresh_student(student, teacher, config, dcfg, env, trust, backbone_only=False)
        check_classes(model.config.num_classes, data, config)
        if teacher_model is not None:
            _check_pair(model, teacher_model, dcfg)
        return _run_stage(model, teacher_model, data, config, dcfg, meta, env, state)
    finally:
        D.cleanup(env)


def _fresh_student(student: str, teacher: str, config: TrainConfig, dcfg: DistillConfig, env: D.DistEnv,
                   trust: bool, backbone_only: bool) -> tuple[nn.Module, Data]:
    model, qc = _float_student(student, teacher, trust)
    data = load_data(config, model.config.num_classes)
    check_classes(model.config.num_classes, data, config)
    if qc is not None:
        _check_quantized_student(qc, dcfg, student)
        return model.to(env.device), data
    qconfig = dcfg.quant_config(backbone_only=backbone_only)
    scope = ", backbone only" if backbone_only else ""
    _say(env, f"quantizing the student to {qconfig.bits} (DA {qconfig.da}{scope}) and calibrating on "
              f"{dcfg.calib_batches} batches")
    return quantize_and_calibrate(model, qconfig, data, config, dcfg, env), data


def _two_stage(student: str, teacher: str, teacher_model: nn.Module | None, config: TrainConfig,
               dcfg: DistillConfig, meta: dict[str, Any], env: D.DistEnv, trust: bool) -> TrainResult:
    cfg1, cfg2 = split_budget(config, dcfg.stage1_fraction)
    state2 = read_resume_state(cfg2)
    state1 = None if state2 is not None else read_resume_state(cfg1)
    if state2 is None and not _stage_done(state1, cfg1):
        if state1 is not None:
            model1 = _resume_model(cfg1, state1)
            data = load_data(cfg1, model1.config.num_classes)
        else:
            model1, data = _fresh_student(student, teacher, cfg1, dcfg, env, trust, backbone_only=True)
        if teacher_model is not None:
            _check_pair(model1, teacher_model, dcfg)
        _say(env, f"stage 1 (backbone quantized): {cfg1.epochs} epochs, max steps {cfg1.max_steps}")
        _run_stage(model1, teacher_model, data, cfg1, dcfg, {**meta, "stage": "distill-stage1"}, env, state1)
        state1 = read_resume_state(dataclasses.replace(cfg1, resume=True))
    if state2 is not None:
        model2 = _resume_model(cfg2, state2)
        data = load_data(cfg2, model2.config.num_classes)
    else:
        model1 = _resume_model(cfg1, state1)
        data = load_data(cfg2, model1.config.num_classes)
        model2 = stage2_student(model1, dcfg, data, cfg2, env)
    check_classes(model2.config.num_classes, data, cfg2)
    _say(env, f"stage 2 (whole model quantized): {cfg2.epochs} epochs, max steps {cfg2.max_steps}")
    meta2 = {**meta, "stage": "distill-stage2", "stage1": str(Path(cfg1.output_dir) / CHECKPOINT_NAME)}
    return _run_stage(model2, teacher_model, data, cfg2, dcfg, meta2, env, state2)
