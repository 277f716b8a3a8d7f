"""Model size and operations with the paper's (BiDet-style) accounting (QDETR_METHOD.md §5).

Per compute layer (Conv2d, Linear, the attention projections, and attention's two matrix products) we
record parameters, multiply-accumulates (MACs) at a given input size, and weight / activation bits.

- size (bits) = 32 per full-precision parameter + b per b-bit parameter (biases, norms and embeddings are
  full precision);
- OPs = MACs of full-precision layers + MACs of b-bit layers x ``BIT_OP_FACTOR[b]`` (1/8, 1/16, 1/32 for 4, 3,
  2 bits, as the paper states; 8-bit layers count 1/4, the same rule extended: 8/32), one MAC = one OP.
  Parameter-free ops (softmax, LayerNorm, residual adds, position encoding) are not counted.
The choices that reproduce the paper's totals are described in docs/ACCOUNTING.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from qdetr_deploy.models.attention import MultiheadAttention
from qdetr_deploy.models.smca_attention import SMCAMultiheadAttention
from qdetr_deploy.models.smca_detr import SMCADETR
from qdetr_deploy.quant.quantizers import WeightQuantMixin

BIT_OP_FACTOR = {2: 1 / 32, 3: 1 / 16, 4: 1 / 8, 8: 1 / 4, 32: 1.0}
MB = 2**20  # the paper's MB is a mebibyte: it reproduces its 159.32 MB for DETR-R50


@dataclass
class LayerCost:
    name: str
    kind: str  # conv | linear | attn_proj | attn_matmul
    params: int
    macs: int
    w_bits: int  # 32 = full precision
    a_bits: int
    step_mean: float | None = None
    step_min: float | None = None
    step_max: float | None = None


def op_factor(rec: LayerCost, model_bits: int, mode: str = "paper") -> float:
    """OPs per MAC of one layer.

    "exact": what runs: full precision 1, b-bit layers ``BIT_OP_FACTOR[b]``.
    "paper": the counting that reproduces Q-DETR's totals: the first (stem) layer at full cost (BiDet's
    convention of a real-valued first layer), attention's 8-bit products at 8/32, and every other conv and
    linear layer (the full-precision downsample, input_proj and heads included) at the model's b-bit factor.
    """
    if model_bits >= 32:
        return 1.0
    if rec.kind == "attn_matmul":
        return BIT_OP_FACTOR[rec.w_bits]
    if mode == "exact":
        return BIT_OP_FACTOR[rec.w_bits]
    if rec.kind == "conv" and rec.w_bits == 8 and model_bits < 8:
        return 1.0
    return BIT_OP_FACTOR[model_bits]


def size_bits(rec: LayerCost, model_bits: int, mode: str = "paper") -> int:
    """Bits of a layer's weights: as quantized ("exact"), or all but the stem at b bits ("paper")."""
    if mode == "exact" or model_bits >= 32 or (rec.w_bits == 8 and rec.kind == "conv"):
        return rec.params * rec.w_bits
    return rec.params * model_bits


def _bits(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, WeightQuantMixin):
        act = getattr(module, "act", None) or getattr(module, "query_act", None)
        return module.w_bits, act.bits if act is not None else 32
    return 32, 32


def _steps(module: nn.Module) -> tuple[float | None, float | None, float | None]:
    if not isinstance(module, WeightQuantMixin):
        return None, None, None
    a = module.alpha.detach().abs()
    return float(a.mean()), float(a.min()), float(a.max())


def _attn_bits(module: nn.Module) -> int:
    return getattr(getattr(module, "q_act", None), "bits", 32)  # float SMCA attention: an nn.Identity slot


