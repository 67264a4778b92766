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

import contextlib
import math
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from harness import Stage, UserError

# Backbones (registered names) the stage knows how to split; any other is refused at validation.
BACKBONES = ("unet", "dit")
# A trajectory step of more passes than this is taken for a new trajectory (bounds what is kept).
MAX_PASSES = 8


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


# -- trajectory state ------------------------------------------------------------------------------
@dataclass
class _Trajectory:
    shape: tuple
    t: float
    x: torch.Tensor
    conds: list = field(default_factory=list)  # the conditioning of each pass, as step 0 had them
    step: int = 0
    pass_: int = 0
    full: list = field(default_factory=list)   # per step: whether it ran full
    filled: set = field(default_factory=set)   # passes whose features are kept


class DeepCache:
    """The cache and step logic shared by the patched modules of one model."""

    def __init__(self, spec: DeepCacheSpec, kind: str):
        self.spec, self.kind = spec, kind
        self.mode = "off"          # what the modules do now: off (plain), full (run and keep), cached (reuse)
        self.pass_ = 0
        self.store: dict = {}      # (pass, module key) -> output (or the DiT residual)
        self.trajectory: Optional[_Trajectory] = None
        self.finished: list[list[bool]] = []  # per finished trajectory, whether each step ran full
        self._forced: Optional[str] = None

    # -- which step a call is ----------------------------------------------------------------------
    def reset(self) -> None:
        if self.trajectory is not None and self.trajectory.full:
            self.finished = (self.finished + [self.trajectory.full])[-16:]
        self.trajectory, self.store = None, {}

    def begin(self, top: nn.Module, x, t, cond) -> str:
        """The mode of this call (full or cached), the trajectory advanced."""
        if self._forced is not None:
            self.pass_ = 0
            return self._forced
        tval = _single_timestep(t)
        if top.training or tval is None or not isinstance(x, torch.Tensor):
            self.reset()
            return "off"
        traj = self.trajectory
        if traj is None or tuple(x.shape) != traj.shape or tval > traj.t:
            return self._start(x, tval, cond)
        if tval == traj.t:
            nxt = traj.pass_ + 1
            if nxt < len(traj.conds) and _same(cond, traj.conds[nxt]):
                return self._enter(traj, traj.step, nxt)   # the next guidance pass of a later step
            if traj.step == 0 and len(traj.conds) < MAX_PASSES and not any(_same(cond, c) for c in traj.conds):
                traj.conds.append(cond)                   # a guidance pass first seen at step 0
                return self._enter(traj, 0, len(traj.conds) - 1)
            if _same(cond, traj.conds[0]) and not _same(x, traj.x):
                traj.t = tval                             # a scheduler that evaluates a timestep twice (PNDM)
                return self._step(traj, x)
            return self._start(x, tval, cond)             # a repeated call: a new trajectory
        if _same(cond, traj.conds[0]):
            traj.t = tval
            return self._step(traj, x)
        return self._start(x, tval, cond)

    def _start(self, x, tval, cond) -> str:
        self.reset()
        self.trajectory = _Trajectory(shape=tuple(x.shape), t=tval, x=x, conds=[cond])
        return self._enter(self.trajectory, 0, 0)

    def _step(self, traj: _Trajectory, x) -> str:
        traj.x = x
        return self._enter(traj, traj.step + 1, 0)

    def _enter(self, traj: _Trajectory, step: int, pass_: int) -> str:
        if step != traj.step or not traj.full:
            traj.step = step
            traj.full.append(self.spec.is_full(step))
        traj.pass_ = self.pass_ = pass_
        if traj.full[step] or pass_ not in traj.filled:
            traj.filled.add(pass_)
            return "full"
        return "cached"

    @contextlib.contextmanager
    def counting(self):
        """Calls in the block run the mode set in ``_forced`` on a scratch cache, the running
        trajectory untouched: how :func:`step_gflops` counts each kind of step."""
        saved = (self.store, self.trajectory, self._forced)
        self.store, self.trajectory = {}, None
        try:
            yield
        finally:
            self.store, self.trajectory, self._forced = saved


def _single_timestep(t) -> Optional[float]:
    """The batch's one timestep, or None when its entries differ (a loss over random timesteps)."""
    if isinstance(t, torch.Tensor):
        if t.is_meta:  # counted, not sampled (the gflops metric on a meta copy): no values to read
            return None
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            return None
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            return None
        return float(flat[0])
    if isinstance(t, (int, float)):
        return float(t)
    return None


