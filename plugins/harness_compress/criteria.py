"""Layer-pruning criteria: ``score(model, units, ctx) -> {unit: importance}``, higher = keep.

``laptop`` is LAPTOP-Diff's one-shot criterion (the output loss of the whole model with that
unit alone removed); the rest are the baselines of its comparison. They are written against
the core's criterion contract (:class:`harness.Criterion`) like any third party's.
"""
from __future__ import annotations

import json
import math
import re

import torch
from torch import nn

import harness
from harness import (Calibration, CellConfig, CellContext, Unit, UserError, calibration_inputs, discover_units,
                     evaluating, noise_channels, output_loss, predict_noise, reference_outputs, remove_units)


def unit_parameters(model: nn.Module, unit: Unit) -> list[torch.nn.Parameter]:
    return unit.parameters(model)


class Criterion(harness.Criterion):
    """Base: the calibration set of the pruning stage, or one of the size given here."""

    def __init__(self, batch_size: int | None = None, timesteps: int | None = None):
        if (batch_size is not None and batch_size < 1) or (timesteps is not None and timesteps < 1):
            raise UserError(f"criterion {type(self).__name__}: batch_size and timesteps must be >= 1 "
                            f"(got {batch_size}, {timesteps})")
        self.batch_size, self.timesteps = batch_size, timesteps

    def calibration(self, ctx, model):
        stage = getattr(ctx, "calibration", None) or Calibration()
        return calibration_inputs(ctx, model, stage.with_size(self.batch_size, self.timesteps))

    batches = calibration  # its first name here

    def observe(self, ctx, model, hooks) -> None:
        """Run the calibration set through ``model`` (eval mode, no grad) with each ``(module,
        fn)`` of ``hooks`` as a forward hook that also sees keyword arguments; all removed after."""
        handles = [module.register_forward_hook(fn, with_kwargs=True) for module, fn in hooks]
        try:
            with torch.no_grad(), evaluating(model):
                for batch in self.calibration(ctx, model):
                    model(**batch["inputs"])
        finally:
            for h in handles:
                h.remove()


class Laptop(Criterion):
    """LAPTOP-Diff one-shot: output loss of the model with the unit alone removed."""

    def score(self, model, units, ctx):
        with evaluating(model):
            batches = self.calibration(ctx, model)
            c = noise_channels(ctx)
            refs = reference_outputs(model, batches, c)
            scores = {}
            for unit in units:
                with remove_units(model, [unit]) as pruned:
                    scores[unit.name] = output_loss(pruned, batches, refs, c)
        return scores


class Random(Criterion):
    """Random scores from a seed (the cell's, unless given)."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed

    def score(self, model, units, ctx):
        seed = self.seed if self.seed is not None else ctx.seed("criterion-random")
        gen = torch.Generator().manual_seed(seed)
        values = torch.rand(len(units), generator=gen).tolist()
        return {u.name: v for u, v in zip(units, values)}


class Magnitude(Criterion):
    """Mean absolute weight of the unit (weight norm per parameter)."""

    def __init__(self):
        super().__init__()

    def score(self, model, units, ctx):
        out = {}
        for unit in units:
            params = unit_parameters(model, unit)
            n = sum(p.numel() for p in params)
            out[unit.name] = float(sum(p.detach().abs().sum().item() for p in params) / max(n, 1))
        return out


class Taylor(Criterion):
    """First-order Taylor: sum of |w * dL/dw| of the diffusion loss over the unit's weights."""

    def score(self, model, units, ctx):
        c = noise_channels(ctx)
        model.zero_grad(set_to_none=True)
        requires = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), evaluating(model):
                batches = self.calibration(ctx, model)
                for batch in batches:
                    loss = torch.mean((predict_noise(model, batch, c) - batch["noise"]) ** 2)
                    (loss / len(batches)).backward()
            out = {}
            for unit in units:
                total = 0.0
                for p in unit_parameters(model, unit):
                    if p.grad is not None:
                        total += (p.detach() * p.grad).abs().sum().item()
                out[unit.name] = total
        finally:
            model.zero_grad(set_to_none=True)
            for p, r in requires.items():
                p.requires_grad_(r)
        return out


