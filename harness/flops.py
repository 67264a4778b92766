"""FLOP counting with fvcore: one multiply-add is one FLOP (the DiT/LaMamba-Diff convention).

fvcore traces the model with TorchScript and counts the ops it has handles for. The trace
runs on the meta device: the model is copied (or built) with meta parameters, so only shapes
exist and nothing is computed; the graph, and so every figure, is the one a trace on real
tensors gives (tests/test_flops.py compares the two op by op). A model that cannot run on
meta tensors (an op that needs data to know its output shape) is traced on its real tensors
instead, and :attr:`FlopCount.method` says which happened.

Nothing is dropped silently: ops fvcore has no handle for are returned as ``uncounted_ops``,
and ops counted as zero by convention (elementwise arithmetic, reductions, lookups) as
``zero_ops`` with their calls and elements, so a contraction written as ``mul`` + ``sum``
shows; a module that has parameters, or reduces its input, yet counts zero is named in
``zero_modules``. Extra handles (SDPA, selective scans, third-party kernels) come from the
``harness_flop_handles`` hook.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

# Ops that do no multiply-adds worth counting (fvcore's own ignore list covers most). They
# are counted as zero, and reported in ``zero_ops``.
_NO_MACS = {
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::silu", "aten::gelu", "aten::softplus", "aten::exp", "aten::sin", "aten::cos", "aten::neg",
    "aten::sigmoid", "aten::tanh", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::mean", "aten::sum",
    "aten::softmax", "aten::unflatten", "aten::repeat", "aten::flip", "aten::pad", "aten::constant_pad_nd",
    "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::roll", "aten::clamp", "aten::arange",
    "aten::embedding", "aten::index", "aten::gather", "aten::where", "aten::masked_fill", "aten::fill_",
}
# A constant made during the trace (a mixer's cached index or mask): no op of the model.
_CONSTANTS = {"aten::lift_fresh"}
# Reading a table is no arithmetic: a module doing only this (a class embedding) counts zero rightly.
_LOOKUPS = {"aten::embedding", "aten::index", "aten::gather", "aten::arange"}
# A module that counts zero yet reduces its input may hide a contraction (mul + sum).
_REDUCTIONS = {"aten::sum", "aten::mean"}

METHOD_META = "meta"
METHOD_REAL = "traced on cpu tensors"


@dataclass
class FlopCount:
    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    params_by_module: dict[str, int] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # no handle: op -> calls
    zero_ops: dict[str, dict] = field(default_factory=dict)  # counted as zero: op -> {calls, elements}
    zero_modules: list[str] = field(default_factory=list)
    modules: dict[str, int] = field(default_factory=dict)  # every submodule by dotted path ("" = all)
    method: str = METHOD_META
    fallback_reason: str | None = None

    def record(self) -> dict:
        """The fields a record or ``harness flops --json`` keeps besides the total."""
        out = {"uncounted_ops": self.uncounted_ops, "zero_ops": self.zero_ops, "zero_flop_modules": self.zero_modules,
               "flops_method": self.method}
        if self.fallback_reason:
            out["flops_fallback_reason"] = self.fallback_reason
        return out


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


class AbstractCountError(RuntimeError):
    """The model does not run on meta tensors; count it on real ones."""


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (no memory, same
    shapes, ties kept): what a count needs of a trained or pruned model."""
    memo: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _to_meta(inputs: dict) -> dict:
    return {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


# Below this many parameters the metrics build and trace a model for real rather than on
# meta: its weights and activations are a few MB, and on two cores a real trace of
# the ablation's tiny DiT took 32 ms of CPU against 44 ms on meta (PyTorch's meta kernels
# are Python, about 1 ms an op). Above it the meta trace wins on time as well as memory.
SMALL_MODEL_PARAMS = 5_000_000


def is_small(model: torch.nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS


def count_flops(model: torch.nn.Module, inputs: dict, handles: dict | None = None,
                abstract: bool = True) -> FlopCount:
    """Multiply-adds of one forward of ``model(**inputs)``.

    ``abstract``: trace a meta copy (no weights, no activations); if the model cannot run on
    meta tensors, trace the real model and inputs and say so in ``method``. A model already on
    the meta device has nothing real to fall back to: :class:`AbstractCountError` then."""
    on_meta = any(p.is_meta for p in model.parameters()) or any(
        isinstance(v, torch.Tensor) and v.is_meta for v in inputs.values())
    if not abstract and not on_meta:
        return _count(model, inputs, handles, METHOD_REAL)
    try:
        if on_meta:
            return _count(model, _to_meta(inputs), handles, METHOD_META)
        return _count(meta_copy(model), _to_meta(inputs), handles, METHOD_META)
    except Exception as exc:  # an op without a meta kernel, or one that reads data (.item())
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if on_meta:
            raise AbstractCountError(reason) from exc
    fc = _count(model, inputs, handles, METHOD_REAL)
    fc.fallback_reason = reason
    return fc


def _count(model: torch.nn.Module, inputs: dict, handles: dict | None, method: str) -> FlopCount:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore scripts helpers at import
        from fvcore.nn import FlopCountAnalysis

    wrapper = _Positional(model, inputs).eval()
    args = tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))
    analysis = FlopCountAnalysis(wrapper, args)
    zero_calls: list[tuple[str, str, int]] = []  # (op, scope, elements) of every zero-counted call
    analysis.set_op_handle(**{op: _zero_handle(op, zero_calls) for op in _NO_MACS}, **{op: None for op in _CONSTANTS})
    if handles:
        analysis.set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    tracing = _meta_tracing() if method == METHOD_META else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), tracing:
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice, once per trace
        total = int(analysis.total())
        per_module = analysis.by_module()
        unsupported = {name: analysis.unsupported_ops(name) for name in per_module}
    modules = {_strip(k): int(v) for k, v in per_module.items() if k == "" or k.startswith("model")}
    by_module, params = {}, {}
    for name, child in model.named_children():
        by_module[name] = modules.get(name, 0)
        params[name] = sum(p.numel() for p in child.parameters())
    rest = total - sum(by_module.values())
    if rest:  # work in the model's own forward, outside any child
        by_module["(top level)"] = rest
        params["(top level)"] = sum(p.numel() for p in model.parameters(recurse=False))
    zero_ops: dict[str, dict] = {}
    for op, _, elements in zero_calls:
        entry = zero_ops.setdefault(op, {"calls": 0, "elements": 0})
        entry["calls"] += 1
        entry["elements"] += elements
    return FlopCount(total, by_module, params, dict(Counter(unsupported.get("", {}))), dict(sorted(zero_ops.items())),
                     _zero_modules(model, modules, zero_calls, unsupported), modules, method)