def _same(a, b) -> bool:
    """Whether two conditionings (tensors, dicts, lists, None...) are the same inputs."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


# -- the patched forwards ------------------------------------------------------------------------
# Each is bound to its module with types.MethodType, so a deepcopy of the model (the fp16 copy
# of sample_latency, a meta copy for FLOP counting) gets forwards bound to the copies.
def _call_inner(module: nn.Module, args, kwargs):
    inner = module.__dict__.get("_deepcache_inner")
    return inner(*args, **kwargs) if inner is not None else type(module).forward(module, *args, **kwargs)


def _tracked_forward(self, *args, **kwargs):
    """The denoiser's forward: which step this call is, then the model with its modules told."""
    cache: DeepCache = self._deepcache
    x_name, t_name = self._deepcache_inputs
    x = args[0] if args else kwargs.get(x_name)
    t = args[1] if len(args) > 1 else kwargs.get(t_name)
    cond = (args[2:], {k: v for k, v in kwargs.items() if k not in (x_name, t_name, "return_dict")})
    cache.mode = cache.begin(self, x, t, cond)
    try:
        return _call_inner(self, args, kwargs)
    finally:
        cache.mode = "off"


def _deep_forward(self, *args, **kwargs):
    """A deep U-Net module: on a cached step, its output of the last full step."""
    cache: DeepCache = self._deepcache
    key = (cache.pass_, self._deepcache_key)
    if cache.mode == "cached" and key in cache.store:
        return cache.store[key]
    out = _call_inner(self, args, kwargs)
    if cache.mode == "full":
        cache.store[key] = out
    return out


def _middle_forward(self, x, *args, **kwargs):
    """A middle DiT block: skipped on a cached step, where the first adds the kept residual."""
    cache: DeepCache = self._deepcache
    first, last = self._deepcache_key
    if cache.mode == "cached" and (cache.pass_, "residual") in cache.store:
        return x + cache.store[(cache.pass_, "residual")] if first else x
    if cache.mode == "full" and first:
        cache.store[(cache.pass_, "input")] = x
    out = _call_inner(self, (x, *args), kwargs)
    if cache.mode == "full" and last:
        cache.store[(cache.pass_, "residual")] = out - cache.store.pop((cache.pass_, "input"))
    return out


def _patch(module: nn.Module, fn, cache: DeepCache, key=None) -> None:
    if "_deepcache" in module.__dict__:
        raise UserError(f"deepcache: {type(module).__name__} is patched already (the stage runs once per model)")
    if "forward" in module.__dict__:  # someone's instance-level forward: ours calls it
        module._deepcache_inner = module.__dict__["forward"]
    module._deepcache = cache
    module._deepcache_key = key
    module.forward = types.MethodType(fn, module)


def unpatch(model: nn.Module) -> None:
    """Every module of ``model`` back to its own forward."""
    for module in model.modules():
        if "_deepcache" in module.__dict__:
            del module.__dict__["forward"]
            inner = module.__dict__.pop("_deepcache_inner", None)
            if inner is not None:
                module.forward = inner
            for attr in ("_deepcache", "_deepcache_key", "_deepcache_inputs", "start_trajectory"):
                module.__dict__.pop(attr, None)


# -- finding the parts ---------------------------------------------------------------------------
def find_denoiser(model: nn.Module) -> tuple[str, nn.Module]:
    """``("unet", diffusers U-Net)`` or ``("dit", DiT)`` inside ``model``; UserError otherwise."""
    if _is_diffusers_unet(model):
        return "unet", model
    inner = getattr(model, "unet", None)
    if isinstance(inner, nn.Module) and _is_diffusers_unet(inner):
        return "unet", inner
    if all(hasattr(model, a) for a in ("blocks", "x_embedder", "t_embedder", "final_layer")) and \
            isinstance(model.blocks, nn.ModuleList):
        return "dit", model
    raise UserError(f"deepcache: a {type(model).__name__} is neither a diffusers U-Net (down/mid/up blocks) "
                    f"nor a DiT; DeepCache splits only those")


def _is_diffusers_unet(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.ModuleList) for a in ("down_blocks", "up_blocks")) and \
        hasattr(m, "conv_in") and hasattr(m, "mid_block")


def _layers(block: nn.Module) -> list[list[nn.Module]]:
    """A down or up block's layers in order: each ResNet with its attention (if any)."""
    resnets = list(getattr(block, "resnets", None) or [])
    attns = list(getattr(block, "attentions", None) or [])
    return [[r] + ([attns[i]] if i < len(attns) and attns[i] is not None else []) for i, r in enumerate(resnets)]


def skip_count(unet: nn.Module) -> int:
    """How many skip connections (branches) the U-Net has: ``conv_in`` and every down layer."""
    n = 1
    for block in unet.down_blocks:
        n += len(_layers(block)) + (1 if getattr(block, "downsamplers", None) else 0)
    return n


