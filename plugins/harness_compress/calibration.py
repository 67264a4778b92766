"""Noised inputs for pruning criteria (calibration) and for the ``output_loss`` metric (held out).

LAPTOP-Diff's objective is E || eps_pruned(x_t, t) - eps_orig(x_t, t) ||^2 over data and
timesteps, so a calibration set is a few noised training images at timesteps spread evenly
across the schedule. Its seeds are shared by all cells of a suite (``shared=True``), so every
criterion scores on the same inputs. The metric draws its own set from the validation split
with other seeds: a criterion fitted to its calibration batch must also win on data it never
saw, or the comparison rewards overfitting the batch.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn

from harness.errors import UserError
from harness.training import stack_labels

from .units import Skip, _parent, skip_kind


def alphas_cumprod(schedule: str = "linear", timesteps: int = 1000) -> torch.Tensor:
    """The training schedule's cumulative alphas (diffusers' DDPM betas: linear 1e-4..0.02, or
    squaredcos_cap_v2), written out so that scoring a DiT does not import diffusers."""
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / timesteps) / f(i / timesteps), 0.999) for i in range(timesteps)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return torch.cumprod(1 - betas, 0).float()


def noise_channels(ctx) -> int:
    return int(ctx.input_spec["in_channels"])


def calibration_inputs(ctx, model: nn.Module, batch_size: int = 8, timesteps: int = 8,
                       split: str = "train", purpose: str = "calibration",
                       prompts: tuple[str, str] | None = None) -> list[dict]:
    """One forward-kwargs dict per timestep (evenly spaced over the schedule); each holds the
    same images of ``split``, noised at that step, plus ``noise`` (the target of the task loss).
    ``purpose`` names the seed stream, so a held-out set never repeats the calibration draw.
    ``prompts`` (file, pipeline) conditions a text U-Net on encoded prompts; the calibration
    set takes them from the cell's prune block unless given."""
    gen = ctx.generator(purpose, shared=True)
    device = next(model.parameters()).device
    spec = ctx.train
    abar = alphas_cumprod(spec.schedule, spec.timesteps)
    base = ctx.example_inputs(batch_size, model=model, device=device, generator=gen)
    x0 = _data_images(ctx, batch_size, gen, split)
    labels = None
    if x0 is not None:
        x0, labels = x0
        x0 = x0.to(device)
    else:  # no data block: standard normal stands in for latents
        x0 = torch.randn(base["x"].shape, generator=gen).to(device)
    y = base.get("y")
    if isinstance(labels, dict):  # SDXL-style captioned data: context, pooled embedding, size ids
        base.update({k: v.to(device=device, dtype=base[k].dtype) for k, v in labels.items() if k in base})
    elif labels is not None and y is not None:
        same_kind = (labels.dtype == y.dtype == torch.long or  # class indices
                     (labels.is_floating_point() and y.is_floating_point() and labels.shape[-1] == y.shape[-1]))
        if same_kind:  # class indices, or the text contexts of captioned data
            base["y"] = labels.to(device=device, dtype=y.dtype)
    prune = ctx.specs.get("prune")
    if prompts is None and purpose == "calibration" and prune is not None and prune.calibration_prompts:
        prompts = (prune.calibration_prompts, prune.calibration_pipeline)
    if prompts is not None:
        base.update(prompt_context(model, base, *prompts, batch_size, gen, device))
    noise = torch.randn(x0.shape, generator=gen).to(device)
    steps = torch.linspace(0, spec.timesteps - 1, timesteps + 2)[1:-1].round().long()  # skip the two ends
    out = []
    for step in steps.tolist():
        a = abar[step]
        kwargs = dict(base)
        kwargs["x"] = a.sqrt() * x0 + (1 - a).sqrt() * noise
        kwargs["t"] = torch.full((batch_size,), step, dtype=torch.long, device=device)
        out.append({"inputs": kwargs, "noise": noise})
    return out