def layer_costs(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> list[LayerCost]:
    """Run one forward pass at ``input_size`` (H, W) and record every compute layer's cost."""
    records: list[LayerCost] = []
    hooks = []

    def conv_hook(name):
        def hook(m: nn.Conv2d, inp, out):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            w, a = _bits(m)
            records.append(LayerCost(name, "conv", m.weight.numel(), out.numel() * k, w, a, *_steps(m)))
        return hook

    def linear_hook(name):
        def hook(m: nn.Linear, inp, out):
            w, a = _bits(m)
            tokens = out.numel() // m.out_features
            records.append(LayerCost(name, "linear", m.weight.numel(), tokens * m.weight.numel(), w, a,
                                     *_steps(m)))
        return hook

    def attn_hook(name):
        def hook(m: MultiheadAttention | SMCAMultiheadAttention, inp, out):
            (lq, b, e), lk = inp[0].shape, inp[1].shape[0]
            proj = (lq + 2 * lk) * b * e * e
            smca = isinstance(m, SMCAMultiheadAttention)
            layer = m.in_proj if smca else m  # SMCA: the forward uses slices of its in_proj's weight
            w, a = _bits(layer)
            params = (m.in_proj.weight if smca else m.in_proj_weight).numel()
            records.append(LayerCost(f"{name}.in_proj", "attn_proj", params, proj, w, a, *_steps(layer)))
            ab = _attn_bits(m)
            records.append(LayerCost(f"{name}.matmul", "attn_matmul", 0, 2 * b * lq * lk * e, ab, ab))
        return hook

    skip = {f"{n}.in_proj" for n, m in model.named_modules() if isinstance(m, SMCAMultiheadAttention)}
    for name, m in model.named_modules():
        if name in skip:
            continue  # counted by its attention's hook (the forward uses slices of its weight)
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(name)))
        elif isinstance(m, (MultiheadAttention, SMCAMultiheadAttention)):
            hooks.append(m.register_forward_hook(attn_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, *input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return records


@dataclass
class ModelCost:
    input_size: tuple[int, int]
    mode: str
    size_mb: float
    gops: float
    fp_size_mb: float
    fp_gops: float
    params: int

    @property
    def size_reduction(self) -> float:
        return self.fp_size_mb / self.size_mb

    @property
    def ops_reduction(self) -> float:
        return self.fp_gops / self.gops

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(size_reduction=self.size_reduction, ops_reduction=self.ops_reduction,
                 input_size=list(self.input_size))
        return d


def model_cost(model: nn.Module, records: list[LayerCost], input_size: tuple[int, int],
               mode: str = "paper") -> ModelCost:
    """Totals of :func:`layer_costs` records for the model and for its full-precision twin.

    Parameters are the model's float parameters (quantizer steps, zero points and DA excluded); those
    outside compute layers (biases, norms, embeddings) count 32 bits.
    """
    qconfig = getattr(model, "quant_config", None)
    bits = qconfig.w_bits if qconfig is not None else 32
    params = sum(p.numel() for n, p in model.named_parameters() if not _is_quantizer_param(n))
    other = params - sum(r.params for r in records)
    size = sum(size_bits(r, bits, mode) for r in records) + 32 * other
    gops = sum(r.macs * op_factor(r, bits, mode) for r in records) / 1e9
    fp_gops = sum(r.macs for r in records) / 1e9
    return ModelCost(tuple(input_size), mode, size / 8 / MB, gops, 32 * params / 8 / MB, fp_gops, params)


def _is_quantizer_param(name: str) -> bool:
    return name.endswith(("alpha", "zero_point")) or ".norm_q." in name


DEFAULT_INPUT_SIZE = (800, 1133)  # where DETR-R50 counts 86.22 G, nearest the paper's 85.51 G
PAPER_DETR_R50 = {  # QDETR_METHOD.md §5
    "fp32": {"size_mb": 159.32, "gops": 85.51},
    "4-4-8": {"size_mb": 19.92, "gops": 13.02, "size_reduction": 7.99, "ops_reduction": 6.57},
    "3-3-8": {"size_mb": 15.03, "gops": 7.61, "size_reduction": 10.60, "ops_reduction": 11.23},
    "2-2-8": {"size_mb": 10.03, "gops": 5.32, "size_reduction": 15.88, "ops_reduction": 16.07},
}


def describe(model: nn.Module, source: str | None = None) -> str:
    """What a model is, in words: e.g. "quantized SMCA-DETR, released Q-DETR format, 4-4-8"."""
    qconfig = getattr(model, "quant_config", None)
    arch = "SMCA-DETR" if isinstance(model, SMCADETR) else "DETR"
    parts = [f"{'quantized ' if qconfig else ''}{arch}", source, qconfig.bits if qconfig else "fp32"]
    return ", ".join(p for p in parts if p)


def inspect_model(model: nn.Module, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
                  mode: str = "paper", source: str | None = None) -> dict:
    """Per-layer table and totals (size MB, GOPs, reductions) of a float or quantized DETR or SMCA-DETR;
    ``source``: where it came from (e.g. "released Q-DETR format"), named in ``model``."""
    records = layer_costs(model, input_size)
    cost = model_cost(model, records, input_size, mode)
    exact = model_cost(model, records, input_size, "exact")
    qconfig = getattr(model, "quant_config", None)
    return {
        "model": describe(model, source),
        **cost.to_dict(),
        "bits": qconfig.bits if qconfig else "fp32",
        "exact": {k: v for k, v in exact.to_dict().items() if k in ("size_mb", "gops", "size_reduction",
                                                                     "ops_reduction")},
        "layers": [asdict(r) for r in records],
    }