def _split_unet(unet: nn.Module, cache: DeepCache, branch: int) -> int:
    """Patch the modules deeper than ``branch``; return how many modules were patched."""
    total = skip_count(unet)
    if branch >= total:
        raise UserError(f"deepcache.branch {branch}: this U-Net has {total} skip branches (0-{total - 1})")
    patched = 0

    def deep(module, key):
        nonlocal patched
        _patch(module, _deep_forward, cache, key)
        patched += 1

    k = 0  # the skip index the next down layer makes
    for b, block in enumerate(unet.down_blocks):
        layers = _layers(block)
        downs = list(getattr(block, "downsamplers", None) or [])
        made = list(range(k + 1, k + 1 + len(layers) + len(downs)))
        k = made[-1] if made else k
        if made and min(made) > branch:
            deep(block, ("down", b))
        elif made and max(made) > branch:
            for i, layer in enumerate(layers):
                if made[i] > branch:
                    for j, m in enumerate(layer):
                        deep(m, ("down", b, i, j))
            for j, m in enumerate(downs):
                if made[len(layers) + j] > branch:
                    deep(m, ("down", b, "downsampler", j))
    if unet.mid_block is not None:
        deep(unet.mid_block, ("mid",))
    k = total  # up layers consume the skips in reverse
    for b, block in enumerate(unet.up_blocks):
        layers = _layers(block)
        used = list(range(k - 1, k - 1 - len(layers), -1))
        k -= len(layers)
        if used and min(used) > branch:
            deep(block, ("up", b))  # with its upsampler: the feature entering the next block is kept
        elif used and max(used) > branch:
            for i, layer in enumerate(layers):
                if used[i] > branch:
                    for j, m in enumerate(layer):
                        deep(m, ("up", b, i, j))
    return patched


def _split_dit(dit: nn.Module, cache: DeepCache, branch: int) -> int:
    depth = len(dit.blocks)
    middle = list(range(branch, depth - branch))
    if not middle:
        raise UserError(f"deepcache.branch {branch}: this DiT has {depth} blocks; branch runs {branch} at each end, "
                        f"so at most {(depth - 1) // 2} leaves a middle to cache")
    for i in middle:
        _patch(dit.blocks[i], _middle_forward, cache, (i == middle[0], i == middle[-1]))
    return len(middle)


def enable(model: nn.Module, spec: DeepCacheSpec) -> DeepCache:
    """Patch ``model`` (in place) for DeepCache; returns the shared :class:`DeepCache`."""
    kind, denoiser = find_denoiser(model)
    cache = DeepCache(spec, kind)
    if "_deepcache" in denoiser.__dict__:
        raise UserError("deepcache: this model already has DeepCache applied")
    if kind == "unet":
        _split_unet(denoiser, cache, spec.branch)
        inputs = ("sample", "timestep")
    else:
        _split_dit(denoiser, cache, spec.branch)
        inputs = ("x", "t")
    _patch(denoiser, _tracked_forward, cache)
    denoiser._deepcache_inputs = inputs
    denoiser.start_trajectory = types.MethodType(_start_trajectory, denoiser)  # harness.start_trajectory calls it
    return cache


def _start_trajectory(self) -> None:
    self._deepcache.reset()


def cache_of(model: nn.Module) -> Optional[DeepCache]:
    """The :class:`DeepCache` applied to ``model`` (or to the U-Net inside it), or None."""
    for m in (model, getattr(model, "unet", None)):
        if isinstance(m, nn.Module) and "_deepcache" in m.__dict__:
            return m.__dict__["_deepcache"]
    return None


def reset(model: nn.Module) -> None:
    """Start a new trajectory: the next call of ``model`` is a full step."""
    cache = cache_of(model)
    if cache is not None:
        cache.reset()


# -- FLOPs of each kind of step -----------------------------------------------------------------
@torch.no_grad()
def step_gflops(model: nn.Module, inputs: dict, handles: Optional[dict] = None) -> tuple[float, float]:
    """GFLOPs of a full and of a cached step of ``model(**inputs)``, counted by
    :func:`harness.count_flops` on the model itself (a cached step needs the features a full
    step kept, so both run on the same model, one after the other, on a scratch cache)."""
    from harness import count_flops

    cache = cache_of(model)
    if cache is None:
        raise ValueError("step_gflops: the model has no DeepCache applied")
    with cache.counting():
        cache._forced = "full"
        full = count_flops(model, inputs, handles, abstract=False)
        cache._forced = "cached"
        cached = count_flops(model, inputs, handles, abstract=False)
    return full.total / 1e9, cached.total / 1e9


def _inputs_of(model: nn.Module, device) -> dict:
    from harness import example_inputs

    spec = {"input_size": getattr(model, "input_size", None) or 32, "in_channels": getattr(model, "in_channels", 4),
            "num_classes": getattr(model, "num_classes", 0), "context_dim": getattr(model, "context_dim", 0)}
    return example_inputs(model, spec, 1, device, torch.Generator().manual_seed(0))


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
        full, cached = step_gflops(model, _inputs_of(model, device), registry().flop_handles())
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
        (_split_unet if _is_diffusers_unet(denoiser) else _split_dit)(denoiser, cache, spec.branch)
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
