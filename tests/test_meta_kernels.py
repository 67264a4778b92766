"""harness.meta_kernels: each shape-only kernel gives the output a real CPU kernel gives
(shape, dtype, and the strides of every dimension longer than 1), on a grid of shapes,
layouts and dtypes; cases it does not know it leaves to PyTorch (None)."""
from __future__ import annotations

import pytest
import torch

from harness.meta_kernels import KERNELS

aten = torch.ops.aten


def _meta(t):
    """A meta tensor with ``t``'s shape, strides and offset (``.to('meta')`` would densify a slice)."""
    if not isinstance(t, torch.Tensor):
        return t
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device="meta")
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _layout_of(t: torch.Tensor):
    return [s for n, s in zip(t.shape, t.stride()) if n > 1]


CONTIG = _r(2, 3, 4)
PERMUTED = _r(1, 8, 4, 16).permute(0, 2, 1, 3)  # attention heads after a transpose, batch 1
CHUNK = _r(2, 5, 16).chunk(2, dim=-1)[1]  # GEGLU's gate: row-major with gaps
CL = _r(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
STRIDED = _r(4, 6)[:, ::2]  # every other column: row-major with gaps
QKV = _r(1, 256, 3, 4, 16).permute(2, 0, 3, 1, 4)[0]  # q of a fused qkv projection: neither dense nor row-major
TRANSPOSED = _r(1, 64, 256).transpose(1, 2)  # tokens after a patch embedding's flatten(2).transpose(1, 2)

BINARY = [
    (CONTIG, _r(2, 3, 4)), (CONTIG, _r(4)), (_r(2, 1, 4), _r(1, 3, 4)), (CL, CL.clone()),
    (CL, _r(3, 1, 1)), (PERMUTED, torch.tensor(0.5)), (PERMUTED, 2.0), (CHUNK, 3), (CONTIG, 2),
    (torch.arange(6).reshape(2, 3), 2), (torch.arange(6).reshape(2, 3), _r(3)),
    (_r(2, 3, dtype=torch.float16), _r(2, 3)), (_r(2, 3, dtype=torch.bfloat16), 1.5),
    (TRANSPOSED, _r(1, 256, 64)), (_r(1, 256, 64), TRANSPOSED), (QKV, 0.25), (QKV.transpose(-1, -2), 0.25),
    (TRANSPOSED, _r(64)), (CHUNK, _r(2, 5, 8)),
]
UNARY = [CONTIG, PERMUTED, CHUNK, CL, STRIDED, QKV, TRANSPOSED, _r(2, 3, dtype=torch.float16)]


def _check(op, *args, **kwargs):
    real = op(*args, **kwargs)
    lean = KERNELS[op](*(_meta(a) for a in args), **kwargs)
    if lean is None:
        return False
    outs = real if isinstance(real, tuple) else (real,)
    leans = lean if isinstance(lean, tuple) else (lean,)
    assert len(outs) == len(leans)
    for r, m in zip(outs, leans):
        assert m.device.type == "meta"
        assert (m.shape, m.dtype) == (r.shape, r.dtype), op
        assert _layout_of(m) == _layout_of(r), (op, m.stride(), r.stride())
    return True


@pytest.mark.parametrize("op", [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor])
def test_binary_tensor_ops(op):
    known = 0
    for a, b in BINARY:
        if not isinstance(b, torch.Tensor):
            b = torch.tensor(b)
        known += _check(op, a, b)
    assert known == len(BINARY)  # every case of the grid is one the kernels know


@pytest.mark.parametrize("op", [aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar])
def test_binary_scalar_ops(op):
    for a, b in BINARY:
        if not isinstance(b, torch.Tensor):
            assert _check(op, a, b)


@pytest.mark.parametrize("op", [aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.exp.default,
                                aten.sin.default, aten.cos.default, aten.tanh.default, aten.neg.default,
                                aten.rsqrt.default, aten.sqrt.default])
def test_unary_ops(op):
    for t in UNARY:
        assert _check(op, t), t.stride()
    assert KERNELS[op](_meta(torch.arange(4))) is None  # integer input: PyTorch decides the dtype


def test_softmaxes():
    assert _check(aten._softmax.default, CONTIG, -1, False)
    assert _check(aten._safe_softmax.default, CONTIG, -1)
    assert _check(aten._safe_softmax.default, CONTIG, 1, torch.float64)


def test_matrix_products():
    a, b = _r(5, 3), _r(3, 7)
    assert _check(aten.mm.default, a, b)
    assert _check(aten.bmm.default, _r(2, 5, 3), _r(2, 3, 7))
    assert _check(aten.addmm.default, _r(7), a, b)
    assert _check(aten.addmm.default, _r(5, 7), a, b)
    assert KERNELS[aten.mm.default](_meta(a), _meta(_r(4, 7))) is None  # mismatch: PyTorch raises its error
    assert KERNELS[aten.addmm.default](_meta(_r(6)), _meta(a), _meta(b)) is None


def test_shapes_that_do_not_broadcast_are_left_to_pytorch():
    assert KERNELS[aten.add.Tensor](_meta(_r(2, 3)), _meta(_r(4))) is None
    flags = torch.ones(2, 3, dtype=torch.bool)
    assert KERNELS[aten.sub.Tensor](_meta(flags), _meta(flags)) is None  # PyTorch refuses bool subtraction
    assert _check(aten.mul.Tensor, _r(0, 3), _r(1, 3)) and _check(aten.mul.Tensor, _r(2, 1, 3), _r(4, 1))


def test_norms():
    x = _r(2, 6, 8)
    assert _check(aten.native_layer_norm.default, x, [8], _r(8), _r(8), 1e-5)
    assert _check(aten.native_layer_norm.default, x, [6, 8], None, None, 1e-6)
    assert _check(aten.native_layer_norm.default, _r(2, 8, 6).transpose(1, 2), [8], None, None, 1e-6)
    assert KERNELS[aten.native_layer_norm.default](_meta(x), [8], _meta(_r(6)), None, 1e-5) is None  # bad weight
    g = _r(2, 8, 4, 4)
    assert _check(aten.native_group_norm.default, g, _r(8), _r(8), 2, 8, 16, 4, 1e-5)
    assert _check(aten.native_group_norm.default, g, None, None, 2, 8, 16, 2, 1e-5)
    for dtype in (torch.float16, torch.bfloat16):  # half precision keeps its dtype in the statistics too
        w = _r(8, dtype=dtype)
        assert _check(aten.native_layer_norm.default, x.to(dtype), [8], w, w, 1e-5)
        assert _check(aten.native_group_norm.default, g.to(dtype), w, w, 2, 8, 16, 4, 1e-5)
    assert KERNELS[aten.native_group_norm.default](_meta(g), None, None, 2, 8, 16, 3, 1e-5) is None  # 8 % 3


def test_empty_like():
    for t in (CONTIG, CL, PERMUTED, CHUNK):
        assert _check(aten.empty_like.default, t)
    assert _check(aten.empty_like.default, CL, memory_format=torch.contiguous_format)