def _strip(scope: str) -> str:
    """fvcore's module name under the wrapper ("model.a.b") -> the model's own ("a.b")."""
    return "" if scope in ("", "model") else scope[len("model."):]


def _zero_handle(op: str, calls: list):
    """A handle that counts zero and notes the call: op, module scope, size of its largest operand."""
    from fvcore.nn.jit_handles import get_shape

    def handle(inputs, outputs):
        elements = 0
        for v in (*inputs, *outputs):
            if v.isCompleteTensor():
                n = 1
                for d in get_shape(v):
                    n *= d
                elements = max(elements, n)
        scope = outputs[0].node().scopeName().split("/")[-1] if outputs else ""
        calls.append((op, _strip(scope), elements))
        return 0

    return handle


def _zero_modules(model: torch.nn.Module, modules: dict[str, int], zero_calls: list, unsupported: dict) -> list[str]:
    """Modules that count zero although they have parameters (and do more than read a table) or
    reduce their input: likely a contraction no handle sees. Outermost ones only."""
    ops: dict[str, set] = {}
    for op, scope, _ in zero_calls:
        parts = scope.split(".") if scope else []
        for k in range(1, len(parts) + 1):  # every ancestor ran it too
            ops.setdefault(".".join(parts[:k]), set()).add(op)
    for name, counter in unsupported.items():
        name = _strip(name)
        if name and counter:
            ops.setdefault(name, set()).update(counter)
    flagged: list[str] = []
    for name, module in model.named_modules():
        if not name or modules.get(name, 0) or name not in ops:
            continue
        if any(name.startswith(f + ".") for f in flagged):
            continue
        arithmetic = ops[name] - _LOOKUPS
        has_params = any(True for _ in module.parameters())
        if (has_params and arithmetic) or ops[name] & _REDUCTIONS:
            flagged.append(name)
    return flagged


# -- tracing on the meta device ------------------------------------------------------------------
# Two things differ from a trace on real tensors, and are undone here for the trace's duration:
# 1. While TorchScript traces, ``tensor.shape`` returns traced 0-dim tensors. PyTorch's meta
#    kernels written in Python (convolution's, among others) then compute with tensors where
#    they expect ints, and fail. They run here with the trace paused.
# 2. The tracer records a convolution as ``aten::_convolution`` (fvcore's conv rule), which a
#    real device reaches through ``aten::convolution``'s composite kernel; meta has a kernel of
#    its own for ``aten::convolution`` that skips it, so the convolution would be missing.
# The wrapping kernels are registered once per process (registering ~600 costs more than a
# small model's whole count) and are inert outside a count: they call PyTorch's own kernel.
_ACTIVE = [False]
_LIBRARY: list = []


@contextlib.contextmanager
def _meta_tracing():
    if not _LIBRARY:
        _LIBRARY.append(_register_meta_kernels())
    _ACTIVE[0] = True
    try:
        yield
    finally:
        _ACTIVE[0] = False


def _register_meta_kernels():
    from torch._decomp import global_decomposition_table
    from torch._meta_registrations import _meta_lib_dont_use_me_use_register_meta as meta_lib

    outside = torch._C._dispatch_tls_local_exclude_set()  # the Tracer key is not excluded here

    def set_state(state):
        # Inside a kernel the tracer's dispatch key is excluded, and setting the state asserts
        # it is not: restore the outer key set for the call.
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), outside):
            torch._C._set_tracing_state(state)

    def paused(fn):
        def kernel(*args, **kwargs):
            state = torch._C._get_tracing_state() if _ACTIVE[0] else None
            if state is None:
                return fn(*args, **kwargs)
            set_state(None)
            try:
                return fn(*args, **kwargs)
            finally:
                set_state(state)
        return kernel

    convolution_meta = None
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel", by design
        seen = set()
        for table in ("meta", "post_autograd", "pre_autograd"):  # the precedence PyTorch registers with
            for op, fn in global_decomposition_table[table].items():
                if not isinstance(op, torch._ops.OpOverload) or op in seen:
                    continue
                seen.add(op)
                if f"{op.namespace}/{op.name().split('::')[-1]}/Meta" in meta_lib._op_impls:
                    lib.impl(op, paused(fn), "Meta")
                    if op is torch.ops.aten.convolution.default:
                        convolution_meta = fn

        def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
            if not _ACTIVE[0]:
                return convolution_meta(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                                        groups)
            return torch.ops.aten._convolution.default(input, weight, bias, stride, padding, dilation, transposed,
                                                       output_padding, groups, False, False, True, True)

        if convolution_meta is not None:  # else nothing to wrap; tests/test_flops.py checks the graph still matches
            lib.impl("convolution", convolution, "Meta")
    return lib


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