def prompt_context(model: nn.Module, base: dict, prompts_file: str, pipeline: str, n: int,
                   gen: torch.Generator, device) -> dict:
    """A text U-Net's conditioning from ``n`` prompts drawn from the file: the pipeline's own
    ``encode_prompt`` (SD: last hidden state; SDXL: both encoders and the pooled embedding),
    no classifier-free guidance. The draw follows ``gen``, so the held-out set draws its own."""
    from harness_t2i import encode_prompts, read_prompts

    y = base.get("y")
    if y is None or y.dtype == torch.long:
        raise UserError(f"prompts were given, but {type(model).__name__} is not conditioned on text")
    pool = read_prompts(prompts_file)
    chosen = [pool[i] for i in torch.randint(0, len(pool), (n,), generator=gen).tolist()]
    embeds, pooled = encode_prompts(pipeline, chosen)
    out = {"y": embeds}
    if "text_embeds" in base:  # SDXL's pooled embedding
        if pooled is None:
            raise UserError(f"pipeline {pipeline!r} gives no pooled text embedding; this U-Net needs one (SDXL)")
        out["text_embeds"] = pooled
    for key, value in out.items():
        if value.shape[-1] != base[key].shape[-1]:
            raise UserError(f"pipeline {pipeline!r} encodes {key} of width {value.shape[-1]}; "
                            f"the U-Net takes {base[key].shape[-1]}")
    return {k: v.to(device=device, dtype=base[k].dtype) for k, v in out.items()}


def _data_images(ctx, n: int, gen: torch.Generator, split: str = "train"):
    ds = ctx.dataset if split == "train" else (ctx.make_dataset(split) if ctx.config.data else None)
    if ds is None:
        return None
    if len(ds) < n:
        raise UserError(f"data: the {split} split of {ctx.config.data.name!r} has {len(ds)} images; "
                        f"{n} were asked for (lower the batch size, or use a larger data set)")
    idx = torch.randperm(len(ds), generator=gen)[:n].tolist()
    items = [ds[i] for i in idx]
    x = torch.stack([torch.as_tensor(i[0]) for i in items]).float()
    y = stack_labels([i[1] for i in items], ds)
    return x, y


def predict(model: nn.Module, batch: dict, channels: int) -> torch.Tensor:
    """The noise prediction (the learned-variance half, if any, is dropped)."""
    out = model(**batch["inputs"])
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[:, :channels]


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list[dict], channels: int) -> list[torch.Tensor]:
    return [predict(model, b, channels) for b in batches]


@torch.no_grad()
def output_loss(model: nn.Module, batches: list[dict], refs: list[torch.Tensor], channels: int) -> float:
    """Mean squared difference to the reference outputs, averaged over timesteps."""
    losses = [torch.mean((predict(model, b, channels) - r) ** 2).item() for b, r in zip(batches, refs)]
    return float(sum(losses) / len(losses))


@contextmanager
def evaluating(*models: nn.Module):
    """The models in eval mode for the block, each back in its own mode after (even on error)."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@contextmanager
def removed(model: nn.Module, units: list):
    """The model with ``units`` removed. Units that become the identity are swapped for a
    :class:`Skip` in place (and restored on exit); a skip-connection pair changes the
    structure, so then a pruned copy is yielded instead."""
    from .units import apply_plan, merge_plans

    if any(u.drop for u in units):
        yield apply_plan(copy.deepcopy(model), merge_plans(units))
        return
    saved = []
    try:
        for unit in units:
            parent, attr = _parent(model, unit.name)
            module = parent[int(attr)] if isinstance(parent, nn.ModuleList) else getattr(parent, attr)
            saved.append((parent, attr, module))
            _set(parent, attr, Skip(skip_kind(module), origin=unit.name))
        yield model
    finally:
        for parent, attr, module in reversed(saved):
            _set(parent, attr, module)


def _set(parent: nn.Module, attr: str, module: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)
