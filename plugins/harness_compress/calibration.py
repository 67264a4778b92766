"""The compress plugin's calibration sets: the core's (:func:`harness.calibration_inputs`),
conditioned, for text U-Nets, on prompts encoded by a pipeline's text encoder.

The ``prune`` stage puts its calibration set on the cell (``ctx.calibration``, a
:class:`harness.Calibration`) before criteria score units: its ``calibration_batch`` and
``calibration_timesteps``, and its ``calibration_prompts`` when given. Every criterion,
built-in or a third party's, then draws the same inputs.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from harness import (Calibration, UserError, evaluating, noise_channels, output_loss, reference_outputs,
                     remove_units)
from harness import calibration_inputs as core_calibration_inputs
from harness import predict_noise as predict

removed = remove_units
__all__ = ["calibration_inputs", "evaluating", "noise_channels", "output_loss", "predict", "prompt_condition",
           "reference_outputs", "removed", "stage_calibration"]


def stage_calibration(spec) -> Calibration:
    """The calibration set a ``prune`` block asks for."""
    prompts = (spec.calibration_prompts, spec.calibration_pipeline) if spec.calibration_prompts else None
    return Calibration(spec.calibration_batch, spec.calibration_timesteps, prompt_condition(prompts))


def prompt_condition(prompts: tuple[str, str] | None):
    """A :data:`harness.calibration.Condition` from ``(prompt file, pipeline)``, or None."""
    return partial(prompt_context, prompts_file=prompts[0], pipeline=prompts[1]) if prompts else None


def calibration_inputs(ctx, model: nn.Module, batch_size: int = 8, timesteps: int = 8,
                       split: str = "train", purpose: str = "calibration",
                       prompts: tuple[str, str] | None = None) -> list[dict]:
    """:func:`harness.calibration_inputs` at this size; ``prompts`` (file, pipeline) conditions
    a text U-Net on encoded prompts, which the calibration set takes from the cell's prune
    block unless given."""
    prune = ctx.specs.get("prune")
    if prompts is None and purpose == "calibration" and prune is not None and prune.calibration_prompts:
        prompts = (prune.calibration_prompts, prune.calibration_pipeline)
    return core_calibration_inputs(ctx, model, Calibration(batch_size, timesteps, prompt_condition(prompts)),
                                   split=split, purpose=purpose)


def prompt_context(model: nn.Module, base: dict, n: int, gen: torch.Generator, device, *,
                   prompts_file: str, pipeline: str) -> dict:
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