def unit_io(args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit's input hidden state and its output, as a forward hook sees them (a DiT or
    LaMamba-Diff block's ``x``, a diffusers ResNet's ``input_tensor``, an attention layer's
    ``hidden_states``; a ``Transformer2DModelOutput`` or tuple output unwrapped)."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor", kwargs.get("x")))
    y = getattr(output, "sample", output)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return x, y


class Similarity(Criterion):
    """Angular distance between a unit's input and output: a unit that barely turns its
    input is cheap to remove. Each sample is one vector (all its positions and channels
    flattened); compare ``block-influence``, which compares position by position."""

    def score(self, model, units, ctx):
        sums = {u.name: 0.0 for u in units}
        counts = {u.name: 0 for u in units}

        def hook(name):
            def fn(module, args, kwargs, output):
                x, y = unit_io(args, kwargs, output)
                if y.shape != x.shape:  # an up ResNet of a pair: its input holds the skip too
                    return
                cos = torch.nn.functional.cosine_similarity(x.flatten(1).float(), y.flatten(1).float(), dim=1)
                sums[name] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
                counts[name] += 1
            return fn

        # a pair: the mean over its modules
        self.observe(ctx, model, [(module, hook(unit.name)) for unit in units for module in unit.submodules(model)])
        return {n: sums[n] / max(counts[n], 1) for n in sums}


class BlockInfluence(Criterion):
    """ShortGPT's block influence (Men et al. 2024, arXiv 2403.03853), the baseline TinyFusion
    (Fang et al. 2024, arXiv 2412.01199) prunes DiT-XL/2 with: for each block,

        BI = 1 - E[cos(x_in, x_out)],

    the cosine taken per token along the hidden (channel) dimension, between the hidden state
    that enters the block and the one that leaves it, averaged over the tokens of each
    calibration batch and then over the batches (one batch per timestep of the cell's
    calibration set). A block that barely turns any token (BI near 0) is removed first.

    Tokens are a DiT's or LaMamba-Diff's (B, N, D) rows, and each spatial position of a
    U-Net's (B, C, H, W) map, compared along its C channels. The ``similarity`` criterion
    differs: it flattens a whole sample into one vector, so a block that rotates a few tokens
    strongly and leaves the rest alone scores low there and high here.

    Units whose output does not have their input's shape are outside the definition: a
    U-Net's skip pair ``a+b`` (its up ResNet takes the skip concatenated to its input) and any
    module that turns out to change the shape. They are left out of the scores, so this
    criterion never removes them, and the record lists them with the reason under
    ``block_influence.unscored``. A backbone with no unit inside the definition is refused
    when the suite is validated (:meth:`check`).

    TinyFusion's ``prune_by_score.py`` calibrates on clean VAE latents at random timesteps
    and never prunes the last block; here every criterion scores on the cell's calibration
    set (noised images at timesteps spread over the schedule) and every removable unit is a
    candidate.
    """

    RECORD_KEY = "block_influence"

    def score(self, model, units, ctx):
        unscored = {u.name: "a skip pair: a down ResNet and the up ResNet that takes its skip concatenated to "
                            "its input; no one hidden state enters and leaves it" for u in units if u.drop}
        blocks = [u for u in units if not u.drop]
        sums = {u.name: 0.0 for u in blocks}
        calls = {u.name: 0 for u in blocks}

        def hook(name):
            def fn(module, args, kwargs, output):
                if name in unscored:
                    return
                x, y = unit_io(args, kwargs, output)
                if y.shape != x.shape or x.dim() not in (3, 4):
                    unscored[name] = f"its output {tuple(y.shape)} does not have its input's shape {tuple(x.shape)}"
                    return
                dim = -1 if x.dim() == 3 else 1  # (B, N, D) tokens; (B, C, H, W) positions along C
                cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=dim)
                sums[name] += 1.0 - cos.mean().item()
                calls[name] += 1
            return fn

        self.observe(ctx, model, [(u.submodules(model)[0], hook(u.name)) for u in blocks])
        for name, n in calls.items():
            if n == 0 and name not in unscored:
                unscored[name] = "not run by the model's forward pass"
        if unscored and getattr(ctx, "extra", None) is not None:
            ctx.extra[self.RECORD_KEY] = {"unscored": unscored}
        return {name: sums[name] / calls[name] for name in sums if name not in unscored}

    @staticmethod
    def check(config):
        kinds = _unit_kinds(config)
        if kinds is not None and not any(kind != "skip-pair" for kind in kinds):
            raise UserError(f"block influence compares a block's input and output hidden states; no removable "
                            f"unit of backbone {config.backbone.name!r} is one module with its input's shape "
                            f"(only skip pairs, whose up ResNet takes a concatenated skip)")


