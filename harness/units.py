"""Prunable units of a denoiser: what pruning criteria score, how a unit maps to its modules,
and how units are removed.

A *unit* is a residual, shape-preserving sub-module that can become the identity: a
diffusers ResNet block whose channels do not change, a diffusers attention layer (a
``Transformer2DModel`` holding one block, or each block of one that holds several), the
blocks of DiT and LaMamba-Diff (any module whose class is named ``DiTBlock`` or
``LaMambaBlock``). Removing a unit swaps it for a parameter-free :class:`Skip`, so module
names (and so feature names for distillation) stay those of the teacher.

On a U-Net a unit may also be a *skip pair*, named ``a+b``: a down-stage ResNet removed
together with the up-stage ResNet that consumed its skip connection (how BK-SDM thins a
stage). Such a unit covers several modules: :attr:`Unit.modules` lists them all, and
:meth:`Unit.submodules` returns them, so a criterion that hooks modules works the same on
both kinds of backbone.

Two diffusers U-Net ResNets cannot become the identity: one that changes channels (its
1x1 shortcut is not the identity), and any up-block ResNet, whose input is the previous
output concatenated with a skip (diffusers' UpBlock2D / CrossAttnUpBlock2D).
:func:`discover_units` reports them with the reason.

A pruning *plan* is JSON: ``{"skip": [names], "drop": [names]}``. ``skip`` names units;
``drop`` deletes modules outright (list items or attributes).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import nn

from .errors import UserError, suggest

# Blocks of the harness's own transformers: forward(x, c, hw) -> x-shaped.
_TOKEN_BLOCKS = ("DiTBlock", "LaMambaBlock")


@dataclass
class Unit:
    """One removable piece of a model, as :func:`discover_units` finds it.

    Attributes:
        name: the unit's name, a module path in the model (``blocks.3``), or ``a+b`` for a
            U-Net's skip pair; criteria key their scores by it.
        kind: ``resnet``, ``attention``, ``transformer``, ``block`` or ``skip-pair``.
        params: parameters the unit holds (all its modules).
        removable: False for a unit that cannot become the identity; ``reason`` says why.
        drop: the modules a skip pair deletes outright; empty for a unit that becomes a
            :class:`Skip`.
    """

    name: str
    kind: str
    params: int
    removable: bool = True
    reason: str = ""
    drop: tuple = ()

    @property
    def plan(self) -> dict:
        return {"skip": [], "drop": list(self.drop)} if self.drop else {"skip": [self.name], "drop": []}

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the modules this unit takes away: ``(name,)`` for a single module, both
        ResNets (and their attentions) for a skip pair. Units that share one cannot both go."""
        return tuple(self.drop) or (self.name,)

    covers = modules  # the name the compress plugin used first

    def submodules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of :attr:`modules` in ``model`` (for forward hooks, or their weights)."""
        return [model.get_submodule(name) for name in self.modules]

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter of the unit's modules in ``model``."""
        return [p for m in self.submodules(model) for p in m.parameters()]

    def to_dict(self) -> dict:
        return asdict(self)


def conflicts(a: Unit, b: Unit) -> bool:
    """Whether two units share a module (then at most one of them can be removed)."""
    return any(x == y or x.startswith(y + ".") or y.startswith(x + ".") for x in a.covers for y in b.covers)


def merge_plans(units: list[Unit]) -> dict:
    """One pruning plan that removes every unit of ``units``."""
    plan = {"skip": [], "drop": []}
    for u in units:
        for k, v in u.plan.items():
            plan[k].extend(v)
    return {k: sorted(set(v)) for k, v in plan.items()}


class Skip(nn.Module):
    """Identity standing in for a removed unit; returns its input in the caller's format."""

    def __init__(self, kind: str, origin: str = ""):
        super().__init__()
        self.kind = kind
        self.origin = origin

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor", kwargs.get("x")))
        if self.kind == "transformer2d":  # blocks index [0] of its return_dict=False tuple
            if kwargs.get("return_dict", True):
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=x)
            return (x,)
        return x

    def extra_repr(self) -> str:
        return f"removed {self.origin or self.kind}"


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_up_path(name: str) -> bool:
    return ".up_blocks." in f".{name}" or name.startswith("up_blocks.")


def discover_units(model: nn.Module) -> list[Unit]:
    """Every candidate unit of ``model`` in module order, removable or not (with the reason)."""
    # Matched by class name, not isinstance: importing diffusers costs seconds, and a DiT has none.
    units: list[Unit] = []
    inside: list[str] = []  # names of units already taken whole (their children are not units)
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        cls = type(module).__name__
        if isinstance(module, Skip):
            continue
        diffusers = type(module).__module__.startswith("diffusers.")
        if diffusers and cls == "ResnetBlock2D":
            unit = Unit(name, "resnet", _param_count(module))
            if getattr(module, "up", False) or getattr(module, "down", False):
                unit.removable, unit.reason = False, "resamples (up/down ResNet)"
            elif _is_up_path(name):
                unit.removable, unit.reason = False, "up-block ResNet consumes a skip connection"
            elif module.in_channels != module.out_channels:
                unit.removable, unit.reason = False, f"changes channels {module.in_channels}->{module.out_channels}"
            units.append(unit)
            inside.append(name)
        elif diffusers and cls == "Transformer2DModel":
            blocks = module.transformer_blocks
            if len(blocks) == 1:  # the whole layer (norm, proj_in/out included) is one unit
                units.append(Unit(name, "attention", _param_count(module)))
                inside.append(name)
            # several blocks: each is a unit, found as BasicTransformerBlock below
        elif diffusers and cls == "BasicTransformerBlock":
            units.append(Unit(name, "transformer", _param_count(module)))
            inside.append(name)
        elif diffusers and cls == "Attention" and getattr(module, "residual_connection", False):
            units.append(Unit(name, "attention", _param_count(module)))
            inside.append(name)
        elif cls in _TOKEN_BLOCKS:
            units.append(Unit(name, "block", _param_count(module)))
            inside.append(name)
    for name, module in model.named_modules():
        if hasattr(module, "down_blocks") and hasattr(module, "up_blocks"):
            units += _skip_pairs(module, name + "." if name else "")
    return units


