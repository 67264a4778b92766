"""The selective scan: matches the sequential loop (values and every gradient) on the compiled
and the PyTorch path, stays finite for huge delta * A, rejects bad shapes, counts its FLOPs."""
from __future__ import annotations

import pytest
import torch

import harness
from harness.flops import count_flops
from harness.plugins import registry
from harness_mixers import scan as scan_mod
from harness_mixers.scan import SelectiveScanFn, selective_scan, selective_scan_ref


def _inputs(batch=2, width=8, nstate=5, length=37, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    bc = (batch, nstate, length) if groups is None else (batch, groups, nstate, length)
    A = (-torch.rand(width, nstate, generator=g, dtype=dtype) * 4).requires_grad_()
    return dict(u=r(batch, width, length), delta=r(batch, width, length, scale=0.5), A=A, B=r(*bc), C=r(*bc),
                D=r(width), z=r(batch, width, length), delta_bias=r(width, scale=0.1))


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test on the compiled CPU loop and on the PyTorch fallback."""
    if request.param == "native":
        if not scan_mod.native_available():
            pytest.skip("no C++ compiler here: the compiled scan is not built")
    else:
        monkeypatch.setattr(scan_mod, "_use_native", lambda *tensors: False)
    return request.param


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("optional", ["all", "none"])
def test_matches_the_loop_values_and_gradients(path, groups, optional):
    x = _inputs(groups=groups)
    if optional == "none":
        x.update(D=None, z=None, delta_bias=None)
    out, last = selective_scan(**x, delta_softplus=optional == "all", return_last_state=True)
    ref, ref_last = selective_scan_ref(**x, delta_softplus=optional == "all", return_last_state=True)
    assert _rel(out, ref) < 1e-10 and _rel(last, ref_last) < 1e-10
    weight = torch.randn_like(out)
    live = {k: v for k, v in x.items() if v is not None}
    ours = torch.autograd.grad((out * weight).sum(), list(live.values()))
    theirs = torch.autograd.grad((ref * weight).sum(), list(live.values()))
    for name, a, b in zip(live, ours, theirs):
        assert _rel(a, b) < 1e-10, name


def test_float32_within_1e4_of_the_loop(path):
    x = {k: v.detach().float().requires_grad_() for k, v in _inputs(width=16, nstate=16, length=300).items()}
    out = selective_scan(**x, delta_softplus=True)
    ref = selective_scan_ref(**x, delta_softplus=True)
    assert _rel(out, ref) < 1e-4
    ours = torch.autograd.grad(out.square().sum(), list(x.values()))
    theirs = torch.autograd.grad(ref.square().sum(), list(x.values()))
    for name, a, b in zip(x, ours, theirs):
        assert _rel(a, b) < 1e-4, name


def test_gradcheck_through_the_autograd_function(path):
    x = _inputs(batch=1, width=2, nstate=3, length=6)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True), args)


def test_huge_delta_times_A_stays_finite_and_exact(path):
    """exp(delta A) underflows to 0: the state forgets, nothing overflows (a cumsum trick gives NaN)."""
    x = {k: v.detach().float() for k, v in _inputs(width=8, nstate=16, length=200).items()}
    x["delta"] = torch.full_like(x["delta"], 60.0)  # softplus(60) = 60, times A down to -240
    x["A"] = x["A"] * 50
    for v in x.values():
        v.requires_grad_()
    out = selective_scan(**x, delta_softplus=True)
    ref = selective_scan_ref(**x, delta_softplus=True)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-4
    out.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in x.values())


def test_half_precision_runs_in_float32_and_returns_its_dtype():
    x = {k: v.detach().to(torch.bfloat16) for k, v in _inputs().items()}
    out = selective_scan(**x)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_ref(**{k: v.float() for k, v in x.items()})
    assert _rel(out.float(), ref) < 1e-2


def test_goes_through_SelectiveScanFn(monkeypatch):
    calls = []
    original = SelectiveScanFn.apply
    monkeypatch.setattr(SelectiveScanFn, "apply", lambda *a: calls.append(1) or original(*a))
    selective_scan(**{k: v.detach() for k, v in _inputs().items()})
    assert calls == [1]


@pytest.mark.parametrize("change, message", [
    (dict(A=torch.zeros(8, 5, dtype=torch.complex64)), "A must be real"),
    (dict(B=torch.zeros(8, 5)), "input-dependent B/C only"),
    (dict(B=torch.zeros(2, 3, 5, 37, dtype=torch.float64)), "do not divide"),
    (dict(D=torch.zeros(7, dtype=torch.float64)), "D must be (8,)"),
    (dict(delta=torch.zeros(2, 8, 36, dtype=torch.float64)), "u and delta"),
])
def test_bad_shapes_are_rejected_clearly(change, message):
    x = {k: v.detach() for k, v in _inputs().items()}
    x.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        selective_scan(**x)


def test_native_build_failure_falls_back(monkeypatch, tmp_path):
    """A broken compiler means the PyTorch path, not an error."""
    from harness_mixers import _native

    _native.load.cache_clear()
    monkeypatch.setenv("CXX", "false")  # a 'compiler' that always fails
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    try:
        assert _native.load() is None
        x = {k: v.detach() for k, v in _inputs().items()}
        assert _rel(selective_scan(**x), selective_scan_ref(**x)) < 1e-10
    finally:
        _native.load.cache_clear()


def test_flop_handle_counts_9_BLDN_for_a_mamba_mixer():
    torch.manual_seed(0)
    dim, hw = 16, (4, 6)
    mixer = harness.create("mixer", "mamba", dim=dim, d_state=8, expand=2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = mixer

        def forward(self, x):
            return self.mixer(x, hw)

    x = torch.randn(1, hw[0] * hw[1], dim)
    handles = registry().flop_handles()
    with_scan = count_flops(Wrap(), {"x": x}, handles)
    without = count_flops(Wrap(), {"x": x}, {**handles, "harness_mixers::selective_scan": lambda *a, **k: 0})
    assert not with_scan.uncounted_ops
    assert with_scan.total - without.total == 9 * 1 * (hw[0] * hw[1]) * (2 * dim) * 8


def test_each_call_notes_the_implementation_that_ran(monkeypatch):
    """What env.kernels is made of: the compiled loop, the fallback, both when a span used both."""
    from harness import kernels

    x = {k: v.detach() for k, v in _inputs().items()}
    with kernels.track() as outer:
        if scan_mod.native_available():
            with kernels.track() as inner:
                selective_scan(**x)
            assert kernels.describe(inner) == {"selective_scan": "compiled-cpu"}
        monkeypatch.setattr(scan_mod, "_use_native", lambda *tensors: False)
        selective_scan(**x)
    expected = "compiled-cpu + pytorch" if scan_mod.native_available() else "pytorch"
    assert kernels.describe(outer) == {"selective_scan": expected}
    with kernels.track() as after:
        pass
    assert after == {}  # a closed span hears nothing


def test_mamba_ssm_is_used_where_it_imports_unless_switched_off(monkeypatch):
    """HARNESS_MAMBA_SSM=0 keeps our own scan even where mamba-ssm imports (a stand-in here)."""
    import sys
    import types

    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    fake.selective_scan_fn = lambda *args: "fused"
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    try:
        for switch, expected in (("1", fake.selective_scan_fn), ("0", None)):
            scan_mod._mamba_ssm.cache_clear()
            monkeypatch.setenv("HARNESS_MAMBA_SSM", switch)
            assert scan_mod._mamba_ssm() is expected
    finally:
        scan_mod._mamba_ssm.cache_clear()
