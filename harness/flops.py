"""FLOP counting in two conventions, both on the meta device.

``fvcore`` (the default): one multiply-add is one FLOP, every op of the traced graph that
fvcore has a handle for (the DiT/LaMamba-Diff convention; attention products included).
``thop``: the multiply-adds thop's module rules count, the way BK-SDM reports its MACs (see
:func:`count_thop`): convolutions, linear layers and the batch/layer/instance norms; no
attention products, no GroupNorm.

The model is traced with TorchScript as fvcore's ``FlopCountAnalysis`` traces it, and each op
of the graph is counted with fvcore's handle for it, as that analysis counts (done here in one
pass, :func:`_walk`; tests/test_flops.py checks graph and figures against fvcore's own). The
trace runs on the meta device: the model is copied (or built) with meta parameters, so only shapes
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
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from numbers import Number

import numpy as np
import torch

from .errors import UserError, suggest

# The conventions a count can follow, and the one line a record or the CLI says about each.
CONVENTIONS = {
    "fvcore": "1 multiply-add = 1 FLOP (fvcore)",
    "thop": "multiply-adds of conv, linear and batch/layer/instance-norm modules (thop 0.1.1's rules; BK-SDM's MACs)",
}
DEFAULT_CONVENTION = "fvcore"


def check_convention(name) -> str:
    if name not in CONVENTIONS:
        raise UserError(f"FLOP convention {name!r} is not known{suggest(str(name), CONVENTIONS)}")
    return name

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
    convention: str = DEFAULT_CONVENTION
    # thop: module classes counted by a rule, and leaf classes that ran without one (counted
    # zero, as thop does): class name -> calls
    rule_modules: dict[str, int] = field(default_factory=dict)
    no_rule_modules: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        """The fields a record or ``harness flops --json`` keeps besides the total."""
        if self.convention == "thop":
            out = {"counted_modules": self.rule_modules, "no_rule_modules": self.no_rule_modules}
        else:
            out = {"uncounted_ops": self.uncounted_ops, "zero_ops": self.zero_ops,
                   "zero_flop_modules": self.zero_modules}
        out["flops_method"] = self.method
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


# A model already built for real (trained, pruned) with fewer parameters than this is traced
# as it is, not copied to meta first: the ablation's tiny DiT (0.25M) took 18.6 ms of CPU
# traced for real against 23.4 ms copied and traced on meta (2.8 ms of it the copy); DiT-S/2
# (33M) 246 ms against 97 ms. A model not built yet is always counted on meta.
SMALL_MODEL_PARAMS = 5_000_000


def is_small(model: torch.nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS


def count_flops(model: torch.nn.Module, inputs: dict, handles: dict | None = None,
                abstract: bool = True, convention: str = DEFAULT_CONVENTION) -> FlopCount:
    """Multiply-adds of one forward of ``model(**inputs)``, in ``convention`` (:data:`CONVENTIONS`).

    ``abstract``: count on a meta copy (no weights, no activations); if the model cannot run on
    meta tensors, count the real model and inputs and say so in ``method``. A model already on
    the meta device has nothing real to fall back to: :class:`AbstractCountError` then.
    ``handles`` are fvcore op handles; thop's convention counts modules and takes none."""
    check_convention(convention)
    count = _count if convention == "fvcore" else (lambda m, i, _, method: count_thop(m, i, method))
    on_meta = any(p.is_meta for p in model.parameters()) or any(
        isinstance(v, torch.Tensor) and v.is_meta for v in inputs.values())
    if not abstract and not on_meta:
        return count(model, inputs, handles, METHOD_REAL)
    try:
        if on_meta:
            return count(model, _to_meta(inputs), handles, METHOD_META)
        return count(meta_copy(model), _to_meta(inputs), handles, METHOD_META)
    except Exception as exc:  # an op without a meta kernel, or one that reads data (.item())
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if on_meta:
            raise AbstractCountError(reason) from exc
    fc = count(model, inputs, handles, METHOD_REAL)
    fc.fallback_reason = reason
    return fc