def _unit_kinds(config) -> list[str] | None:
    """The kinds of the removable units of the cell's backbone, built on the meta device (no
    weights read, once per backbone configuration); None when it cannot be built here (the
    suite's own build check then says why)."""
    raw = config.backbone.model_dump()
    raw.pop("pretrained", None)  # structure only
    key = json.dumps({"backbone": raw, "data": config.data and config.data.model_dump()}, sort_keys=True, default=str)
    if key not in _KINDS:
        try:
            # without the data block: it only sets input shapes, which decide no unit's kind, and
            # building it would load (and a latent one encode) the whole data set at validation
            cell = CellConfig.model_validate({**config.model_dump(exclude_none=True), "backbone": raw, "data": None})
            model = CellContext("check", "check", 0, cell).build_backbone(device="meta")
        except Exception:  # noqa: BLE001 - not this check's to report
            return None
        _KINDS[key] = [u.kind for u in discover_units(model) if u.removable]
    return _KINDS[key]


_KINDS: dict[str, list[str]] = {}


class BKSDM(Criterion):
    """BK-SDM's handcrafted order: second units of down stages and middle units of up stages
    first, then the mid block, then the innermost stage (U-Nets only)."""

    def __init__(self):
        super().__init__()

    @staticmethod
    def check(config):
        if config.backbone.name in ("dit", "lamamba"):
            raise UserError(f"BK-SDM's order is defined on a diffusers U-Net's down/mid/up stages; "
                            f"backbone {config.backbone.name!r} has none (use it with backbone 'unet')")

    def score(self, model, units, ctx):
        stages = [int(m.group(1)) for u in units if (m := re.search(r"down_blocks\.(\d+)\.", u.name))]
        if not stages:
            raise UserError("criterion 'bk-sdm' needs a diffusers U-Net (down_blocks/mid_block/up_blocks); "
                            f"{type(model).__name__} has none")
        innermost = max(stages)
        out = {}
        for order, unit in enumerate(units):
            name = unit.name
            idx = re.search(r"\.(?:resnets|attentions)\.(\d+)", name)
            k = int(idx.group(1)) if idx else 0
            if unit.drop:  # BK-SDM's own move: a down ResNet with the up ResNet that took its skip
                rank = 0
            elif re.search(rf"down_blocks\.{innermost}\.", name) or re.search(r"up_blocks\.0\.", name):
                rank = 2
            elif ("down_blocks." in name and k >= 1) or ("up_blocks." in name and k == 1):
                rank = 0.5  # what BK-SDM removes, where no pair takes it whole
            elif "mid_block." in name:
                rank = 1
            else:
                rank = 3
            out[name] = rank + order * 1e-6  # stable order within a rank
        return out


CRITERIA = {"laptop": Laptop, "random": Random, "magnitude": Magnitude, "taylor": Taylor,
            "similarity": Similarity, "bk-sdm": BKSDM, "block-influence": BlockInfluence}