def _skip_pairs(unet: nn.Module, p: str) -> list[Unit]:
    """Pairs that remove a down-stage ResNet (and its attention) together with an up-stage
    ResNet (and attention) of the mirrored stage, so the skip it produced is consumed by no
    one: how BK-SDM thins a stage. Up ResNet m is only safe for 1 <= m <= L-1: the first one
    takes the previous stage's width, the last one the skip from the stage above."""
    pairs = []
    n = len(unet.down_blocks)
    if len(unet.up_blocks) != n:
        return pairs
    for i, down in enumerate(unet.down_blocks):
        up = unet.up_blocks[n - 1 - i]
        L = len(down.resnets)
        if L < 2 or len(up.resnets) != L + 1:
            continue
        for k in range(1, L):
            m = min(max(L - k, 1), L - 1)
            r = down.resnets[k]
            if r.in_channels != r.out_channels:
                continue
            d_attn = getattr(down, "attentions", None)
            u_attn = getattr(up, "attentions", None)
            drop = [f"{p}down_blocks.{i}.resnets.{k}", f"{p}up_blocks.{n - 1 - i}.resnets.{m}"]
            if d_attn is not None and len(d_attn) == L:
                drop.append(f"{p}down_blocks.{i}.attentions.{k}")
            if u_attn is not None and len(u_attn) == L + 1:
                drop.append(f"{p}up_blocks.{n - 1 - i}.attentions.{m}")
            params = sum(_param_count(unet.get_submodule(d[len(p):])) for d in drop)
            pairs.append(Unit(f"{drop[0]}+{drop[1]}", "skip-pair", params, drop=tuple(drop)))
    return pairs


def removable(units: list[Unit]) -> list[Unit]:
    """The units that can be removed."""
    return [u for u in units if u.removable]


# -- applying a plan ---------------------------------------------------------------------------
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


def tag_origins(model: nn.Module) -> None:
    """Remember each module's original name, so features still match after drops renumber lists."""
    for name, module in model.named_modules():
        if not hasattr(module, "_harness_origin"):
            module._harness_origin = name


def origin_names(model: nn.Module) -> dict[str, str]:
    """Current module name -> name in the unpruned model."""
    return {name: getattr(m, "_harness_origin", name) for name, m in model.named_modules()}


def _skip_kind(module: nn.Module) -> str:
    return "transformer2d" if type(module).__name__ == "Transformer2DModel" else type(module).__name__


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Remove the plan's units in place (names are those of the unpruned model) and return it."""
    unknown = set(plan) - {"skip", "drop"}
    if unknown:
        raise UserError(f"pruning plan: unknown key(s) {sorted(unknown)}; expected 'skip' and 'drop'")
    tag_origins(model)
    names = dict(model.named_modules())

    def resolve(name):  # by object, before anything moves: drops renumber lists
        if name not in names:
            raise UserError(f"pruning plan: no module {name!r} in the model{suggest(name, names)}")
        parent, attr = _parent(model, name)
        return parent, attr, names[name]

    skips = [resolve(n) + (n,) for n in plan.get("skip", [])]
    drops = [resolve(n) for n in plan.get("drop", [])]
    for parent, attr, module, name in skips:
        _replace(parent, attr, module, Skip(_skip_kind(module), origin=name))
    for parent, attr, module in drops:
        if isinstance(parent, nn.ModuleList):
            index = next((i for i, m in enumerate(parent) if m is module), None)
            if index is not None:
                del parent[index]
        else:
            setattr(parent, attr, None)
    _fix_diffusers_counts(model)
    return model


def _replace(parent: nn.Module, attr: str, old: nn.Module, new: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[next(i for i, m in enumerate(parent) if m is old)] = new
    else:
        setattr(parent, attr, new)


def _fix_diffusers_counts(model: nn.Module) -> None:
    """After whole stages are dropped, keep diffusers' upsampler count (it sets the size check) right."""
    for module in model.modules():
        if hasattr(module, "num_upsamplers") and hasattr(module, "up_blocks"):
            module.num_upsamplers = sum(1 for b in module.up_blocks if getattr(b, "upsamplers", None) is not None)


@contextmanager
def remove_units(model: nn.Module, units: list[Unit]):
    """The model with ``units`` removed. Units that become the identity are swapped for a
    :class:`Skip` in place (and restored on exit); a skip-connection pair changes the
    structure, so then a pruned copy is yielded instead."""
    if any(u.drop for u in units):
        yield apply_plan(copy.deepcopy(model), merge_plans(units))
        return
    saved = []
    try:
        for unit in units:
            parent, attr = _parent(model, unit.name)
            module = parent[int(attr)] if isinstance(parent, nn.ModuleList) else getattr(parent, attr)
            saved.append((parent, attr, module))
            _set(parent, attr, Skip(_skip_kind(module), origin=unit.name))
        yield model
    finally:
        for parent, attr, module in reversed(saved):
            _set(parent, attr, module)


def _set(parent: nn.Module, attr: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)