def _count(model: torch.nn.Module, inputs: dict, handles: dict | None, method: str) -> FlopCount:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore scripts helpers at import
        from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
        from fvcore.nn.jit_analysis import _IGNORED_OPS, _named_modules_with_dup

    wrapper = _Positional(model, inputs).eval()
    args = tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))
    aliases: dict = {}  # fvcore's canonical name of every module (a shared one keeps its first name)
    for name, module in _named_modules_with_dup(wrapper):
        aliases.setdefault(module, name)
        aliases[name] = aliases[module]
    tracing = _meta_tracing() if method == METHOD_META else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), tracing:
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice, once per trace
        graph = scoped_trace(wrapper, args, aliases)
    rules = {**_DEFAULT_SUPPORTED_OPS, **(handles or {})}
    ignored = set(_IGNORED_OPS) | _CONSTANTS | {op for op, h in rules.items() if h is None}
    walk = _walk(graph, rules, ignored, {op for op in _NO_MACS if op not in (handles or {})})
    counts = {aliases[m]: 0 for m in aliases if isinstance(m, torch.nn.Module)}
    counts.update(walk.counts)
    modules = {_strip(k): v for k, v in counts.items() if k == "" or k.startswith("model")}
    total = walk.counts.get("", 0)
    by_module, params = _by_child(model, modules, total)
    zero_ops: dict[str, dict] = {}
    for op, _, elements in walk.zero_calls:
        entry = zero_ops.setdefault(op, {"calls": 0, "elements": 0})
        entry["calls"] += 1
        entry["elements"] += elements
    return FlopCount(total, by_module, params, walk.uncounted, dict(sorted(zero_ops.items())),
                     _zero_modules(model, modules, walk), modules, method)


def _by_child(model: torch.nn.Module, modules: dict[str, int], total: int) -> tuple[dict, dict]:
    """FLOPs and parameters of each direct child; what no child holds (work in the model's own
    forward, or a rule on the model itself under thop) as "(top level)"."""
    by_module, params = {}, {}
    for name, child in model.named_children():
        by_module[name] = modules.get(name, 0)
        params[name] = sum(p.numel() for p in child.parameters())
    rest = total - sum(by_module.values())
    if rest:
        by_module["(top level)"] = rest
        params["(top level)"] = sum(p.numel() for p in model.parameters(recurse=False))
    return by_module, params


def scoped_trace(module: torch.nn.Module, args: tuple, names: dict):
    """The TorchScript graph of ``module(*args)``, each node in the scope of the module that
    ran it (``names[module]``): the graph fvcore's ``_get_scoped_trace_graph`` makes, node for
    node (tests/test_flops.py compares them), at less cost. fvcore goes through
    ``torch.jit._get_trace_graph``, which names every traced value by searching the calling
    frame's locals for it; nothing here reads those names, and on the tiny DiT of
    suites/ablation.yaml the search was a tenth of the trace."""
    hooks = []

    def enter(name):
        def hook(mod, inputs):
            state = torch._C._get_tracing_state()
            if state:
                state.push_scope(name)
        return hook

    def leave(mod, inputs, outputs):
        state = torch._C._get_tracing_state()
        if state:
            state.pop_scope()

    for mod in module.modules():  # each module once, as fvcore hooks them
        hooks.append(mod.register_forward_pre_hook(enter(names[mod])))
        hooks.append(mod.register_forward_hook(leave))
    # as torch.jit._get_trace_graph: the state dict's tensors are the graph's inputs after the
    # arguments (a buffer left out of the state dict is traced as a constant, as there)
    state, seen = [], set()
    for t in module.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            state.append(t)
    n = len(args)
    try:
        graph, _ = torch._C._create_graph_by_tracing(lambda *flat: module(*flat[:n]), [*args, *state],
                                                     lambda value: "", True, False)
    finally:
        for h in hooks:
            h.remove()
    return graph


@dataclass
class _Walk:
    counts: dict[str, int]  # FLOPs by module scope, each op added to its module and every ancestor
    uncounted: dict[str, int]  # op -> calls, over the whole model
    zero_calls: list[tuple[str, str, int]]  # (op, scope, elements) of every op counted as zero
    scope_ops: dict[str, set]  # zero-counted and uncounted ops run by each module or its descendants


