"""FLOP counting with fvcore: one multiply-add is one FLOP (the DiT/LaMamba-Diff convention).

fvcore traces the model with TorchScript and counts the ops it has handles for. Ops it does
not know are reported, never silently dropped: :func:`count_flops` returns them so that
a record can say what was left out. Extra handles (SDPA, selective scans, third-party
kernels) come from the ``harness_flop_handles`` hook.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

# Ops that do no multiply-adds worth counting (fvcore's own ignore list covers most).
_NO_MACS = {
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::silu", "aten::gelu", "aten::softplus", "aten::exp", "aten::sin", "aten::cos", "aten::neg",
    "aten::sigmoid", "aten::tanh", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::mean", "aten::sum",
    "aten::softmax", "aten::unflatten", "aten::repeat", "aten::flip", "aten::pad", "aten::constant_pad_nd",
    "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::roll", "aten::clamp", "aten::arange",
    "aten::embedding", "aten::index", "aten::gather", "aten::where", "aten::masked_fill", "aten::fill_",
    "aten::lift_fresh",  # a constant made during the trace (a mixer's cached index or mask)
}


@dataclass
class FlopCount:
    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    params_by_module: dict[str, int] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)


class _Positional(torch.nn.Module):
    """fvcore passes inputs positionally; a backbone's forward takes keywords, some None."""

    def __init__(self, model: torch.nn.Module, kwargs: dict):
        super().__init__()
        self.model = model
        self.keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self.fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.keys, tensors)), **self.fixed)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "sample", out)


def count_flops(model: torch.nn.Module, inputs: dict, handles: dict | None = None) -> FlopCount:
    """Multiply-adds of one forward of ``model(**inputs)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore scripts helpers at import
        from fvcore.nn import FlopCountAnalysis

    wrapper = _Positional(model, inputs).eval()
    args = tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))
    analysis = FlopCountAnalysis(wrapper, args)
    analysis.set_op_handle(**{op: None for op in _NO_MACS})
    if handles:
        analysis.set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice, once per trace
        total = int(analysis.total())
        per_module = analysis.by_module()
        uncounted = Counter(analysis.unsupported_ops())
    by_module, params = {}, {}
    for name, child in model.named_children():
        by_module[name] = int(per_module.get(f"model.{name}", 0))
        params[name] = sum(p.numel() for p in child.parameters())
    rest = total - sum(by_module.values())
    if rest:  # work in the model's own forward, outside any child
        by_module["(top level)"] = rest
        params["(top level)"] = sum(p.numel() for p in model.parameters(recurse=False))
    return FlopCount(total, by_module, params, dict(uncounted))


def sdpa_flop(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention: Q K^T and A V, as multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(i) for i in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    lq, dk = q[-2], q[-1]
    lk, dv = k[-2], v[-1]
    return batch * lq * lk * dk + batch * lq * lk * dv


def baddbmm_flop(inputs, outputs) -> int:
    """aten::baddbmm (diffusers' classic attention): the batched product only."""
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[1]), get_shape(inputs[2])
    return a[0] * a[1] * a[2] * b[2]
