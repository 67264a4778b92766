"""Post-training dynamic int8 quantisation as a diffusion-harness stage.

``quantize: {dtype: qint8}`` in a cell replaces every ``nn.Linear`` of the (trained, pruned)
backbone by PyTorch's dynamically quantised linear layer (``torch.ao.quantization.
quantize_dynamic``): int8 weights with one scale per tensor, activations quantised on the fly
at each call, computed on the CPU. The unquantised model stays as ``ctx.teacher``, so the
compress plugin's ``output_loss`` measures what the quantisation costs in accuracy, and the
``weight_bytes`` metric what it saves in storage.
"""
from __future__ import annotations

import io
import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import harness
from harness import Stage, UserError


class QuantizeSpec(BaseModel):
    """The ``quantize:`` block."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["qint8", "float16"] = "qint8"  # float16: weights stored as half, computed in float


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as ``torch.save`` writes it (packed int8 weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def quantize(ctx, spec: QuantizeSpec) -> None:
    if ctx.device.type != "cpu":
        raise UserError(f"quantize: dynamic quantisation runs on the CPU; set device: cpu (got {ctx.device})")
    original = ctx.model.eval()
    linears = sum(isinstance(m, nn.Linear) for m in original.modules())
    with warnings.catch_warnings():  # torch.ao announces its move to torchao on every call
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(original, {nn.Linear},
                                                           dtype=getattr(torch, spec.dtype), inplace=False)
    ctx.teacher = original  # what output_loss compares against
    ctx.model = quantized
    ctx.extra["quantize"] = {"dtype": spec.dtype, "linear_layers": linears, "engine": torch.backends.quantized.engine,
                             "bytes_before": weight_bytes(original), "bytes_after": weight_bytes(quantized)}


class WeightBytes:
    """Stored size of the cell's model weights (torch.save of its state dict), in MiB."""

    name, direction, unit, role = "weight_bytes", "lower", "MiB", "cost"

    def __call__(self, ctx) -> dict:
        size = weight_bytes(ctx.model)
        return {"value": size / 2 ** 20, "bytes": size}


@harness.hookimpl
def harness_stages():
    return {"quantize": Stage(schema=QuantizeSpec, run=quantize, after=("train", "prune", "distill"),
                              description="post-training dynamic int8 quantisation of linear layers")}


@harness.hookimpl
def harness_metrics():
    return {"weight_bytes": WeightBytes}
