"""The lowering registry: one rule per module kind, turning a PyTorch module into ONNX nodes.

A rule is registered for exact module classes with :func:`lowers` and called through :func:`lower`:
``lower(ctx, module, *inputs, **options) -> output tensor name(s)``. A composite module's rule lowers its
children through their own rules, in the order of the module's forward, so the graph follows the model's
modules instead of a second hand-written forward. Children that a rule handles itself (a batch norm folded
into the conv before it, an activation quantizer turned into the Q/DQ of its layer's input, dropout, a
container) are declared with ``consumes``; a consumed module is handled by the rule of its nearest ancestor
that has one, and so are its children. :func:`missing_rules` lists every module of a model that has neither
a rule nor a consuming rule above it (the export refuses such a model in one line, and a test
walks the built models with it).

Lookup is by exact class, never by a base class: a subclass that changes the forward (a quantized layer,
another architecture's attention) must name its rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.folding import Ctx

Rule = Callable[..., Any]
RULES: dict[type, Rule] = {}
CONSUMES: dict[type, tuple[type, ...]] = {}


def lowers(*kinds: type, consumes: tuple[type, ...] = ()) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of module classes ``kinds``; ``consumes``: the child
    module classes the rule handles itself (no rule of their own is called for them there)."""
    def register(rule: Rule) -> Rule:
        for kind in kinds:
            if kind in RULES:
                raise ValueError(f"{kind.__name__} already has a lowering rule ({RULES[kind].__name__})")
            RULES[kind], CONSUMES[kind] = rule, tuple(consumes)
        return rule
    return register


@dataclass
class LowerCtx(Ctx):
    """:class:`~qdetr_deploy.export.folding.Ctx` plus what the structural rules need: each module's name
    in the model (node names follow them), the (H, W) canvas, and the modules lowered so far."""

    names: dict[nn.Module, str] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)
    lowered: list[str] = field(default_factory=list)
    #: the top-k index tensor of a sigmoid top-k post-processing (the parity check reads it), "" if none
    topk_index: str = ""

    def name(self, module: nn.Module) -> str:
        """``module``'s name in the model being exported (``named_modules``)."""
        return self.names[module]

    def mark_lowered(self, *modules: nn.Module) -> None:
        """Record modules that a rule lowered itself, with the numeric rules, instead of through
        :func:`lower` (their nodes are theirs all the same)."""
        self.lowered.extend(self.names[m] for m in modules)


def lower(ctx: LowerCtx, module: nn.Module, *inputs: Any, **options: Any) -> Any:
    """Lower ``module`` on graph tensors ``inputs`` with its registered rule; returns its output(s)."""
    rule = RULES.get(type(module))
    if rule is None:
        raise QDetrError(f"cannot export {ctx.names.get(module, '<module>')}: no ONNX lowering rule for "
                         f"{type(module).__module__}.{type(module).__qualname__}")
    ctx.lowered.append(ctx.names.get(module, ""))
    return rule(ctx, module, *inputs, **options)


def mark_lowered_tree(ctx: LowerCtx, *modules: nn.Module) -> None:
    """Record ``modules`` and every descendant whose rule would have run under them as lowered: a rule that
    replaced their subgraph with its value (a constant) has their nodes all the same."""
    def walk(module: nn.Module, owner: type | None) -> None:
        kind = type(module)
        if kind in RULES and not (owner is not None and kind in CONSUMES[owner]):
            ctx.lowered.append(ctx.names.get(module, ""))
        for child in module.children():
            walk(child, kind if kind in RULES else owner)

    for m in modules:
        walk(m, None)


def missing_rules(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, class name) of every module of ``model`` that has no rule and that the rule lowering
    it (the nearest ancestor with a rule) does not declare as consumed."""
    missing: list[tuple[str, str]] = []
    _walk(model, "", None, missing)
    return missing


def _walk(module: nn.Module, name: str, owner: type | None, missing: list[tuple[str, str]]) -> None:
    kind = type(module)
    if kind in RULES:
        owner = kind
    elif owner is None or kind not in CONSUMES[owner]:
        missing.append((name, f"{kind.__module__}.{kind.__qualname__}"))
    for child_name, child in module.named_children():
        _walk(child, f"{name}.{child_name}" if name else child_name, owner, missing)


def check_rules(model: nn.Module) -> None:
    """Refuse, in one line, a model with a module kind that no rule lowers."""
    missing = missing_rules(model)
    if missing:
        kinds = sorted({kind for _, kind in missing})
        raise QDetrError(f"cannot export this model: no ONNX lowering rule for {', '.join(kinds)} "
                         f"(first: {missing[0][0] or '<model>'})")
