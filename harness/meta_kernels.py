"""Shape-only kernels for the ops a meta-device count meets most (see harness.flops).

PyTorch registers Python meta kernels (its reference implementations) for many common ops,
in place of their C++ ones: on the meta device an ``add`` then took about 1 ms and a
``layer_norm`` about 2 ms here, and SDXL's count spent over a second in them. The kernels
below compute the same outputs (shape, dtype, strides) directly, for the common cases only:
dense inputs in one layout, one dtype. Anything else returns ``None`` and PyTorch's own kernel
runs. They are used only while a count traces (harness.flops); tests/test_meta_kernels.py
compares each with the real CPU kernel over a grid of shapes, layouts and dtypes.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten


def _layout(t: torch.Tensor):
    """The memory format ``t`` is dense in, or None (strided some other way)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _empty(shape, dtype, layout=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=layout)


def _broadcast(*shapes):
    """The broadcast of ``shapes``, or None where they do not broadcast (PyTorch then raises its
    own error). torch.broadcast_shapes took 53 us a call here, this 2 us."""
    out = [1] * max(len(s) for s in shapes)
    for shape in shapes:
        for i, d in enumerate(shape, len(out) - len(shape)):
            if d != 1:
                if out[i] not in (1, d):
                    return None
                out[i] = d
    return torch.Size(out)


def _pointwise_layout(shape: torch.Size, tensors: list[torch.Tensor]):
    """The layout of a pointwise op's output, where every input agrees on it: the layout of the
    inputs that have the output's shape (broadcast ones are contiguous). None: ask PyTorch."""
    layouts = {_layout(t) for t in tensors if t.shape == shape and t.dim()}
    if not layouts:
        return torch.contiguous_format if all(_layout(t) is not None for t in tensors) else None
    if len(layouts) != 1 or None in layouts:
        return None
    layout = layouts.pop()
    if layout is torch.channels_last and not all(_layout(t) is not None for t in tensors):
        return None
    return layout


def _like_strides(t: torch.Tensor):
    """Strides ``empty_like(t)`` gives: contiguous where ``t``'s dims are in row-major order
    (gaps allowed, as in a chunk), ``t``'s own strides where ``t`` is dense in another order;
    None otherwise (left to PyTorch). Strides of size-1 dimensions, which address nothing, are
    not matched."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    strides = [t.stride(d) for d in dims]
    if all(a > b for a, b in zip(strides, strides[1:])):
        return torch.empty(t.shape, device="meta").stride()
    expected = 1
    for d in sorted(dims, key=t.stride):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return t.stride()


def _iter_strides(t: torch.Tensor):
    """Strides of a pointwise op's output where ``t``, of the output's shape, decides its layout
    (TensorIterator orders dimensions by the first input's strides): dense, in the order of
    ``t``'s strides. None where ``t`` leaves that order open (a broadcast or repeated stride)."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    strides = [t.stride(d) for d in dims]
    if 0 in strides or len(set(strides)) != len(strides) or 0 in t.shape:
        return None
    out = [0] * t.dim()
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: (t.stride(d), -d) if t.shape[d] > 1 else (-1, -d)):
        out[d] = expected
        expected *= t.shape[d]
    return out


def _binary(true_divide: bool = False):
    def kernel(a, b, *args, **kwargs):
        if not isinstance(a, torch.Tensor):
            return None
        tensors = [a] + ([b] if isinstance(b, torch.Tensor) and b.dim() else [])
        if any(t.is_complex() or t.dtype == torch.bool for t in [a, b] if isinstance(t, torch.Tensor)):
            return None  # complex, or bool (PyTorch refuses some bool arithmetic): PyTorch decides
        dtype = torch.result_type(a, b)
        if true_divide and not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        shape = _broadcast(*(t.shape for t in tensors))
        if shape is None:
            return None
        strides = _iter_strides(a) if a.shape == shape else None
        if strides is not None:
            return torch.empty_strided(shape, strides, dtype=dtype, device="meta")
        layout = _pointwise_layout(shape, tensors)
        return None if layout is None else _empty(shape, dtype, layout)
    return kernel


def _unary(t, *args, **kwargs):
    if not t.dtype.is_floating_point:
        return None
    strides = _iter_strides(t)
    return None if strides is None else torch.empty_strided(t.shape, strides, dtype=t.dtype, device="meta")


def _softmax(t, dim, half_to_float):
    if not t.is_contiguous() or not t.dtype.is_floating_point:
        return None
    return _empty(t.shape, torch.float32 if half_to_float and t.dtype == torch.half else t.dtype)


def _safe_softmax(t, dim, dtype=None):
    if not t.is_contiguous() or not t.dtype.is_floating_point:
        return None
    return _empty(t.shape, dtype or t.dtype)


def _same_float(*tensors) -> bool:
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and next(iter(dtypes)).is_floating_point


def _mm(a, b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or not _same_float(a, b):
        return None
    return _empty((a.shape[0], b.shape[1]), a.dtype)


def _bmm(a, b):
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1] or not _same_float(a, b):
        return None
    return _empty((a.shape[0], a.shape[1], b.shape[2]), a.dtype)


def _addmm(bias, a, b, beta=1, alpha=1):
    out = _mm(a, b)
    if out is None or not _same_float(bias, a):
        return None
    return out if _broadcast(bias.shape, out.shape) == out.shape else None


def _layer_norm(x, normalized_shape, weight, bias, eps):
    k = len(normalized_shape)
    shape = tuple(normalized_shape)
    if _like_strides(x) is None or not _same_float(x, weight, bias) or tuple(x.shape[x.dim() - k:]) != shape:
        return None
    if any(p is not None and tuple(p.shape) != shape for p in (weight, bias)):
        return None  # PyTorch raises its own error
    stats = (*x.shape[:x.dim() - k], *([1] * k))
    return _empty(x.shape, x.dtype), _empty(stats, x.dtype), _empty(stats, x.dtype)


def _group_norm(x, weight, bias, n, c, hxw, groups, eps):
    if not x.is_contiguous() or not _same_float(x, weight, bias) or x.shape[0] != n or x.shape[1] != c:
        return None
    if c % groups or any(p is not None and tuple(p.shape) != (c,) for p in (weight, bias)):
        return None  # PyTorch raises its own error
    return _empty(x.shape, x.dtype), _empty((n, groups), x.dtype), _empty((n, groups), x.dtype)


def _empty_like(t, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    if layout not in (None, torch.strided) or device not in (None, "meta", torch.device("meta")):
        return None
    if memory_format not in (None, torch.preserve_format):
        return _empty(t.shape, dtype or t.dtype, memory_format)
    strides = _like_strides(t)
    return None if strides is None else torch.empty_strided(t.shape, strides, dtype=dtype or t.dtype, device="meta")


KERNELS = {
    **dict.fromkeys((aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.sub.Scalar,
                     aten.mul.Scalar), _binary()),
    **dict.fromkeys((aten.div.Tensor, aten.div.Scalar), _binary(true_divide=True)),
    **dict.fromkeys((aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.exp.default, aten.sin.default,
                     aten.cos.default, aten.tanh.default, aten.neg.default, aten.rsqrt.default, aten.sqrt.default),
                    _unary),
    aten._softmax.default: _softmax,
    aten._safe_softmax.default: _safe_softmax,
    aten.mm.default: _mm,
    aten.bmm.default: _bmm,
    aten.addmm.default: _addmm,
    aten.native_layer_norm.default: _layer_norm,
    aten.native_group_norm.default: _group_norm,
    aten.empty_like.default: _empty_like,
}
