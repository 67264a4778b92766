"""Calibration sets: noised inputs on which pruning criteria score units and metrics compare
a model with its teacher.

LAPTOP-Diff's objective is E || eps_pruned(x_t, t) - eps_orig(x_t, t) ||^2 over data and
timesteps, so a calibration set is a few noised training images at timesteps spread evenly
across the schedule. Its seeds are shared by all cells of a suite (``shared=True``), so every
criterion scores on the same inputs. A metric draws its own set (another ``split`` and
``purpose``): a criterion fitted to its calibration batch must also win on data it never saw.

The stage that scores units says how large the set is (and how text models are conditioned)
by setting ``ctx.calibration`` to a :class:`Calibration`; :func:`calibration_inputs` reads it,
so a third party's criterion gets exactly the set the built-in ones get.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn

from .errors import UserError

# ``condition(model, inputs, batch_size, generator, device) -> dict``: conditioning inputs that
# replace those of ``inputs`` (a text U-Net's encoded prompts), drawn from ``generator``.
Condition = Callable[[nn.Module, dict, int, torch.Generator, torch.device], dict]


@dataclass(frozen=True)
class Calibration:
    """How large a calibration set is: ``batch_size`` images noised at ``timesteps`` steps
    spread over the schedule, and optionally how a text model is conditioned (``condition``,
    see :data:`Condition`; None: the data set's labels or captions, else random ones)."""

    batch_size: int = 8
    timesteps: int = 8
    condition: Optional[Condition] = None

    def __post_init__(self):
        if self.batch_size < 1 or self.timesteps < 1:
            raise UserError(f"calibration: batch_size and timesteps must be >= 1 (got {self.batch_size}, "
                            f"{self.timesteps})")

    def with_size(self, batch_size: int | None = None, timesteps: int | None = None) -> "Calibration":
        """This set with the size a component asks for instead (None keeps the stage's)."""
        return replace(self, batch_size=batch_size or self.batch_size, timesteps=timesteps or self.timesteps)


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
    """Channels of the noise the cell's backbone predicts (its input channels)."""
    return int(ctx.input_spec["in_channels"])


def calibration_inputs(ctx, model: nn.Module, calibration: Calibration | None = None, *,
                       split: str = "train", purpose: str = "calibration") -> list[dict]:
    """The calibration set of the cell: one dict per timestep (evenly spaced over the cell's
    schedule, the two ends left out), each ``{"inputs": forward keyword arguments, "noise":
    the noise added}``. Every timestep noises the same images of ``split``.

    ``calibration`` defaults to ``ctx.calibration`` (what the running stage asks for), else
    :class:`Calibration`'s defaults. ``purpose`` names the seed stream, so a held-out set
    (another purpose, the ``val`` split) never repeats the calibration draw. Without a data
    block, standard normal draws stand in for the images."""
    calibration = calibration or getattr(ctx, "calibration", None) or Calibration()
    batch_size, timesteps = calibration.batch_size, calibration.timesteps
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
    else:
        x0 = torch.randn(base["x"].shape, generator=gen).to(device)
    y = base.get("y")
    if isinstance(labels, dict):  # SDXL-style captioned data: context, pooled embedding, size ids
        base.update({k: v.to(device=device, dtype=base[k].dtype) for k, v in labels.items() if k in base})
    elif labels is not None and y is not None:
        same_kind = (labels.dtype == y.dtype == torch.long or  # class indices
                     (labels.is_floating_point() and y.is_floating_point() and labels.shape[-1] == y.shape[-1]))
        if same_kind:  # class indices, or the text contexts of captioned data
            base["y"] = labels.to(device=device, dtype=y.dtype)
    if calibration.condition is not None:
        base.update(calibration.condition(model, base, batch_size, gen, device))
    noise = torch.randn(x0.shape, generator=gen).to(device)
    steps = torch.linspace(0, spec.timesteps - 1, timesteps + 2)[1:-1].round().long()
    out = []
    for step in steps.tolist():
        a = abar[step]
        kwargs = dict(base)
        kwargs["x"] = a.sqrt() * x0 + (1 - a).sqrt() * noise
        kwargs["t"] = torch.full((batch_size,), step, dtype=torch.long, device=device)
        out.append({"inputs": kwargs, "noise": noise})
    return out


def _data_images(ctx, n: int, gen: torch.Generator, split: str = "train"):
    from .training import stack_labels

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


def predict_noise(model: nn.Module, batch: dict, channels: int) -> torch.Tensor:
    """The model's noise prediction on one calibration batch (a learned-variance half, if
    any, dropped; a diffusers output's ``sample`` unwrapped)."""
    out = model(**batch["inputs"])
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[:, :channels]


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list[dict], channels: int) -> list[torch.Tensor]:
    """The noise predictions of ``model`` (a teacher) on every batch."""
    return [predict_noise(model, b, channels) for b in batches]


@torch.no_grad()
def output_loss(model: nn.Module, batches: list[dict], refs: list[torch.Tensor], channels: int) -> float:
    """Mean squared difference to the reference outputs, averaged over timesteps."""
    losses = [torch.mean((predict_noise(model, b, channels) - r) ** 2).item() for b, r in zip(batches, refs)]
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
