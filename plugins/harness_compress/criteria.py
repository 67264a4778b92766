"""Layer-pruning criteria: ``score(model, units, ctx) -> {unit: importance}``, higher = keep.

``laptop`` is LAPTOP-Diff's one-shot criterion (the output loss of the whole model with that
unit alone removed); the rest are the baselines of its comparison.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from harness.errors import UserError

from .calibration import (calibration_inputs, evaluating, noise_channels, output_loss, predict,
                          reference_outputs, removed)
from .units import Unit


def unit_parameters(model: nn.Module, unit: Unit) -> list[torch.nn.Parameter]:
    return [p for name in unit.covers for p in model.get_submodule(name).parameters()]


class Criterion:
    """Base: holds the calibration size that data-driven criteria use."""

    name = ""

    def __init__(self, batch_size: int = 8, timesteps: int = 8):
        if batch_size < 1 or timesteps < 1:
            raise UserError(f"criterion {self.name!r}: batch_size and timesteps must be >= 1 "
                            f"(got {batch_size}, {timesteps})")
        self.batch_size, self.timesteps = batch_size, timesteps

    def batches(self, model, ctx):
        return calibration_inputs(ctx, model, self.batch_size, self.timesteps)

    def score(self, model: nn.Module, units: list[Unit], ctx) -> dict[str, float]:
        raise NotImplementedError


class Laptop(Criterion):
    """LAPTOP-Diff one-shot: output loss of the model with the unit alone removed."""

    name = "laptop"

    def score(self, model, units, ctx):
        with evaluating(model):
            batches = self.batches(model, ctx)
            c = noise_channels(ctx)
            refs = reference_outputs(model, batches, c)
            scores = {}
            for unit in units:
                with removed(model, [unit]) as pruned:
                    scores[unit.name] = output_loss(pruned, batches, refs, c)
        return scores


class Random(Criterion):
    """Random scores from a seed (the cell's, unless given)."""

    name = "random"

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

    name = "magnitude"

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

    name = "taylor"

    def score(self, model, units, ctx):
        c = noise_channels(ctx)
        model.zero_grad(set_to_none=True)
        requires = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), evaluating(model):
                for batch in self.batches(model, ctx):
                    loss = torch.mean((predict(model, batch, c) - batch["noise"]) ** 2)
                    (loss / self.timesteps).backward()
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

    name = "similarity"

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
            for name in unit.covers:  # a pair: the mean over its modules
                handles.append(model.get_submodule(name).register_forward_hook(hook(unit.name), with_kwargs=True))
        try:
            with torch.no_grad(), evaluating(model):
                for batch in self.batches(model, ctx):
                    model(**batch["inputs"])
        finally:
            for h in handles:
                h.remove()
        return {n: sums[n] / max(counts[n], 1) for n in sums}


class BKSDM(Criterion):
    """BK-SDM's handcrafted order: second units of down stages and middle units of up stages
    first, then the mid block, then the innermost stage (U-Nets only)."""

    name = "bk-sdm"

    def __init__(self):
        super().__init__()

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


CRITERIA = {c.name: c for c in (Laptop, Random, Magnitude, Taylor, Similarity, BKSDM)}
