"""DeepCache: reuse a denoiser's deep features across adjacent sampling steps.

DeepCache (Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024;
code: github.com/horseee/DeepCache) observes that the high-level features of a U-Net change
little from one sampling step to the next. Every ``interval``-th step of a trajectory is a
*full* step: the whole network runs, and the feature the up path carries into the shallow
*branch* is kept. The steps between are *cached* steps: only the branch runs (the shallowest
down layers and the up layers they feed), and the up path takes the kept feature instead of
the deep blocks' output.

U-Nets (diffusers ``UNet2DConditionModel``, the SD presets; ``UNet2DModel``, the ADM presets).
The skip connections are numbered from the shallowest: skip 0 is the ``conv_in`` output, skip
``k >= 1`` the output of the k-th down layer (a ResNet with its attention, or a downsampler), in
the order the down path makes them. ``branch: B`` keeps skips ``0..B`` live. On a cached step
the model runs the time embedding, ``conv_in``, the down layers that make skips ``1..B``, the up
layers that consume skips ``0..B`` (and the upsampler of an up block whose last layer is one of
them) and the output head; every other down layer, the mid block and every other up layer
return what they returned on the last full step, so the up layer consuming skip ``B`` receives
the deep feature of that step. For Stable Diffusion (two layers per block) branch ``B`` is the
``cache_branch_id`` of DeepCache's ``DeepCacheSDHelper`` (their block ``B // 3``, layer ``B % 3``);
the numbering generalises it to any number of layers per block.

DiT (isotropic transformer, no down/up path). The analogue used here, ours: ``branch: B`` runs
the first ``B`` and the last ``B`` blocks on every step; on a full step the middle blocks run and
their joint residual ``r = h_out - h_in`` (the output of the last middle block minus the input
of the first) is kept; on a cached step the middle blocks are replaced by ``h + r``. With
``B = 0`` only the patch embedding and the final layer run on a cached step.

Steps. ``schedule: uniform`` makes steps ``0, N, 2N, ...`` full (``N = interval``), as their
helper and pipelines do. ``schedule: non-uniform`` is their quadratic schedule centred at
``center`` (``sample_from_quad_center`` in their Stable Diffusion pipeline): ``ceil(steps / N)``
full steps, denser around ``center``, laid out for a trajectory of ``steps`` steps (longer
trajectories run full after it).

Trajectories. The samplers call the denoiser once per step (twice with guidance: conditional,
then unconditional pass) with one timestep for the whole batch, decreasing. A call continues
the running trajectory when its timestep is below the last one, its input has the same shape
and its conditioning equals that of the same pass; a call at the same timestep is the next
guidance pass when its conditioning is new (or the one that pass had). Anything else starts a
new trajectory, whose first step is full: a single forward (the ``latency`` and ``gflops``
metrics), a repeated one, training (``model.training``), a batch whose timesteps differ (a
denoising loss), or timesteps that go up. The harness's sampler (:func:`harness.sample_batch`)
also says so itself, through :func:`harness.start_trajectory`, before its first step (an
unconditional model's first step could otherwise look like the step after a lone forward at a
higher timestep); :func:`reset` does the same.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from harness import Stage, UserError

from .caching import (DeepCache, cache_of, enable, find_denoiser, inputs_of, is_diffusers_unet, reset, skip_count,
                      split_dit, split_unet, step_gflops, unpatch)

# the stage, and the cache's handles a caller may need (turn it off, reset it, count its steps)
__all__ = ["STAGE", "DeepCacheSpec", "apply", "cache_of", "enable", "quad_center_steps", "reset", "skip_count",
           "step_gflops", "unpatch"]

# Backbones (registered names) the stage knows how to split; any other is refused at validation.
BACKBONES = ("unet", "dit")


class DeepCacheSpec(BaseModel):
    """``deepcache: {interval, branch, schedule, steps, center, power}`` (or ``deepcache: N``).

    Defaults: interval 3 and branch 0, what the DeepCache README sets for Stable Diffusion
    v1.5 (``cache_interval=3, cache_branch_id=0``); their non-uniform schedule's power starts
    at 1.2, as in their code."""

    model_config = ConfigDict(extra="forbid")

    interval: int = Field(3, ge=1)      # N: one full step in N (uniform); 1 is the plain model
    branch: int = Field(0, ge=0)        # U-Net: skip index kept live; DiT: blocks run at each end
    schedule: Literal["uniform", "non-uniform"] = "uniform"
    steps: Optional[int] = Field(None, ge=1)    # non-uniform: the trajectory length it is laid out for
    center: Optional[int] = Field(None, ge=0)   # non-uniform: the step the full steps crowd around
    power: float = Field(1.2, gt=1)             # non-uniform: the schedule's starting exponent

    @model_validator(mode="before")
    @classmethod
    def _bare_interval(cls, v):
        return {"interval": v} if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _non_uniform(self):
        if self.schedule == "non-uniform":
            if self.steps is None or self.center is None:
                raise ValueError("schedule non-uniform needs steps (the sampler's) and center (a step index)")
            if self.center >= self.steps:
                raise ValueError(f"center {self.center} must be a step index below steps {self.steps}")
            quad_center_steps(self.steps, math.ceil(self.steps / self.interval), self.center, self.power)
        elif self.steps is not None or self.center is not None:
            raise ValueError("steps and center belong to schedule: non-uniform")
        return self

    def full_steps(self, steps: int) -> list[int]:
        """The full steps of a trajectory of ``steps`` steps (0-based, ascending)."""
        if self.interval == 1:
            return list(range(steps))
        if self.schedule == "uniform":
            return list(range(0, steps, self.interval))
        laid = quad_center_steps(self.steps, math.ceil(self.steps / self.interval), self.center, self.power)
        return sorted({s for s in laid if s < steps} | set(range(self.steps, steps)))

    def is_full(self, step: int) -> bool:
        if self.interval == 1:
            return True
        if self.schedule == "uniform":
            return step % self.interval == 0
        return step >= self.steps or step in self._laid_out

    @property
    def _laid_out(self) -> frozenset:
        return frozenset(self.full_steps(self.steps))


def quad_center_steps(total: int, count: int, center: int, power: float = 1.2) -> list[int]:
    """DeepCache's non-uniform schedule (``sample_from_quad_center`` in their SD pipeline):
    ``count`` step indices out of ``total``, step 0 first, spaced like ``|x|^power`` around
    ``center``. Their loop lowers the power by 0.02 until exactly ``count`` distinct indices come
    out, and fails once it reaches 1. The lower end is the complex root of ``-center`` (Python's
    ``(-c) ** (1 / p)``); the indices are the truncated real parts, as numpy casts them."""
    import numpy as np

    p = power
    while p > 1:
        lo, hi = complex(-center) ** (1 / p), complex(total - center) ** (1 / p)
        xs = np.linspace(lo, hi, count + 1) ** p
        picked = np.unique(np.trunc(xs.real).astype(np.int64))[1:-1]
        steps = [0] + [int(x) + center for x in picked]
        if len(steps) == count:
            return sorted(steps)
        p -= 0.02
    raise UserError(f"deepcache: no non-uniform schedule of {count} full steps in {total} around center {center} "
                    f"(power {power}); lower center or interval")


# -- the stage ---------------------------------------------------------------------------------
def sampler_settings(ctx) -> dict[str, int]:
    """The trajectory lengths the cell samples with, where its blocks and metrics say:
    ``{"sample": steps, "<metric>": steps}``."""
    out: dict[str, int] = {}
    sample = ctx.specs.get("sample")
    if sample is not None:
        steps = getattr(sample, "steps", None)
        if steps is None:
            steps = 25 if getattr(sample, "text", False) else 250  # the sample block's documented defaults
        out["sample"] = int(steps)
    for m in ctx.config.metric_specs():
        try:
            comp = ctx.registry.get("metric", m.name)
        except Exception:
            continue
        if not getattr(comp.factory, "samples", False):
            continue
        steps = m.options.get("steps", comp.defaults().get("steps"))
        if isinstance(steps, int):
            out[m.name] = steps
    return out


def describe(spec: DeepCacheSpec, steps: int) -> dict:
    full = spec.full_steps(steps)
    return {"steps": steps, "full_steps": full, "full_fraction": len(full) / steps}


def deepcache_cell(ctx, spec: DeepCacheSpec) -> None:
    """Apply DeepCache to the cell's model and say in the record what each step costs."""
    model = ctx.model
    cache = enable(model, spec)
    info: dict[str, Any] = {**spec.model_dump(exclude_none=True), "backbone": cache.kind}
    if cache.kind == "unet":
        _, unet = find_denoiser(model)
        info["branches"] = skip_count(unet)
    else:
        info["depth"] = len(model.blocks)
        info["cached_blocks"] = len(model.blocks) - 2 * spec.branch
    info["trajectories"] = {name: describe(spec, steps) for name, steps in sampler_settings(ctx).items()}
    device = next(iter(model.parameters()), torch.empty(0)).device
    inputs = ctx.example_inputs(1, model=model, device=device, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        full, cached = step_gflops(model, inputs, ctx.registry.flop_handles())
    finally:
        model.train(was_training)
    info["gflops_full_step"], info["gflops_cached_step"] = full, cached
    for traj in info["trajectories"].values():
        n_full = len(traj["full_steps"])
        traj["gflops_per_step"] = (n_full * full + (traj["steps"] - n_full) * cached) / traj["steps"]
    info["note"] = ("the gflops and params metrics are of a full step (one forward outside a trajectory); "
                    "a trajectory's mean is under trajectories")
    info["apply"] = spec.model_dump(exclude_none=True)  # what the other ranks of a torchrun rebuild it from
    ctx.extra["deepcache"] = info
    every = "every step is full" if spec.interval == 1 else (
        f"deep features reused on {spec.interval - 1} of every {spec.interval} steps" if spec.schedule == "uniform"
        else f"deep features reused between {math.ceil(spec.steps / spec.interval)} full steps of {spec.steps} "
             f"(non-uniform, center {spec.center})")
    ctx.change_sampling("deepcache", f"DeepCache, branch {spec.branch}: {every}")


def apply(model: nn.Module, value) -> dict:
    """``harness flops --deepcache N`` (or a JSON object of the block's fields), and the other
    ranks of a torchrun (the recorded block): DeepCache applied to ``model`` in place. Returns
    the GFLOPs of a full and of a cached step (batch 1)."""
    import json

    from harness import registry

    recorded = isinstance(value, dict)  # a rank rebuilding rank 0's model: nothing to report
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("{") else int(text)
        except ValueError:
            raise UserError(f"--deepcache {value!r}: expected an interval (an integer) or a JSON object of "
                            f"interval, branch, schedule...") from None
    try:
        spec = DeepCacheSpec.model_validate(value)
    except Exception as exc:
        raise UserError(f"--deepcache {value!r}: {str(exc).splitlines()[-1].strip()}") from None
    cache = enable(model, spec)
    out: dict[str, Any] = {**spec.model_dump(exclude_none=True), "backbone": cache.kind}
    if recorded:
        return out
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        full, cached = step_gflops(model, inputs_of(model, device), registry().flop_handles())
    except Exception as exc:  # the count is a report, not the stage's result
        out["gflops_note"] = f"not counted: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return out
    out["gflops_full_step"], out["gflops_cached_step"] = full, cached
    out["summary"] = (f"DeepCache: a full step {full:.3f} GFLOPs, a cached step {cached:.3f} GFLOPs "
                      f"({cached / full:.1%} of it)" if full else None)
    return out


def check(config, spec: DeepCacheSpec) -> None:
    """Refuse at validation a backbone DeepCache cannot split, a branch it does not have, and a
    non-uniform schedule laid out for another trajectory length than the ``sample`` block's."""
    name = config.backbone.name
    if name not in BACKBONES:
        raise UserError(f"deepcache applies to the U-Net backbones (diffusers U-Nets) and DiT, not to {name!r}")
    sample_steps = (config.blocks.get("sample") or {}).get("steps")
    if spec.schedule == "non-uniform" and isinstance(sample_steps, int) and sample_steps != spec.steps:
        err = UserError(f"the non-uniform schedule is laid out for {spec.steps} steps; the sample block takes "
                        f"{sample_steps}")
        err.option = "steps"
        raise err
    try:
        model = _structure(config)
    except Exception:  # a backbone that needs its weights to be built: the stage checks when it runs
        return
    try:
        cache = DeepCache(spec, "check")
        _, denoiser = find_denoiser(model)
        (split_unet if is_diffusers_unet(denoiser) else split_dit)(denoiser, cache, spec.branch)
    except UserError as exc:
        exc.option = "branch"
        raise


def _structure(config) -> nn.Module:
    """The cell's backbone on the meta device (no weights), as its options build it."""
    from harness import registry

    options = dict(config.backbone.options)
    if options.get("pretrained"):
        raise ValueError("weights needed")
    with torch.device("meta"):
        return registry().create("backbone", config.backbone.name, **options)


STAGE = Stage(schema=DeepCacheSpec, run=deepcache_cell, after=("train", "prune", "distill"), apply=apply,
              check=check, description="DeepCache: reuse deep U-Net features (or DiT middle blocks) across "
                                       "sampling steps (interval N, branch B)")
