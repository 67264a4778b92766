"""BK-SDM's handcrafted pruning presets, and pruned models that save and load.

The units themselves (discovery, the unit-to-module mapping, removal, plans) are the core's
(:class:`harness.Unit`, :func:`harness.discover_units`, :func:`harness.apply_plan`): every
criterion, this plugin's or a third party's, sees the same ones. A pruned model is saved as
its state dict plus the plan, and loaded by building the full architecture, applying the
plan, then loading the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from harness import Unit, UserError, apply_plan, conflicts, discover_units, merge_plans, suggest

# the names this plugin's modules and tests use
discover = discover_units
__all__ = ["Unit", "apply_plan", "conflicts", "discover", "merge_plans", "BKSDM_PRESETS", "bksdm_plan",
           "bksdm_reference", "bksdm_size", "save_pruned", "load_pruned", "untie"]


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
