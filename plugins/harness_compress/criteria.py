"""Layer-pruning criteria: ``score(model, units, ctx) -> {unit: importance}``, higher = keep.

``laptop`` is LAPTOP-Diff's one-shot criterion (the output loss of the whole model with that
unit alone removed); the rest are the baselines of its comparison. They are written against
the core's criterion contract (:class:`harness.Criterion`) like any third party's.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

import harness
from harness import (Calibration, Unit, UserError, calibration_inputs, evaluating, noise_channels, output_loss,
                     predict_noise, reference_outputs, remove_units)


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


class Similarity(Criterion):
    """Angular distance between a unit's input and output: a unit that barely turns its
    input is cheap to remove."""

    def score(self, model, units, ctx):
        sums = {u.name: 0.0 for u in units}
        counts = {u.name: 0 for u in units}
        handles = []

        def hook(name):
            def fn(module, args, kwargs, output):
                x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
                y = getattr(output, "sample", output)
                y = y[0] if isinstance(y, (tuple, list)) else y
                if y.shape != x.shape:  # an up ResNet of a pair: its input holds the skip too
                    return
                cos = torch.nn.functional.cosine_similarity(x.flatten(1).float(), y.flatten(1).float(), dim=1)
                sums[name] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
                counts[name] += 1
            return fn

        for unit in units:
            for module in unit.submodules(model):  # a pair: the mean over its modules
                handles.append(module.register_forward_hook(hook(unit.name), with_kwargs=True))
        try:
            with torch.no_grad(), evaluating(model):
                for batch in self.calibration(ctx, model):
                    model(**batch["inputs"])
        finally:
            for h in handles:
                h.remove()
        return {n: sums[n] / max(counts[n], 1) for n in sums}


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
            "similarity": Similarity, "bk-sdm": BKSDM}