def _walk(graph, rules: dict, ignored: set, zero: set) -> _Walk:
    """One pass over the traced graph, counting as fvcore's ``FlopCountAnalysis`` does (same
    handles, same ignored ops, each op in its module and in all that module's ancestors), that
    also collects what a record reports besides the total: the ops counted as zero with their
    sizes, and the ops no handle counts, by module. fvcore's analysis keeps a Counter per
    module and op and answers per-module queries afterwards; on the tiny DiT of
    suites/ablation.yaml that, with a handle per zero-counted op, cost 6 ms over the trace,
    this pass under 1 ms."""
    counts: dict[str, int] = {}
    uncounted: Counter = Counter()
    zero_calls: list[tuple[str, str, int]] = []
    scope_ops: dict[str, set] = {}
    lineage: dict[str, tuple[str, ...]] = {}  # scope -> itself and its ancestors, "" included

    def ancestors(scope: str) -> tuple[str, ...]:
        if scope not in lineage:
            parts = scope.split(".") if scope else []
            lineage[scope] = ("",) + tuple(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        return lineage[scope]

    for node in graph.nodes():
        kind = node.kind()
        if kind == "prim::PythonOp":
            kind += "." + node.pyname()
        if kind in zero:
            elements = 0
            for v in (*_inputs(node), *_outputs(node)):
                if v.isCompleteTensor():
                    elements = max(elements, math.prod(v.type().sizes()))
            scope = _strip(node.scopeName().split("/")[-1])
            zero_calls.append((kind, scope, elements))
            for name in ancestors(scope)[1:]:
                scope_ops.setdefault(name, set()).add(kind)
            continue
        handle = rules.get(kind)
        if handle is None:
            if kind in ignored or (kind.startswith("prim::") and not kind.startswith(
                    ("prim::PythonOp", "prim::CallFunction"))):
                continue
            uncounted[kind] += 1
            for name in ancestors(_strip(node.scopeName().split("/")[-1]))[1:]:
                scope_ops.setdefault(name, set()).add(kind)
            continue
        flops = handle(_inputs(node), _outputs(node))
        scope = node.scopeName().split("/")[-1]
        if not isinstance(flops, Number):
            for v in flops.values():
                if not isinstance(v, (int, float, np.integer, np.floating)):
                    raise ValueError(f"FLOP handle for {kind} returned {type(v).__name__}; expected a number")
            flops = sum(flops.values())
        for name in ancestors(scope):
            counts[name] = counts.get(name, 0) + flops
    return _Walk({k: int(v) for k, v in counts.items()}, dict(uncounted), zero_calls, scope_ops)


# By index: a node's inputs() iterator took 12 us a node here, four times the indexed reads.
def _inputs(node) -> list:
    return [node.inputsAt(i) for i in range(node.inputsSize())]


def _outputs(node) -> list:
    return [node.outputsAt(i) for i in range(node.outputsSize())]


def _strip(scope: str) -> str:
    """fvcore's module name under the wrapper ("model.a.b") -> the model's own ("a.b")."""
    return "" if scope in ("", "model") else scope[len("model."):]


def _zero_modules(model: torch.nn.Module, modules: dict[str, int], walk: _Walk) -> list[str]:
    """Modules that count zero although they have parameters (and do more than read a table) or
    reduce their input: likely a contraction no handle sees. Outermost ones only."""
    flagged: list[str] = []
    for name, module in model.named_modules():
        if not name or modules.get(name, 0) or name not in walk.scope_ops:
            continue
        if any(name.startswith(f + ".") for f in flagged):
            continue
        ops = walk.scope_ops[name]
        arithmetic = ops - _LOOKUPS
        has_params = any(True for _ in module.parameters())
        if (has_params and arithmetic) or ops & _REDUCTIONS:
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
# During a count, the most common ops take a shape-only kernel (harness.meta_kernels) in place
# of PyTorch's Python reference kernels, which cost up to milliseconds a call.
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


def _shape_only(lean, fn):
    """During a count, ``lean`` (harness.meta_kernels) where it knows the case, else PyTorch's ``fn``."""
    def kernel(*args, **kwargs):
        if _ACTIVE[0]:
            out = lean(*args, **kwargs)
            if out is not None:
                return out
        return fn(*args, **kwargs)
    return kernel


def _register_meta_kernels():
    from torch._decomp import global_decomposition_table
    from torch._meta_registrations import _meta_lib_dont_use_me_use_register_meta as meta_lib

    from .meta_kernels import KERNELS

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
                    lib.impl(op, paused(_shape_only(KERNELS[op], fn) if op in KERNELS else fn), "Meta")
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


# -- thop's convention ---------------------------------------------------------------------------
# BK-SDM counts its MACs with ``thop.profile`` (Nota-NetsPresso/BK-SDM, src/count_macs_params.py),
# and thop counts modules, not ops: a forward hook per module class it has a rule for
# (thop/profile.py ``register_hooks``, thop/vision/basic_hooks.py and calc_func.py of the PyPI
# release thop 0.1.1, Lyken17/pytorch-OpCounter). Everything else counts zero: attention's
# products (a function call, not a module), GroupNorm, activations. The rules below are those
# of thop 0.1.1, formula for formula. Two deliberate differences: a subclass counts as its base
# (thop matches the exact class, so under thop diffusers' LoRACompatibleConv, a Conv2d
# subclass, would count zero), and the RNN family, which no backbone here has, is left
# without a rule (it shows as such).
# ultralytics-thop 2.x, thop's successor on PyPI, also counts GroupNorm and attention products
# (its 2.2.3 gives 402 G for SD-1.5, near fvcore's figure): this convention is the one BK-SDM's
# figures were counted in.
def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _thop_conv(m, x, y) -> int:  # calculate_conv2d_flops: output volume x (C_in / groups) x kernel; no bias
    return y.numel() * (x[0].shape[1] // m.groups) * _prod(m.weight.shape[2:])


def _thop_norm(m, x, y) -> int:  # calculate_norm: 2 per element, twice that with an affine transform
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return 2 * x[0].numel() * (2 if affine else 1)


def _thop_linear(m, x, y) -> int:
    return m.in_features * y.numel()


def _thop_softmax(m, x, y) -> int:  # exp, add and divide per feature
    n = x[0].shape[m.dim]
    return (x[0].numel() // n) * (3 * n - 1)


def _thop_adaptive_avgpool(m, x, y) -> int:
    window = 1.0
    for i, o in zip(x[0].shape[2:], y.shape[2:]):
        window *= i / o
    return int((window + 1) * y.numel())


_UPSAMPLE_OPS = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 224 + 35}  # per output element


def _thop_upsample(m, x, y) -> int:
    return _UPSAMPLE_OPS.get(m.mode, 0) * y.numel()  # thop 0.1.1 counts trilinear zero


def _zero(m, x, y) -> int:
    return 0


_nn = torch.nn
THOP_RULES = {
    **dict.fromkeys((_nn.Conv1d, _nn.Conv2d, _nn.Conv3d, _nn.ConvTranspose1d, _nn.ConvTranspose2d,
                     _nn.ConvTranspose3d), _thop_conv),
    **dict.fromkeys((_nn.BatchNorm1d, _nn.BatchNorm2d, _nn.BatchNorm3d, _nn.SyncBatchNorm, _nn.LayerNorm,
                     _nn.InstanceNorm1d, _nn.InstanceNorm2d, _nn.InstanceNorm3d), _thop_norm),
    _nn.Linear: _thop_linear,
    _nn.PReLU: lambda m, x, y: x[0].numel(),  # counted in eval mode, which a count runs in
    _nn.Softmax: _thop_softmax,
    **dict.fromkeys((_nn.AvgPool1d, _nn.AvgPool2d, _nn.AvgPool3d), lambda m, x, y: y.numel()),
    **dict.fromkeys((_nn.AdaptiveAvgPool1d, _nn.AdaptiveAvgPool2d, _nn.AdaptiveAvgPool3d), _thop_adaptive_avgpool),
    **dict.fromkeys((_nn.Upsample, _nn.UpsamplingBilinear2d, _nn.UpsamplingNearest2d), _thop_upsample),
    # rules that count zero: the module is accounted for, not forgotten
    **dict.fromkeys((_nn.ZeroPad2d, _nn.ReLU, _nn.ReLU6, _nn.LeakyReLU, _nn.Dropout, _nn.PixelShuffle,
                     _nn.MaxPool1d, _nn.MaxPool2d, _nn.MaxPool3d, _nn.AdaptiveMaxPool1d, _nn.AdaptiveMaxPool2d,
                     _nn.AdaptiveMaxPool3d), _zero),
}
del _nn


def _thop_rule(module: torch.nn.Module):
    for cls in type(module).__mro__:
        if cls in THOP_RULES:
            return THOP_RULES[cls]
    return None


def count_thop(model: torch.nn.Module, inputs: dict, method: str = METHOD_META) -> FlopCount:
    """Multiply-adds of one forward of ``model(**inputs)`` by thop's module rules (:data:`THOP_RULES`).

    As ``thop.profile`` sums them: a module with a rule counts every call with that rule and
    its submodules are not visited; containers are summed over their children. Only shapes
    are read, so the forward runs on meta tensors as well as real ones."""
    counts: dict[str, int] = {}
    rule_calls: Counter = Counter()
    no_rule_calls: Counter = Counter()
    hooks = []

    def hook(name, rule):
        def fn(m, x, y):
            counts[name] = counts.get(name, 0) + int(rule(m, x, y))
            rule_calls[type(m).__name__] += 1
        return fn

    def unruled(m, x, y):
        no_rule_calls[type(m).__name__] += 1

    under_rule: list[str] = []
    was_training = model.training
    model.eval()  # as thop.profile does (its PReLU rule counts in eval mode only)
    try:
        for name, module in model.named_modules():
            if any(name.startswith(r + ".") for r in under_rule):
                continue  # thop does not visit what a rule module holds
            rule = _thop_rule(module)
            if rule is not None:
                under_rule.append(name)
                hooks.append(module.register_forward_hook(hook(name, rule)))
            elif not any(True for _ in module.children()):
                hooks.append(module.register_forward_hook(unruled))
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    modules: dict[str, int] = {"": 0}
    for name, n in counts.items():  # every ancestor holds its descendants' share
        parts = name.split(".") if name else []
        for k in range(len(parts) + 1):
            key = ".".join(parts[:k])
            modules[key] = modules.get(key, 0) + n
    total = modules[""]
    by_module, params = _by_child(model, modules, total)
    return FlopCount(total, by_module, params, modules=modules, method=method, convention="thop",
                     rule_modules=dict(sorted(rule_calls.items())), no_rule_modules=dict(sorted(no_rule_calls.items())))
