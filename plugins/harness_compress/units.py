"""Prunable units of a denoiser: discovery, removal, and a pruned model that saves and loads.

A *unit* is a residual, shape-preserving sub-module that can become the identity: a
diffusers ResNet block whose channels do not change, a diffusers attention layer (a
``Transformer2DModel`` holding one block, or each block of one that holds several), the
blocks of DiT and LaMamba-Diff. Removing a unit swaps it for a parameter-free :class:`Skip`,
so module names (and so feature names for distillation) stay those of the teacher.

Two diffusers U-Net ResNets cannot become the identity: one that changes channels (its
1x1 shortcut is not the identity), and any up-block ResNet, whose input is the previous
output concatenated with a skip (diffusers' UpBlock2D / CrossAttnUpBlock2D).
:func:`discover` reports them with the reason.

A pruning *plan* is JSON: ``{"skip": [names], "drop": [names]}``. ``skip`` names units;
``drop`` deletes modules outright (list items or attributes), which is what the BK-SDM
presets need: their up stages lose a ResNet together with the down-stage ResNet whose skip
it consumed. A pruned model is saved as its state dict plus the plan, and loaded by
building the full architecture, applying the plan, then loading the weights.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from harness.errors import UserError, suggest

# Blocks of the harness's own transformers: forward(x, c, hw) -> x-shaped.
_TOKEN_BLOCKS = ("DiTBlock", "LaMambaBlock")


@dataclass
class Unit:
    name: str          # module path in the model
    kind: str          # resnet, attention, transformer, block
    params: int
    removable: bool = True
    reason: str = ""   # why it cannot be removed
    drop: tuple = ()   # modules deleted outright (skip-connection pairs); empty: the unit becomes a Skip

    @property
    def plan(self) -> dict:
        return {"skip": [], "drop": list(self.drop)} if self.drop else {"skip": [self.name], "drop": []}

    @property
    def covers(self) -> tuple:
        """Module names this unit takes away (units that share one cannot both be removed)."""
        return self.drop or (self.name,)

    def to_dict(self) -> dict:
        return asdict(self)


def conflicts(a: Unit, b: Unit) -> bool:
    return any(x == y or x.startswith(y + ".") or y.startswith(x + ".") for x in a.covers for y in b.covers)


def merge_plans(units: list[Unit]) -> dict:
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


def discover(model: nn.Module) -> list[Unit]:
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


def skip_kind(module: nn.Module) -> str:
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
        _replace(parent, attr, module, Skip(skip_kind(module), origin=name))
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


# -- BK-SDM presets ----------------------------------------------------------------------------
def _find_unet(model: nn.Module) -> tuple[nn.Module, str]:
    """The diffusers UNet2DConditionModel inside ``model`` and its path prefix."""
    for name, module in model.named_modules():
        if type(module).__name__ == "UNet2DConditionModel":
            return module, (name + "." if name else "")
    raise UserError("BK-SDM presets apply to Stable Diffusion U-Nets (diffusers UNet2DConditionModel); "
                    f"this model is a {type(model).__name__}")


BKSDM_PRESETS = ("bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")

# The U-Net sizes BK-SDM publishes for its SD-1.x students (model card of
# Nota-NetsPresso/BK-SDM; arXiv 2305.15798), in billions of parameters, and the count of the
# SD-1.x U-Net they were cut from. BK-SDM prints sizes rounded *up* to 0.01B: all sixteen of
# its U-Net and whole-pipeline figures (SD-1.4 and SD-2.1-base families) are the ceiling of
# the exact count, while rounding to nearest misses seven of them (e.g. Small, 482.3M).
BKSDM_PUBLISHED_B = {"bk-sdm-base": 0.58, "bk-sdm-small": 0.49, "bk-sdm-tiny": 0.33}
SD1_UNET_PARAMS = 859_520_964


def bksdm_size(params: int) -> float:
    """A parameter count as BK-SDM prints it: billions, rounded up to two decimals."""
    return -(-params // 10 ** 7) / 100


def bksdm_reference(preset: str, params_before: int, params_after: int) -> dict | None:
    """How a pruned count compares with BK-SDM's published size (SD-1.x U-Nets only)."""
    if preset not in BKSDM_PUBLISHED_B or params_before != SD1_UNET_PARAMS:
        return None
    published = BKSDM_PUBLISHED_B[preset]
    return {"published_b": published, "ours_b": bksdm_size(params_after), "match": bksdm_size(params_after) == published,
            "rounding": "billions rounded up to 0.01, as BK-SDM prints sizes",
            "source": "BK-SDM model card (Nota-NetsPresso/BK-SDM), arXiv 2305.15798"}


def bksdm_plan(model: nn.Module, preset: str) -> dict:
    """BK-SDM's handcrafted removal for an SD-1.x/2.x U-Net (4 stages, 2 ResNets per down stage).

    Base: the second ResNet (+ attention) of every down stage, and the middle one of every
    up stage (the one that consumed that ResNet's skip). Small: Base without the mid block.
    Tiny: Small without the innermost stage (its down and up blocks, and the downsampler
    that fed it)."""
    if preset not in BKSDM_PRESETS:
        raise UserError(f"unknown pruning preset {preset!r}{suggest(preset, BKSDM_PRESETS)}")
    unet, p = _find_unet(model)
    n = len(unet.down_blocks)
    if n != 4 or len(unet.up_blocks) != 4 or any(len(b.resnets) != 2 for b in unet.down_blocks):
        raise UserError(f"{preset}: expects an SD-1.x/2.x U-Net (4 stages, 2 ResNets per down stage); "
                        f"got {n} stages")
    drop = []
    for i, block in enumerate(unet.down_blocks):
        drop.append(f"{p}down_blocks.{i}.resnets.1")
        if getattr(block, "attentions", None) is not None and len(block.attentions) > 1:
            drop.append(f"{p}down_blocks.{i}.attentions.1")
    for i, block in enumerate(unet.up_blocks):
        drop.append(f"{p}up_blocks.{i}.resnets.1")
        if getattr(block, "attentions", None) is not None and len(block.attentions) > 1:
            drop.append(f"{p}up_blocks.{i}.attentions.1")
    if preset in ("bk-sdm-small", "bk-sdm-tiny"):
        drop.append(f"{p}mid_block")
    if preset == "bk-sdm-tiny":
        innermost_down, outermost_up = f"{p}down_blocks.{n - 1}", f"{p}up_blocks.0"
        drop = [d for d in drop if not d.startswith((innermost_down + ".", outermost_up + "."))]
        drop += [innermost_down, outermost_up, f"{p}down_blocks.{n - 2}.downsamplers"]
    return {"skip": [], "drop": drop}


# -- save and load -----------------------------------------------------------------------------
def save_pruned(model: nn.Module, plan: dict, folder: str | Path) -> Path:
    """``model.safetensors`` (pruned weights) and ``plan.json`` in ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(untie(state), str(folder / "model.safetensors"))
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))
    return folder


def untie(state: dict) -> dict:
    """safetensors refuses shared storage (tied weights): give each tensor its own."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def load_pruned(full_model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply the saved plan to a freshly built full model and load the pruned weights."""
    from safetensors.torch import load_file

    folder = Path(folder)
    plan = json.loads((folder / "plan.json").read_text())
    model = apply_plan(full_model, plan)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model
