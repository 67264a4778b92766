"""Diffusion training of a cell's backbone (noise prediction, DDPM schedules from diffusers).

What every candidate in a suite shares, so that only the model differs: the data order, the
timesteps, the noise and the label dropout of each step are drawn from generators seeded by
the suite seed and the step number (``ctx.seed(..., shared=True)``), never from the cell.
Seeding by step (rather than one stream for the run) also makes a resumed run draw exactly
what the killed one would have drawn.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .context import derive_seed

LossFn = Callable[..., tuple]


class TrainSpec(BaseModel):
    """The ``train:`` block: how the cell's backbone is trained, and the noise schedule every
    measurement of the cell (validation loss, sampling) uses. A cell without the block
    measures its backbone untrained, under these defaults."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(0, ge=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    ema: Optional[float] = Field(0.9999, ge=0, lt=1)
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: int = Field(1000, gt=0)
    label_dropout: float = Field(0.1, ge=0, le=1)
    learn_sigma: bool = False
    checkpoint_every: int = Field(0, ge=0)
    log_every: int = Field(10, gt=0)

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def make_scheduler(schedule: str = "linear", timesteps: int = 1000, learn_sigma: bool = False):
    """The training noise schedule: diffusers' DDPMScheduler with DiT's betas (1e-4..0.02)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=SCHEDULES[schedule],
                         beta_start=1e-4, beta_end=0.02, clip_sample=False,
                         variance_type="learned_range" if learn_sigma else "fixed_small")


def model_learns_sigma(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "learn_sigma", False))


# -- objective ------------------------------------------------------------------------------
def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def vlb_term(scheduler, x0, x_t, t, eps, var_out) -> torch.Tensor:
    """Improved-DDPM/DiT variational bound term for a learned variance, in bits per dim.

    The mean comes from the (detached) predicted noise, so this term trains only the
    variance (DiT's hybrid loss: L_simple + L_vlb). The variance is interpolated in log
    space between beta_t and the clipped posterior variance by ``var_out`` in [-1, 1]. At
    t = 0 the discretised decoder likelihood of the reference is replaced by a Gaussian
    negative log-likelihood of x0 (continuous data here, latents or [-1, 1] pixels)."""
    ac = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    betas = scheduler.betas.to(x0.device, torch.float32)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at t=0
    shape = (-1,) + (1,) * (x0.dim() - 1)
    g = lambda a: a[t].view(shape)  # noqa: E731
    # True posterior q(x_{t-1} | x_t, x0).
    c0 = betas * ac_prev.sqrt() / (1 - ac)
    ct = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
    true_mean = g(c0) * x0 + g(ct) * x_t
    # Model p(x_{t-1} | x_t): mean from the predicted (frozen) noise, learned log-variance.
    pred_x0 = (x_t - g((1 - ac).sqrt()) * eps.detach()) / g(ac.sqrt())
    model_mean = g(c0) * pred_x0 + g(ct) * x_t
    frac = (var_out + 1) / 2
    model_logvar = frac * g(torch.log(betas)) + (1 - frac) * g(post_logvar)
    kl = _normal_kl(true_mean, g(post_logvar), model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = (0.5 * (math.log(2 * math.pi) + model_logvar + (x0 - model_mean) ** 2 * torch.exp(-model_logvar)))
    nll = nll.flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl).mean()


def default_loss(model, x0, t, y, noise, x_t, teacher=None, *, scheduler=None, learn_sigma=False):
    """MSE between predicted and true noise; plus the VLB term when the variance is learned."""
    out = model(x_t, t, y)
    c = x0.shape[1]
    eps = out[:, :c]
    mse = F.mse_loss(eps.float(), noise.float())
    terms = {"mse": mse.detach()}
    loss = mse
    if learn_sigma and out.shape[1] == 2 * c:
        vb = vlb_term(scheduler, x0.float(), x_t.float(), t, eps.float(), out[:, c:].float())
        terms["vb"] = vb.detach()
        loss = loss + vb
    return loss, terms


# -- EMA --------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with warm-up (decay <= (1 + step) / (10 + step)): at DiT's 0.9999 a short run's
    EMA would otherwise still be its random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


# -- checkpoints --------------------------------------------------------------------------------
def training_checkpoint(ctx, tag: str) -> Optional[Path]:
    """Where :func:`train_model` keeps the resumable checkpoint of its run ``tag`` (None: no workdir)."""
    return Path(ctx.workdir) / f"{tag}-checkpoint.safetensors" if ctx.workdir else None


def save_checkpoint(path: Path, model, ema, opt, step: int, state: dict) -> None:
    """Model, EMA and AdamW moments as safetensors; step and loss curve in its metadata.
    Written to a temporary file and renamed, so a kill never leaves a torn checkpoint."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: two writers never share one
    save_file(tensors, str(tmp), metadata={"step": str(step), "state": json.dumps(state)})
    tmp.replace(path)


def load_checkpoint(path: Path, model, ema, opt) -> tuple[int, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            p = params[int(i)]
            opt.state.setdefault(p, {})[name] = v.to(p.device)
    return int(meta["step"]), json.loads(meta["state"])


# -- data ---------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of step ``step``: epochs of seeded permutations, a pure function of the step."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
        idx.extend(perm[offset: offset + batch_size - len(idx)].tolist())
    return torch.tensor(idx)


def _batch(ds, idx: torch.Tensor):
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), stack_labels([y for _, y in items], ds)


def stack_labels(labels: list, ds=None):
    """Class indices as a long tensor; captions (captioned data) as the data set encodes them:
    a context tensor, or for SDXL-style encoders a dict of the U-Net's conditioning inputs."""
    if labels and isinstance(labels[0], str):
        return ds.encode_labels(labels)
    return torch.tensor([int(y) for y in labels], dtype=torch.long)


def map_labels(fn, y):
    """``fn`` on a label tensor, or on each tensor of a conditioning dict (SDXL)."""
    return {k: fn(v) for k, v in y.items()} if isinstance(y, dict) else fn(y)


def _drop_to_null(y, null, drop: torch.Tensor):
    """Rows of ``y`` where ``drop`` holds replaced by the empty-prompt conditioning ``null``."""
    def one(v, n):
        return torch.where(drop.view(-1, *([1] * (v.dim() - 1))).to(v.device), n.to(v), v)

    if isinstance(y, dict):
        return {k: one(v, null[k]) for k, v in y.items()}
    return one(y, null)


def text_conditioning(ds, model):
    """The empty-prompt conditioning (a context, or SDXL's dict) when ``ds`` serves captions,
    after checking that ``model`` takes text; None for class-labelled or unlabelled data."""
    null = getattr(ds, "null_context", None)
    if null is None:
        return None
    if not getattr(model, "context_dim", 0):
        from .errors import UserError

        raise UserError(f"data: the data set serves captions, but "
                        f"{type(model).__name__} is not conditioned on text (use a text U-Net preset)")
    return null


def null_class(model, num_classes: int) -> int:
    """The label training feeds when it drops a class for classifier-free guidance: the
    model's ``null_class`` (see harness.hookspecs.harness_backbones), else ``num_classes``."""
    from .errors import UserError

    null = getattr(model, "null_class", num_classes)
    if null is None:
        raise UserError("train.label_dropout > 0 feeds a null class, and the backbone declares no null class "
                        "(its null_class is None; DiT and LaMamba-Diff have one when class_dropout_prob > 0); "
                        "set train.label_dropout: 0 or give the backbone one")
    return int(null)


# -- the loop -----------------------------------------------------------------------------------
def train_model(ctx, model: torch.nn.Module, spec, loss_fn: Optional[LossFn] = None,
                teacher: Optional[torch.nn.Module] = None, tag: str = "train") -> dict:
    """Train ``model`` in place on ``ctx.dataset`` for ``spec.steps`` steps; resumable.

    Args:
        ctx: the cell's :class:`harness.context.CellContext` (data set, seeds, device, workdir).
        model: the network to train (moved to ``ctx.device``).
        spec: a :class:`TrainSpec` (steps, batch_size, lr, weight_decay,
            grad_clip, ema, schedule, timesteps, label_dropout, learn_sigma,
            checkpoint_every (0: every tenth of the run), log_every).
        loss_fn: replaces the objective: ``loss_fn(model, x0, t, y, noise, x_t, teacher) ->
            (scalar loss tensor, {term name: tensor})``. Called inside autocast; the terms are
            averaged into the loss curve. Default: noise MSE, plus DiT's VLB term for the
            variance when ``spec.learn_sigma`` and the model outputs 2*C channels.
        teacher: passed through to ``loss_fn`` (put in eval mode, not trained).
        tag: names the checkpoint file (``<workdir>/<tag>-checkpoint.safetensors``) and the
            seeds of this run's draws, so a teacher and a student run do not collide.

    Returns:
        ``{"ema": the EMA copy of the model (nn.Module; the model itself if spec.ema is
        None), "steps", "loss_curve": [[step, loss, {term: value}], ...], "final_loss",
        "resumed_from", "seconds", "objective"}``; everything but "ema" is JSON.
    """
    device = ctx.device
    ds = ctx.dataset
    if ds is None:
        raise ValueError("training needs a data block (data: {name: shapes, resolution: 32})")
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    learn_sigma = bool(spec.learn_sigma) and model_learns_sigma(model)
    scheduler = make_scheduler(spec.schedule, spec.timesteps, learn_sigma)
    ac = scheduler.alphas_cumprod.to(device)
    custom = loss_fn is not None
    if loss_fn is None:
        def loss_fn(m, x0, t, y, noise, x_t, teacher):  # noqa: E306
            return default_loss(m, x0, t, y, noise, x_t, teacher, scheduler=scheduler, learn_sigma=learn_sigma)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                            weight_decay=spec.weight_decay)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if spec.ema is not None else model
    num_classes = int(getattr(ds, "num_classes", 0) or 0)
    null = null_class(model, num_classes) if num_classes and spec.label_dropout > 0 else None
    null_context = text_conditioning(ds, model)
    data_seed = ctx.seed(f"{tag}-data", shared=True)
    noise_seed = ctx.seed(f"{tag}-noise", shared=True)
    every = spec.checkpoint_every or max(1, spec.steps // 10)
    path = training_checkpoint(ctx, tag)
    step, state = 0, {"loss_curve": [], "seconds": 0.0}
    resumed_from = None
    if path is not None and path.is_file():
        step, state = load_checkpoint(path, model, ema, opt)
        resumed_from = step
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    # Losses since the last log point travel in the checkpoint, so a resumed curve is exact.
    window: list = state.pop("window", [])
    t0 = time.perf_counter()
    while step < spec.steps:
        x0, y = _batch(ds, batch_indices(len(ds), spec.batch_size, step, data_seed))
        gen = torch.Generator().manual_seed(derive_seed(noise_seed, step))
        t = torch.randint(0, spec.timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if num_classes and spec.label_dropout > 0:
            # Classifier-free guidance: dropped labels become the model's null class.
            drop = torch.rand(len(y), generator=gen) < spec.label_dropout
            y = torch.where(drop, torch.full_like(y, null), y)
        elif null_context is not None and spec.label_dropout > 0:  # text: the empty prompt, as SD trains
            drop = torch.rand(len(x0), generator=gen) < spec.label_dropout
            y = _drop_to_null(y, null_context, drop)
        # Randomness inside the model (a backbone's own label dropout) is shared too.
        torch.manual_seed(derive_seed(noise_seed, step, "model"))
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        y = map_labels(lambda v: v.to(device), y)
        a = ac[t].view(-1, *([1] * (x0.dim() - 1)))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            loss, terms = loss_fn(model, x0, t, y if num_classes or null_context is not None else None,
                                  noise, x_t, teacher)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        if ema is not model:
            ema_update(ema, model, spec.ema, step)
        step += 1
        window.append((loss.item(), {k: float(v) for k, v in terms.items()}))
        if step % spec.log_every == 0 or step == spec.steps:
            mean = sum(v for v, _ in window) / len(window)
            named = {k: sum(d[k] for _, d in window) / len(window) for k in window[0][1]}
            state["loss_curve"].append([step, mean, named])
            window = []
        if path is not None and (step % every == 0 or step == spec.steps):
            state["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            save_checkpoint(path, model, ema, opt, step, {**state, "window": window})
    state["seconds"] += time.perf_counter() - t0
    curve = state["loss_curve"]
    objective = "custom" if custom else ("mse+vlb" if learn_sigma else "mse")
    return {"ema": ema, "steps": step, "loss_curve": curve, "final_loss": curve[-1][1] if curve else None,
            "resumed_from": resumed_from, "seconds": round(state["seconds"], 3), "objective": objective,
            "schedule": spec.schedule, "batch_size": spec.batch_size}
