"""The feature cache behind the ``deepcache`` stage: which step of which trajectory a call is,
the patched forwards that run, keep or replay each part, how a U-Net or a DiT is split at its
branch, and the FLOPs of a full and of a cached step. The definitions (branch numbering, the
DiT analogue, how trajectories are told apart) are in :mod:`harness_accel.deepcache`."""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from harness import UserError

if TYPE_CHECKING:
    from .deepcache import DeepCacheSpec

# A trajectory step of more passes than this is taken for a new trajectory (bounds what is kept).
MAX_PASSES = 8

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
    if is_diffusers_unet(model):
        return "unet", model
    inner = getattr(model, "unet", None)
    if isinstance(inner, nn.Module) and is_diffusers_unet(inner):
        return "unet", inner
    if all(hasattr(model, a) for a in ("blocks", "x_embedder", "t_embedder", "final_layer")) and \
            isinstance(model.blocks, nn.ModuleList):
        return "dit", model
    raise UserError(f"deepcache: a {type(model).__name__} is neither a diffusers U-Net (down/mid/up blocks) "
                    f"nor a DiT; DeepCache splits only those")


def is_diffusers_unet(m: nn.Module) -> bool:
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


def split_unet(unet: nn.Module, cache: DeepCache, branch: int) -> int:
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


def split_dit(dit: nn.Module, cache: DeepCache, branch: int) -> int:
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
        split_unet(denoiser, cache, spec.branch)
        inputs = ("sample", "timestep")
    else:
        split_dit(denoiser, cache, spec.branch)
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


def inputs_of(model: nn.Module, device) -> dict:
    from harness import example_inputs

    spec = {"input_size": getattr(model, "input_size", None) or 32, "in_channels": getattr(model, "in_channels", 4),
            "num_classes": getattr(model, "num_classes", 0), "context_dim": getattr(model, "context_dim", 0)}
    return example_inputs(model, spec, 1, device, torch.Generator().manual_seed(0))
