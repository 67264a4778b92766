"""FLOP counting in two conventions, both on the meta device.

``fvcore`` (the default): one multiply-add is one FLOP, every op that fvcore's
``FlopCountAnalysis`` has a rule for (the DiT/LaMamba-Diff convention; attention products
included). ``thop``: the multiply-adds thop's module rules count, the way BK-SDM reports its
MACs (see :func:`count_thop`): convolutions, linear layers and the batch/layer/instance norms;
no attention products, no GroupNorm.

How the ``fvcore`` count works: the model runs once inside a :class:`TorchDispatchMode`
(PyTorch's public dispatch-level API, the one ``torch.utils.flop_counter.FlopCounterMode`` is
built on), under ``torch.inference_mode``. With autograd's dispatch keys out of the way, a
composite op such as ``aten::linear``, ``aten::layer_norm`` or ``aten::scaled_dot_product_attention``
reaches the mode whole, before it is broken into matrix products and views: the ops the mode
sees are the ops fvcore's TorchScript trace records, so each is counted with fvcore's rule for
it (:data:`FVCORE_RULES`, formula for formula; tests/test_flops.py checks figures and ops
against fvcore's own analysis). A rule is a formula in ``FlopCounterMode``'s form: the op's
arguments with every tensor replaced by its shape in, multiply-adds out.

The model runs on the meta device: it is copied (or built) with meta parameters, so only
shapes exist and nothing is computed. A model that cannot run on meta tensors (an op that
needs data to know its output shape) is counted on its real tensors instead, and
:attr:`FlopCount.method` says which happened.

Nothing is dropped silently: ops no rule counts are returned as ``uncounted_ops``, and ops
counted as zero by convention (elementwise arithmetic, reductions, lookups) as ``zero_ops``
with their calls and elements, so a contraction written as ``mul`` + ``sum`` shows; a module
that has parameters, or reduces its input, yet counts zero is named in ``zero_modules``.
Rules for other ops (SDPA, selective scans, third-party kernels) come from the
``harness_flop_handles`` hook. Work done outside PyTorch's dispatcher (a C extension called
through ctypes) is invisible to any dispatch-level count: register it as a custom op
(``torch.library.custom_op``), as ``harness_mixers.scan`` does, and give it a rule.
"""
from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Number

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented import path (docs: extending)

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


# -- fvcore's rules, as dispatch-level formulas ----------------------------------------------------
# fvcore 0.1.5's handles (fvcore/nn/jit_handles.py, the table in fvcore/nn/flop_count.py), each
# rewritten to read shapes: ``formula(*args, out_shape=..., **kwargs)`` where every tensor
# argument is its shape (a tuple), a list of tensors a list of shapes, anything else as passed.
def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def linear_flop(x, w, *args, out_shape=None, **kwargs) -> int:
    """aten::linear: every input element times the output features."""
    return _prod(x) * w[0]


def addmm_flop(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    """aten::addmm: the (n, k) x (k, m) product; the added term is not counted."""
    return a[0] * a[1] * b[1]


def matmul_flop(a, b, *args, out_shape=None, **kwargs) -> int:
    """aten::matmul and aten::mm: fvcore's rule, every element of ``a`` times ``b``'s columns
    (a vector ``b`` has one column)."""
    return _prod(a) * (b[-1] if len(b) > 1 else 1)


def bmm_flop(a, b, *args, out_shape=None, **kwargs) -> int:
    """aten::bmm: (n, c, t) x (n, t, d)."""
    n, c, t = a
    return n * c * t * b[-1]


def baddbmm_flop(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    """aten::baddbmm (diffusers' classic attention): the batched product only."""
    return a[0] * a[1] * a[2] * b[2]


def _conv(x, w, out_shape, transposed) -> int:
    """Batch x filter volume x the spatial size (the output's, or the input's if transposed)."""
    return x[0] * _prod(w) * _prod((x if transposed else out_shape)[2:])


def conv_flop(x, w, *args, out_shape=None, **kwargs) -> int:
    """aten::conv1d/2d/3d (what fvcore's trace records as aten::_convolution): the bias is not counted."""
    return _conv(x, w, out_shape, False)


def conv_transpose_flop(x, w, *args, out_shape=None, **kwargs) -> int:
    return _conv(x, w, out_shape, True)


def convolution_flop(x, w, bias, stride, padding, dilation, transposed, *args, out_shape=None, **kwargs) -> int:
    """aten::convolution and aten::_convolution, which say themselves whether they are transposed."""
    return _conv(x, w, out_shape, transposed)


def einsum_flop(equation, operands, *args, out_shape=None, **kwargs) -> int | float:
    """aten::einsum: fvcore's two batched-product equations by formula, any other by numpy's
    optimal contraction path (its FLOPs halved: numpy counts a multiply-add as two)."""
    import numpy as np

    equation = equation.replace(" ", "")
    letters = dict.fromkeys(c for c in equation if c.isalpha())  # same equation, any alphabet
    equation = equation.translate({ord(c): 97 + i for i, c in enumerate(letters)})
    if equation == "abc,abd->acd":
        n, c, t = operands[0]
        return n * c * t * operands[-1][-1]
    if equation == "abc,adc->adb":
        n, t, g = operands[0]
        return n * t * g * operands[-1][1]
    path = np.einsum_path(equation, *(np.zeros(s) for s in operands), optimize="optimal")[1]
    for line in path.split("\n"):
        if "optimized flop" in line.lower():
            return float(np.floor(float(line.split(":")[-1]) / 2))
    raise NotImplementedError(f"einsum {equation!r}: numpy gave no FLOP count")


def norm_flop(affine_index: int) -> Callable:
    """Layer, group and instance norm: 5 per element with an affine transform, 4 without
    (fvcore's "rough estimate"); ``affine_index`` is where the op takes its weight."""
    def formula(x, *args, out_shape=None, **kwargs) -> int:
        weight = args[affine_index - 1] if len(args) >= affine_index else kwargs.get("weight")
        return _prod(x) * (5 if isinstance(weight, tuple) else 4)
    return formula


def batch_norm_flop(x, weight, *args, out_shape=None, **kwargs) -> int:
    """aten::batch_norm: as the other norms when training; in eval mode 1 per element, 2 with an
    affine transform."""
    training = args[3] if len(args) > 3 else kwargs["training"]
    if training:
        return norm_flop(1)(x, weight)
    return _prod(x) * (2 if isinstance(weight, tuple) else 1)


def _per_output_element(k: int) -> Callable:
    def formula(*args, out_shape=None, **kwargs) -> int:
        return k * _prod(out_shape)
    return formula


def adaptive_avg_pool_flop(x, *args, out_shape=None, **kwargs) -> int:
    """aten::adaptive_avg_pool2d: one per input element."""
    return _prod(x)


def sdpa_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """aten::scaled_dot_product_attention and its fused kernels: Q K^T and A V, as multiply-adds."""
    batch = _prod(q[:-2])
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


FVCORE_RULES: dict[str, Callable] = {
    "aten::addmm": addmm_flop,
    "aten::bmm": bmm_flop,
    "aten::einsum": einsum_flop,
    "aten::matmul": matmul_flop,
    "aten::mm": matmul_flop,
    "aten::linear": linear_flop,
    **dict.fromkeys(("aten::conv1d", "aten::conv2d", "aten::conv3d"), conv_flop),
    **dict.fromkeys(("aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d"),
                    conv_transpose_flop),
    **dict.fromkeys(("aten::convolution", "aten::_convolution"), convolution_flop),
    "aten::batch_norm": batch_norm_flop,
    "aten::group_norm": norm_flop(2),  # group_norm(input, num_groups, weight, ...)
    "aten::layer_norm": norm_flop(2),  # layer_norm(input, normalized_shape, weight, ...)
    "aten::instance_norm": norm_flop(1),  # instance_norm(input, weight, ...)
    "aten::upsample_nearest2d": _per_output_element(1),
    "aten::upsample_bilinear2d": _per_output_element(4),
    "aten::adaptive_avg_pool2d": adaptive_avg_pool_flop,
    "aten::grid_sampler": _per_output_element(4),  # assumed bilinear, as fvcore does
}

# Ops that do no multiply-adds worth counting. They are counted as zero, and reported in
# ``zero_ops`` with their calls and elements.
_NO_MACS = {
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::silu", "aten::gelu", "aten::softplus", "aten::exp", "aten::sin", "aten::cos", "aten::neg",
    "aten::sigmoid", "aten::tanh", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::mean", "aten::sum",
    "aten::softmax", "aten::unflatten", "aten::repeat", "aten::flip", "aten::pad", "aten::constant_pad_nd",
    "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::roll", "aten::clamp", "aten::arange",
    "aten::embedding", "aten::index", "aten::gather", "aten::where", "aten::masked_fill", "aten::fill_",
}
# Ops that move, view, make or compare tensors: no arithmetic, and not reported. The names fvcore
# ignores (fvcore/nn/jit_analysis.py), and those a dispatch-level count sees where fvcore's trace
# saw something it ignores (an alias such as concat, a factory, a copy); a view op is ignored too.
_IGNORED = {
    "aten::Int", "aten::ScalarImplicit", "aten::__and__", "aten::arange", "aten::bitwise_not", "aten::cat",
    "aten::chunk", "aten::clamp", "aten::clamp_", "aten::constant_pad_nd", "aten::contiguous", "aten::copy_",
    "aten::detach", "aten::dropout", "aten::empty", "aten::eq", "aten::expand", "aten::flatten", "aten::floor",
    "aten::floor_divide", "aten::full", "aten::full_like", "aten::gather", "aten::ge", "aten::gt", "aten::index",
    "aten::index_put_", "aten::masked_fill", "aten::max", "aten::narrow", "aten::new_empty", "aten::new_full",
    "aten::new_zeros", "aten::nonzero", "aten::ones", "aten::permute", "aten::relu", "aten::relu_",
    "aten::remainder", "aten::reshape", "aten::roll", "aten::select", "aten::size", "aten::slice", "aten::split",
    "aten::split_with_sizes", "aten::squeeze", "aten::stack", "aten::t", "aten::to", "aten::transpose",
    "aten::type_as", "aten::unbind", "aten::unsqueeze", "aten::unsqueeze_", "aten::view", "aten::zeros",
    "aten::zeros_like",
    # seen at the dispatcher, not in fvcore's list
    "aten::concat", "aten::concatenate", "aten::lift_fresh", "aten::lift_fresh_copy", "aten::empty_like",
    "aten::empty_strided", "aten::ones_like", "aten::new_ones", "aten::scalar_tensor", "aten::clone",
    "aten::_to_copy", "aten::_unsafe_view", "aten::alias", "aten::_local_scalar_dense", "aten::item",
    "aten::is_nonzero",
    "aten::equal", "aten::ne", "aten::lt", "aten::le", "aten::logical_not", "aten::logical_and",
    "aten::logical_or", "prim::device", "prim::layout",
}
# Reading a table is no arithmetic: a module doing only this (a class embedding) counts zero rightly.
_LOOKUPS = {"aten::embedding", "aten::index", "aten::gather", "aten::arange"}
# A module that counts zero yet reduces its input may hide a contraction (mul + sum).
_REDUCTIONS = {"aten::sum", "aten::mean"}

METHOD_META = "meta"
METHOD_REAL = "traced on cpu tensors"  # the record's wording since counts were traced; kept for comparability


@dataclass
class FlopCount:
    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    params_by_module: dict[str, int] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # no rule: op -> calls
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


# A model already built for real (trained, pruned) with fewer parameters than this is counted
# as it is, not copied to meta first: the ablation's tiny DiT (0.25M) took 40.0 ms of CPU
# counted for real against 42.5 ms copied and counted on meta (minimum of 30); DiT-S/2 (33M)
# 1.65 s against 0.21 s. A model not built yet is always counted on meta.
SMALL_MODEL_PARAMS = 5_000_000


def is_small(model: torch.nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS


def op_name(key) -> str:
    """``"namespace::op"`` for a rule's key: that string itself, or an op such as
    ``torch.ops.aten.baddbmm`` (an overload such as ``.default`` counts as its op)."""
    if isinstance(key, str):
        name = key
    elif callable(getattr(key, "name", None)):  # an overload: "aten::mm.default"
        name = key.name()
    else:  # an overload packet prints as "aten.mm"
        name = str(key).replace(".", "::", 1)
    namespace, sep, op = name.partition("::")
    if name.startswith("prim::PythonOp"):
        raise UserError(f"FLOP rule key {key!r}: the count no longer traces TorchScript, so an autograd.Function has "
                        f"no name of its own; register its forward with torch.library.custom_op and name that op")
    if not sep or not namespace or not op:
        raise UserError(f"FLOP rule key {key!r}: expected an op name such as 'aten::baddbmm' or torch.ops.aten.baddbmm")
    return f"{namespace}::{op.split('.')[0]}"


def count_flops(model: torch.nn.Module, inputs: dict, handles: dict | None = None,
                abstract: bool = True, convention: str = DEFAULT_CONVENTION) -> FlopCount:
    """Multiply-adds of one forward of ``model(**inputs)``, in ``convention`` (:data:`CONVENTIONS`).

    ``abstract``: count on a meta copy (no weights, no activations); if the model cannot run on
    meta tensors, count the real model and inputs and say so in ``method``. A model already on
    the meta device has nothing real to fall back to: :class:`AbstractCountError` then.
    ``handles`` are extra rules, ``{op name: formula}`` (the ``harness_flop_handles`` hook's);
    thop's convention counts modules and takes none."""
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


def module_names(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Each module's name: its first path from ``model`` ("" for the model), as fvcore names a
    module reached by two paths."""
    names: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, name)
    return names


def _count(model: torch.nn.Module, inputs: dict, handles: dict | None, method: str) -> FlopCount:
    rules = {**FVCORE_RULES, **{op_name(k): v for k, v in (handles or {}).items()}}
    names = module_names(model)
    counter = OpCounter(rules)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), counter.scopes(names):
            model(**inputs)
    finally:
        model.train(was_training)
    modules = dict.fromkeys(names.values(), 0)
    modules.update({k: int(v) for k, v in counter.counts.items()})
    total = modules[""]
    by_module, params = _by_child(model, modules, total)
    zero_ops: dict[str, dict] = {}
    for op, _, elements in counter.zero_calls:
        entry = zero_ops.setdefault(op, {"calls": 0, "elements": 0})
        entry["calls"] += 1
        entry["elements"] += elements
    return FlopCount(total, by_module, params, dict(counter.uncounted), dict(sorted(zero_ops.items())),
                     _zero_modules(model, modules, counter.scope_ops), modules, method)


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


_IGNORE, _ZERO, _RULE, _UNCOUNTED = range(4)
_NAMES: dict = {}  # dispatched op -> "namespace::op", shared by every count


def _shape(a):
    if isinstance(a, torch.Tensor):
        return tuple(a.shape)
    if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in a]
    return a


def _numel(values) -> int:
    """The largest tensor among ``values`` (a tensor, or a tuple of them, as an op returns)."""
    n = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            n = max(n, v.numel())
        elif isinstance(v, tuple):
            n = max(n, _numel(v))
    return n


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher with ``rules`` (op name -> formula), in the
    module that ran it and in each of that module's ancestors, as fvcore's analysis does; keeps
    the ops counted as zero (with their elements) and those no rule counts.

    Run the model under ``torch.inference_mode()``, so that composite ops arrive whole (see the
    module's docstring), and inside :meth:`scopes`, which says which module runs."""

    def __init__(self, rules: dict[str, Callable]):
        super().__init__()
        self.rules = rules
        self.counts: dict[str, int | float] = {}  # FLOPs by module name, each op in its module and every ancestor
        self.uncounted: Counter = Counter()  # op -> calls, over the whole model
        self.zero_calls: list[tuple[str, str, int]] = []  # (op, module, elements) of every op counted as zero
        self.scope_ops: dict[str, set] = {}  # zero-counted and uncounted ops run by each module or its descendants
        self.scope = [""]
        self._kinds: dict = {}  # dispatched op -> (what it is, its name, its rule)
        self._lineage: dict[str, tuple[str, ...]] = {}

    @contextlib.contextmanager
    def scopes(self, names: dict[torch.nn.Module, str]):
        """This mode, with forward hooks that keep the stack of running modules (``names[module]``),
        as fvcore's trace keeps its scopes."""
        stack = self.scope

        def leave(module, args, output):  # returns None: a hook's value would replace the output
            stack.pop()

        hooks = []
        try:
            for module, name in names.items():
                hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
                hooks.append(module.register_forward_hook(leave, always_call=True))
            with self:
                yield self
        finally:
            for h in hooks:
                h.remove()
            stack[:] = [""]

    def _ancestors(self, scope: str) -> tuple[str, ...]:
        lineage = self._lineage.get(scope)
        if lineage is None:
            parts = scope.split(".") if scope else []
            lineage = self._lineage[scope] = ("",) + tuple(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        return lineage

    def _kind(self, func):
        name = _NAMES.get(func)
        if name is None:
            name = _NAMES[func] = op_name(func)
        if name in _NO_MACS and name not in self.rules:
            kind = (_ZERO, name, None)
        elif name in self.rules:
            kind = (_RULE if self.rules[name] is not None else _IGNORE, name, self.rules[name])
        elif name in _IGNORED or getattr(func, "is_view", False):
            kind = (_IGNORE, name, None)
        else:
            kind = (_UNCOUNTED, name, None)
        self._kinds[func] = kind
        return kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind, name, rule = self._kinds.get(func) or self._kind(func)
        if kind == _IGNORE:
            return out
        scope = self.scope[-1]
        if kind == _RULE:
            flops = rule(*map(_shape, args), out_shape=_shape(out) if not isinstance(out, tuple) else
                         tuple(map(_shape, out)), **{k: _shape(v) for k, v in kwargs.items()})
            if not isinstance(flops, Number):
                raise ValueError(f"FLOP rule for {name} returned {type(flops).__name__}; expected a number")
            counts = self.counts
            for s in self._ancestors(scope):
                counts[s] = counts.get(s, 0) + flops
            return out
        if kind == _ZERO:
            self.zero_calls.append((name, scope, max(_numel(args), _numel(kwargs.values()), _numel((out,)))))
        else:
            self.uncounted[name] += 1
        for s in self._ancestors(scope)[1:]:
            self.scope_ops.setdefault(s, set()).add(name)
        return out


def _zero_modules(model: torch.nn.Module, modules: dict[str, int], scope_ops: dict[str, set]) -> list[str]:
    """Modules that count zero although they have parameters (and do more than read a table) or
    reduce their input: likely a contraction no rule sees. Outermost ones only."""
    flagged: list[str] = []
    for name, module in model.named_modules():
        if not name or modules.get(name, 0) or name not in scope_ops:
            continue
        if any(name.startswith(f + ".") for f in flagged):
            continue
        ops = scope_ops[name]
        arithmetic = ops - _LOOKUPS
        has_params = any(True for _ in module.parameters())
        if (has_params and arithmetic) or ops & _REDUCTIONS:
            flagged.append(name)
    return flagged


def fvcore_handle(formula: Callable) -> Callable:
    """The same formula as a handle for fvcore's own ``FlopCountAnalysis`` (``handle(inputs,
    outputs)`` on TorchScript values): how the tests compare this count with fvcore's, and how
    a user counting with fvcore by hand gives it the ops fvcore has no rule for."""
    def shape(v):
        return tuple(v.type().sizes()) if v.isCompleteTensor() else None

    def handle(inputs, outputs):
        return formula(*map(shape, inputs), out_shape=shape(outputs[0]) if outputs else None)
    return handle


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
