"""FLOP counting (harness.flops): on the meta device the same as on real tensors, op by op,
and the same as fvcore's own analysis, the convention's oracle.

The exact integers pinned here were measured with fvcore's trace on real CPU tensors, before
the count moved to the meta device and then to PyTorch's dispatcher (SD-1.5: `harness flops
unet --preset sd15`, 1m06s and 4.9 GB resident; SDXL: 8m (a loaded machine) and 14.1 GB);
the README's tables print them.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import harness
from harness.context import example_inputs
from harness.flops import AbstractCountError, count_flops, meta_copy
from harness.plugins import registry

TINY = [
    ("dit", {"size": "tiny", "patch": 2, "input_size": 16, "mixer": "lamamba"}),  # scan + windows + SDPA
    ("lamamba", {"size": "tiny", "input_size": 16}),
    ("unet", {"preset": "adm-tiny", "input_size": 16}),
    ("unet", {"preset": "sd-tiny"}),
    ("unet", {"preset": "sdxl-tiny"}),  # added conditioning (text_embeds, time_ids)
]


def _inputs(model, size=16):
    spec = {"input_size": size, "in_channels": 4, "num_classes": 1000, "context_dim": 0}
    return example_inputs(model, spec, 1, "cpu", torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,options", TINY, ids=[f"{n}-{o.get('preset', o.get('mixer', ''))}" for n, o in TINY])
def test_meta_trace_equals_real_trace(name, options):
    torch.manual_seed(0)
    model = harness.create("backbone", name, **options).eval()
    inputs = _inputs(model)
    handles = registry().flop_handles()
    real = count_flops(model, inputs, handles, abstract=False)
    meta = count_flops(model, inputs, handles)
    assert (real.method, meta.method) == ("traced on cpu tensors", "meta")
    assert meta.total == real.total > 0
    assert meta.modules == real.modules  # every submodule, so a unit's share is the same too
    assert meta.uncounted_ops == real.uncounted_ops == {}
    assert meta.zero_ops == real.zero_ops and meta.zero_ops  # same calls, same elements
    assert meta.zero_modules == real.zero_modules == []
    assert not any(p.is_meta for p in model.parameters())  # the model itself is left alone


class _Positional(torch.nn.Module):
    """fvcore passes inputs positionally; a backbone's forward takes keywords, some None."""

    def __init__(self, model: torch.nn.Module, kwargs: dict):
        super().__init__()
        self.model = model
        self.keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self.fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.keys, tensors)), **self.fixed)
        return getattr(out, "sample", out)


def _fvcore_oracle(model, inputs):
    """fvcore's own FlopCountAnalysis of ``model(**inputs)``, traced on real tensors, with the
    harness's extra rules as its handles: SDPA and baddbmm under their names, the selective
    scan under the name its autograd.Function has in a trace. Returns it and its scoped graph."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_analysis import _get_scoped_trace_graph

    from harness.flops import fvcore_handle

    rules = registry().flop_handles()
    handles = {k: fvcore_handle(v) for k, v in rules.items() if k.startswith("aten::")}
    handles["prim::PythonOp.SelectiveScanFn"] = fvcore_handle(rules["harness_mixers::selective_scan"])
    wrapper = _Positional(model, inputs).eval()
    args = tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))
    analysis = FlopCountAnalysis(wrapper, args).set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    names = {m: n for n, m in reversed(list(wrapper.named_modules()))}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = _get_scoped_trace_graph(wrapper, args, names)
    return analysis, graph


@pytest.mark.parametrize("name,options", TINY, ids=[f"{n}-{o.get('preset', o.get('mixer', ''))}" for n, o in TINY])
def test_count_is_fvcores_own(name, options):
    """fvcore's FlopCountAnalysis, the oracle of the convention, gives the same total and the
    same figure for every module; the ops it leaves unsupported are those the record lists as
    zero or uncounted, with the same calls and elements, but for one thing: a trace records
    Python arithmetic on shapes as 0-dim tensor ops (``heads * head_dim``), which are no
    tensor work and which a count at the dispatcher never sees."""
    from fvcore.nn.jit_analysis import _IGNORED_OPS

    from harness.flops import _NO_MACS

    torch.manual_seed(0)
    model = harness.create("backbone", name, **options).eval()
    inputs = _inputs(model)
    with torch.no_grad():  # a mixer's cached index and window bias are made once, before either count
        model(**inputs)
    fc = count_flops(model, inputs, registry().flop_handles(), abstract=False)
    analysis, graph = _fvcore_oracle(model, inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fc.total == analysis.total() > 0
        per_module = analysis.by_module()
    assert fc.modules == {k[len("model."):] if k.startswith("model.") else "": v for k, v in per_module.items()
                          if k != ""}
    assert set(analysis.unsupported_ops()) == (set(fc.zero_ops) | set(fc.uncounted_ops)) - _IGNORED_OPS
    assert set(fc.zero_ops) <= _NO_MACS and not fc.uncounted_ops
    traced: dict[str, dict] = {}
    for node in graph.nodes():
        sizes = [v.type().sizes() for v in (*node.inputs(), *node.outputs()) if v.isCompleteTensor()]
        if node.kind() in fc.zero_ops and any(sizes):  # any tensor that is not a 0-dim one
            entry = traced.setdefault(node.kind(), {"calls": 0, "elements": 0})
            entry["calls"] += 1
            entry["elements"] += max(math.prod(s) for s in sizes)
    assert fc.zero_ops == traced


class _EveryRule(torch.nn.Module):
    """One call of each op fvcore has a rule for, and of the harness's SDPA and baddbmm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.conv1d = torch.nn.Conv1d(6, 6, 3, groups=2)
        self.deconv = torch.nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bn_plain = torch.nn.BatchNorm2d(4, affine=False)
        self.inorm = torch.nn.InstanceNorm2d(4, affine=True)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.ln = torch.nn.LayerNorm(8, elementwise_affine=False)
        self.lin = torch.nn.Linear(8, 5)
        self.lin2d = torch.nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv(x)  # (1, 6, 8, 8)
        x = x + self.conv1d(x.flatten(2)).mean()
        x = self.inorm(self.bn_plain(self.bn(self.deconv(x))))  # (1, 4, 16, 16)
        x = self.gn(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear") + F.interpolate(x, scale_factor=2)  # (1, 4, 32, 32)
        x = F.adaptive_avg_pool2d(x, 8)  # (1, 4, 8, 8)
        g = F.grid_sample(x, x.new_zeros(1, 3, 5, 2), align_corners=False)  # (1, 4, 3, 5)
        t = self.ln(x.reshape(1, 32, 8))
        a = F.scaled_dot_product_attention(t, t, t)  # (1, 32, 8)
        m = torch.matmul(a, a.transpose(1, 2)) @ t  # (1, 32, 8)
        b = torch.baddbmm(torch.bmm(m, m.transpose(1, 2)), m, m.transpose(1, 2))  # (1, 32, 32)
        e = torch.einsum("bij,bjk->bik", b, m) + torch.einsum("nct,ncp->ntp", m, m).mean()
        e = e + torch.einsum("ijk,ikl,ilm->ijm", b[:, :8, :8], b[:, :8, :8], b[:, :8]).mean()  # numpy's path
        flat = self.lin(e)[0]  # (32, 5)
        out = torch.addmm(flat.new_zeros(3), flat, flat.new_ones(5, 3)) + torch.mm(flat, flat.new_ones(5, 3))
        return out.sum() + g.sum() + self.lin2d(flat).sum()


def test_every_rule_is_fvcores_to_the_flop():
    torch.manual_seed(0)
    model = _EveryRule().eval()
    inputs = {"x": torch.randn(1, 4, 8, 8)}
    fc = count_flops(model, inputs, registry().flop_handles())
    analysis, _ = _fvcore_oracle(model, inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fc.total == analysis.total() > 0
        by_op = analysis.by_operator()
    assert fc.method == "meta" and fc.uncounted_ops == {}, (fc.fallback_reason, fc.uncounted_ops)
    assert fc.modules == {k[len("model."):] if k.startswith("model.") else "": v
                          for k, v in analysis.by_module().items() if k != ""}
    # each rule ran: fvcore names the convolution "conv", the rest by their op
    assert {"conv", "batch_norm", "instance_norm", "group_norm", "layer_norm", "upsample_bilinear2d",
            "upsample_nearest2d", "adaptive_avg_pool2d", "grid_sampler", "scaled_dot_product_attention",
            "matmul", "bmm", "baddbmm", "einsum", "linear", "addmm", "mm"} <= {k for k, v in by_op.items() if v}


@torch.library.custom_op("harness_test::scaled_outer", mutates_args=())
def _scaled_outer(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """A third party's kernel, registered so that the dispatcher sees it whole."""
    return scale * a[..., :, None] * b[..., None, :]


@_scaled_outer.register_fake
def _(a, b, scale):
    return a.new_empty(*a.shape, b.shape[-1])


class _Outer(torch.nn.Module):
    def forward(self, a, b):
        return _scaled_outer(a, b, 2.0)


def test_a_plugin_rule_is_a_formula_on_shapes():
    inputs = {"a": torch.randn(3, 4), "b": torch.randn(3, 5)}
    fc = count_flops(_Outer(), inputs)
    assert fc.total == 0 and fc.uncounted_ops == {"harness_test::scaled_outer": 1}  # named, with its calls
    seen = []

    def outer_flop(a, b, scale, *, out_shape):
        seen.append((a, b, scale, out_shape))
        return a[0] * a[1] * b[1]

    for key in ("harness_test::scaled_outer", torch.ops.harness_test.scaled_outer):
        fc = count_flops(_Outer(), inputs, {key: outer_flop})
        assert (fc.total, fc.uncounted_ops, fc.method) == (3 * 4 * 5, {}, "meta")
    assert seen[-1] == ((3, 4), (3, 5), 2.0, (3, 4, 5))
    assert count_flops(_Outer(), inputs, {"harness_test::scaled_outer": None}).uncounted_ops == {}  # None: no work
    with pytest.raises(harness.UserError, match="custom_op"):
        count_flops(_Outer(), inputs, {"prim::PythonOp.SelectiveScanFn": outer_flop})


def test_the_convention_tables_are_fvcores():
    """Every op fvcore has a rule for has one here, and every op fvcore ignores is ignored."""
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    from fvcore.nn.jit_analysis import _IGNORED_OPS

    from harness.flops import _IGNORED, FVCORE_RULES

    assert set(_DEFAULT_SUPPORTED_OPS) - {"aten::_convolution"} <= set(FVCORE_RULES)
    assert {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution"} <= set(FVCORE_RULES)
    assert set(_IGNORED_OPS) <= _IGNORED


def test_meta_copy_keeps_ties_and_allocates_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight
    copy = meta_copy(model)
    assert all(p.is_meta for p in copy.parameters())
    assert copy[1].weight is copy[0].weight and model[0].weight.device.type == "cpu"


class _DataDependent(torch.nn.Module):
    """Its output shape depends on values: it cannot be counted without them."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)[: int(x.abs().sum().item() > -1) + 1]


def test_data_dependent_model_falls_back_to_the_real_trace_and_says_so():
    fc = count_flops(_DataDependent(), {"x": torch.randn(3, 4)})
    assert fc.method == "traced on cpu tensors" and fc.total == 3 * 4 * 4
    assert fc.fallback_reason
    assert fc.record()["flops_method"] == "traced on cpu tensors"
    with torch.device("meta"):
        on_meta = _DataDependent()
    with pytest.raises(AbstractCountError):  # nothing real to fall back to
        count_flops(on_meta, {"x": torch.randn(3, 4)})


class _MulSum(torch.nn.Module):
    """A plugin mixer contracting with mul + sum: fvcore's rules see no multiply-add."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return (x[:, :, None, :] * self.weight).sum(-1)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)  # a lookup counts zero rightly: not flagged
        self.mix = _MulSum()
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x, y):
        return self.out(self.mix(x + self.embed(y)[:, None]))


def test_zero_counted_ops_are_reported_with_calls_and_elements():
    fc = count_flops(_Net(), {"x": torch.randn(1, 5, 16), "y": torch.tensor([3])})
    assert fc.total == 5 * 8 * 2  # the Linear only
    assert fc.zero_ops["aten::mul"] == {"calls": 1, "elements": 5 * 8 * 16}
    assert fc.zero_ops["aten::sum"] == {"calls": 1, "elements": 5 * 8 * 16}
    assert fc.zero_ops["aten::embedding"]["calls"] == 1
    assert fc.zero_modules == ["mix"]  # parameters, arithmetic, zero FLOPs
    assert fc.record()["zero_flop_modules"] == ["mix"]


# -- the README's figures, counted on the meta device --------------------------------------------
def _count(name, **options):
    with torch.device("meta"):
        model = harness.create("backbone", name, **options).eval()
    inputs = _inputs(model, options.get("input_size", 32))
    fc = count_flops(model, inputs, registry().flop_handles())
    assert fc.method == "meta" and not fc.uncounted_ops, (fc.method, fc.uncounted_ops)
    return fc.total, sum(p.numel() for p in model.parameters())


DIT_TABLE = {  # README, "DiT, Table 4 of the paper": GFLOPs to 3 decimals, params in M to 2
    ("S", 2): ("6.066", "32.87"), ("S", 4): ("1.415", "32.92"), ("S", 8): ("0.359", "33.14"),
    ("B", 2): ("23.025", "130.32"), ("B", 4): ("5.570", "130.43"), ("B", 8): ("1.419", "130.87"),
    ("L", 2): ("80.749", "457.84"), ("L", 4): ("19.709", "457.99"), ("L", 8): ("5.015", "458.58"),
    ("XL", 2): ("118.689", "674.83"), ("XL", 4): ("29.060", "675.00"), ("XL", 8): ("7.397", "675.66"),
}


@pytest.mark.parametrize("size,patch", list(DIT_TABLE))
def test_readme_dit_table(size, patch):
    flops, params = _count("dit", size=size, patch=patch, input_size=32)
    assert (f"{flops / 1e9:.3f}", f"{params / 1e6:.2f}") == DIT_TABLE[size, patch]


LAMAMBA_TABLE = {  # README, "LaMamba-Diff against DiT": GFLOPs to 2 decimals
    ("S", 32, 16): "3.51", ("B", 32, 16): "11.56", ("L", 32, 16): "37.14", ("XL", 32, 16): "50.44",
    ("XL", 32, 1): "45.90", ("S", 64, 16): "13.99", ("B", 64, 16): "46.11", ("L", 64, 16): "148.07",
    ("XL", 64, 16): "201.10", ("XL", 64, 1): "182.93",
}


@pytest.mark.slow
@pytest.mark.parametrize("size,latent,d_state", list(LAMAMBA_TABLE))
def test_readme_lamamba_table(size, latent, d_state):
    flops, _ = _count("lamamba", size=size, input_size=latent, d_state=d_state)
    assert f"{flops / 1e9:.2f}" == LAMAMBA_TABLE[size, latent, d_state]


def test_scan_d_term_adds_b_d_l_per_scan_and_changes_no_output():
    """The official flops() counts the skip term D·u of each scan, B·D·L (D = 4 directions x
    d_inner = 8C). Tiny at 16x16: width 32 on 256 tokens in 3 blocks (1 encoder, 2 decoder),
    64 on 64 tokens in 3, 128 on 16 tokens in 7 (1 + 1 encoder, 1 bottleneck, 2 + 2 decoder)."""
    ours, _ = _count("lamamba", size="tiny", input_size=16)
    official, _ = _count("lamamba", size="tiny", input_size=16, scan_d_term=True)
    assert official - ours == 8 * (3 * 32 * 256 + 3 * 64 * 64 + 7 * 128 * 16) == 409_600
    dit, _ = _count("dit", size="tiny", patch=2, input_size=16, mixer={"name": "ss2d", "scan_d_term": True})
    # tiny DiT: 4 blocks of width 128 on (16 / 2)^2 = 64 tokens
    assert dit - _count("dit", size="tiny", patch=2, input_size=16, mixer="ss2d")[0] == 4 * 8 * 128 * 64
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    outs = []
    for flag in (False, True):
        torch.manual_seed(0)
        outs.append(harness.create("backbone", "lamamba", size="tiny", input_size=16, scan_d_term=flag).eval()(x, t, y))
    assert torch.equal(*outs)


@pytest.mark.slow
def test_xl_d_state_1_counts_the_official_way():
    """README: 45.897 GFLOPs ours, 45.925 with the official flops()'s D term (256x256, d_state 1)."""
    ours, params = _count("lamamba", size="XL", input_size=32, d_state=1)
    official, _ = _count("lamamba", size="XL", input_size=32, d_state=1, scan_d_term=True)
    assert (ours, official, params) == (45_897_297_920, 45_924_823_040, 652_484_648)
    # 8C x tokens over XL's 22 blocks: 320 on 1024 tokens in 5, 640 on 256 in 5, 1280 on 64 in 12
    assert official - ours == 8 * (5 * 320 * 1024 + 5 * 640 * 256 + 12 * 1280 * 64)


MIXERS_TABLE = {  # README, "Every mixer in the same tiny backbones": GFLOPs @256/1024/4096 tokens
    "attention": (("0.272", "1.891", "20.446"), ("0.060", "0.411", "4.448")),
    "window-attention": (("0.221", "0.884", "3.534"), ("0.050", "0.204", "0.811")),
    "mamba": (("0.290", "1.157", "4.625"), ("0.071", "0.282", "1.124")),
    "ss2d": (("0.443", "1.771", "7.083"), ("0.129", "0.512", "2.047")),
    "lamamba": (("0.528", "2.109", "8.435"), ("0.148", "0.594", "2.374")),
}


@pytest.mark.slow
@pytest.mark.parametrize("mixer", list(MIXERS_TABLE))
def test_readme_mixers_table(mixer):
    dit = tuple(f"{_count('dit', size='tiny', patch=2, mixer=mixer, input_size=n)[0] / 1e9:.3f}" for n in (32, 64, 128))
    lam = tuple(f"{_count('lamamba', size='tiny', mixer=mixer, input_size=n)[0] / 1e9:.3f}" for n in (16, 32, 64))
    assert (dit, lam) == MIXERS_TABLE[mixer]


@pytest.mark.slow
def test_sd15_exact():
    flops, params = _count("unet", preset="sd15")
    assert (flops, params) == (402_039_521_280, 859_520_964)  # README: 859.52M, 402.04 GFLOPs

# SDXL (3_382_980_116_480, README 3,382.98) is pinned in tests/perf/test_flops_perf.py, under
# `make bench`: with diffusers' import it takes longer than `make test` should.


@pytest.mark.slow
def test_bk_sdm_small_readme_figure(capsys):
    """README, BK-SDM presets: `harness flops unet --preset sd15 --prune bk-sdm-small`, pruned on meta."""
    import json

    from harness.cli import main

    assert main(["flops", "unet", "--preset", "sd15", "--prune", "bk-sdm-small", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["params"], f"{data['gflops']:.2f}", data["flops_method"]) == (482_346_884, "255.70", "meta")


def test_gflops_budget_weighs_every_unit_from_one_meta_count(monkeypatch):
    """`budget: gflops`: each unit's weight is its share in one count's per-module breakdown,
    the same as a trace on real tensors gives."""
    import harness.flops as flops
    from harness_compress.stages import unit_flops
    from harness.context import CellContext
    from harness.suite import CellConfig
    from harness_compress.units import discover

    config = CellConfig.model_validate({"backbone": {"name": "unet", "preset": "adm-small", "input_size": 16},
                                        "metrics": ["params"], "device": "cpu"})
    ctx = CellContext("s", "c", 0, config)
    model = ctx.model.eval()
    units = [u for u in discover(model) if u.removable]
    calls = []
    real_count = flops.count_flops
    counting = lambda *a, **k: calls.append(1) or real_count(*a, **k)  # noqa: E731
    monkeypatch.setattr(flops, "count_flops", counting)
    monkeypatch.setattr(harness, "count_flops", counting)  # the plugin imports it from the public API
    weights, total = unit_flops(ctx, model, units)
    assert len(calls) == 1 and len(units) > 5
    real = real_count(model, ctx.example_inputs(1, model=model), registry().flop_handles(), abstract=False)
    assert weights == {u.name: float(sum(real.modules[m] for m in u.covers)) for u in units}
    assert total == real.total
    pairs = [u for u in units if u.drop]
    assert pairs and all(weights[u.name] > 0 for u in units)  # a skip pair weighs both its ResNets


def test_a_count_leaves_the_model_and_pytorch_as_they_were():
    """No hook, no dispatch mode and no training flag survive a count, and nothing is
    registered with PyTorch: a conv on meta tensors runs PyTorch's own kernel after it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout()).train()
    fc = count_flops(model, {"input": torch.randn(1, 3, 8, 8)}, abstract=False)
    assert fc.total == 4 * 3 * 3 * 3 * 6 * 6 and fc.modules == {"": fc.total, "0": fc.total, "1": 0}
    assert model.training and model[0].training
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert _get_current_dispatch_mode() is None and not torch.is_inference_mode_enabled()
    x, w = torch.empty(1, 3, 8, 8, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    assert torch.conv2d(x, w, padding=1).shape == (1, 4, 8, 8)


def test_a_failing_forward_leaves_nothing_behind():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            raise ValueError("broken")

    model = Broken()
    with pytest.raises(ValueError, match="broken"):
        count_flops(model, {"x": torch.randn(2, 4)}, abstract=False)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert count_flops(torch.nn.Linear(4, 5), {"input": torch.randn(2, 4)}).total == 2 * 4 * 5


# Names that reach into PyTorch's or fvcore's internals: a count built on them breaks with any
# upgrade. fvcore is the tests' oracle, never the harness's library.
_PRIVATE = ("torch._C", "torch._decomp", "torch._meta_registrations", "torch._ops", "torch._prims",
            "torch._refs", "torch._subclasses", "torch._dynamo", "torch.jit._")


def _private_names(path) -> list[str]:
    """Each dotted name in ``path`` (imports and attribute chains) that is private to torch or fvcore."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    found = []

    def dotted(node) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
            return ".".join(reversed(parts))
        return None

    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [dotted(node) or ""]
        for name in names:
            private_fvcore = name.startswith("fvcore") and any(p.startswith("_") for p in name.split("."))
            if private_fvcore or any(name == p or name.startswith(p + ".") or (p.endswith("_") and
                                                                              name.startswith(p)) for p in _PRIVATE):
                found.append(f"{path}:{node.lineno}: {name}")
    return found


def test_no_private_torch_or_fvcore_names_in_the_harness_or_its_plugins():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted([*root.glob("harness/**/*.py"), *root.glob("plugins/**/*.py")])
    assert len(files) > 30
    found = [hit for f in files for hit in _private_names(f)]
    assert not found, "\n".join(found)
    assert not (root / "harness" / "meta_kernels.py").exists()


def test_the_private_name_check_catches_each_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch._C\nfrom torch._decomp import global_decomposition_table\n"
                   "from fvcore.nn.jit_analysis import _IGNORED_OPS\nimport torch\n"
                   "torch._C._get_tracing_state()\nx = torch._ops.OpOverload\n"
                   "from torch._meta_registrations import _meta_lib_dont_use_me_use_register_meta\n"
                   "torch.jit._get_trace_graph\n")
    found = _private_names(bad)
    for name in ("torch._C", "torch._decomp", "fvcore.nn.jit_analysis._IGNORED_OPS", "torch._C._get_tracing_state",
                 "torch._ops.OpOverload", "torch._meta_registrations", "torch.jit._get_trace_graph"):
        assert any(hit.endswith(": " + name) for hit in found), (name, found)
    ok = tmp_path / "ok.py"
    ok.write_text("import torch\nfrom torch.utils.flop_counter import FlopCounterMode\n"
                  "from fvcore.nn import FlopCountAnalysis\ntorch.library.custom_op\n")
    assert _private_names(ok) == []


# -- thop's convention (BK-SDM's MACs) -----------------------------------------------------------
class _Sub(torch.nn.Linear):
    """A subclass counts as its base (thop itself matches the exact class)."""


class _Wrapped(torch.nn.Linear):
    def __init__(self):
        super().__init__(6, 6)
        self.inner = torch.nn.Linear(6, 6)  # under a rule module: not visited, as thop does

    def forward(self, x):
        return super().forward(self.inner(x))


class _ThopNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True)
        self.dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.gn = torch.nn.GroupNorm(2, 6)
        self.pool = torch.nn.AvgPool2d(2)
        self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.ln = torch.nn.LayerNorm(6)
        self.ln_plain = torch.nn.LayerNorm(6, elementwise_affine=False)
        self.lin = _Sub(6, 5)
        self.wrapped = _Wrapped()
        self.soft = torch.nn.Softmax(dim=-1)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        x = self.up(self.pool(self.gn(self.act(self.dw(self.conv(x))))))  # (1, 6, 8, 8)
        t = self.ln_plain(self.ln(x.flatten(2).transpose(1, 2)))  # (1, 64, 6)
        a = torch.nn.functional.scaled_dot_product_attention(t, t, t)  # a function: thop sees nothing
        return self.soft(self.lin(a)) + self.wrapped(t).sum()


def test_thop_rules_by_hand():
    fc = count_flops(_ThopNet(), {"x": torch.randn(1, 4, 8, 8)}, convention="thop")
    by_hand = {
        "conv": 6 * 8 * 8 * 4 * 9,  # output elements x C_in x kernel; the bias is not counted
        "dw": 6 * 8 * 8 * 2 * 9,  # groups: C_in / 3 per output
        "pool": 6 * 4 * 4,  # one per output element
        "up": 6 * 8 * 8,  # nearest: one per output element
        "ln": 4 * 64 * 6,  # 2 per element, doubled by the affine transform
        "ln_plain": 2 * 64 * 6,
        "lin": 64 * 5 * 6,
        "soft": 64 * (3 * 5 - 1),  # exp, add, divide
        "wrapped": 64 * 6 * 6,  # its own product only: the Linear inside is not visited
    }
    assert fc.method == "meta" and fc.convention == "thop"
    assert {k: v for k, v in fc.by_module.items() if v} == by_hand
    assert fc.total == sum(by_hand.values())
    assert fc.no_rule_modules == {"GroupNorm": 1, "SiLU": 1}  # counted zero, and said so
    assert fc.rule_modules["_Sub"] == 1 and "Linear" not in fc.rule_modules  # inner Linear not visited
    assert fc.record()["no_rule_modules"] == {"GroupNorm": 1, "SiLU": 1}


@pytest.mark.parametrize("name,options", TINY, ids=[f"{n}-{o.get('preset', o.get('mixer', ''))}" for n, o in TINY])
def test_thop_meta_count_equals_real_count(name, options):
    torch.manual_seed(0)
    model = harness.create("backbone", name, **options).eval()
    inputs = _inputs(model)
    real = count_flops(model, inputs, abstract=False, convention="thop")
    meta = count_flops(model, inputs, convention="thop")
    assert (real.method, meta.method) == ("traced on cpu tensors", "meta")
    assert meta.total == real.total > 0 and meta.modules == real.modules
    fv = count_flops(model, inputs, registry().flop_handles())
    assert meta.total < fv.total  # no attention products, no GroupNorm, no scan


# BK-SDM's Table (U-Net MACs at 512x512, batch 1, one forward, counted with thop): about 339 G for
# SD-1.4/1.5, 224 / 218 / 206 G for BK-SDM-Base / Small / Tiny. The exact integers are what
# `thop.profile` itself (PyPI thop 0.1.1.post2209072238, the `thop` BK-SDM's count_macs_params.py
# imports) returns for the same meta U-Nets, checked on this machine.
BKSDM_MACS = {None: (339, 338_749_194_240), "bk-sdm-base": (224, 223_755_632_640),
              "bk-sdm-small": (218, 217_727_959_040), "bk-sdm-tiny": (206, 205_035_274_240)}


@pytest.mark.parametrize("preset", list(BKSDM_MACS), ids=lambda p: p or "sd15")
def test_thop_convention_gives_bk_sdm_published_macs(preset):
    from harness_compress.units import apply_plan, bksdm_plan

    with torch.device("meta"):
        model = harness.create("backbone", "unet", preset="sd15").eval()
    if preset:
        apply_plan(model, bksdm_plan(model, preset))
    fc = count_flops(model, model.example_inputs(1, device="meta"), convention="thop")
    published, exact = BKSDM_MACS[preset]
    assert fc.method == "meta" and fc.total == exact
    assert abs(fc.total / 1e9 / published - 1) < 0.005


def test_thop_matches_thop_itself():
    """The same integers as thop.profile on small models of every block type (thop is in the
    test extra: the oracle of the convention, never imported by the harness)."""
    import thop
    for name, options in TINY:
        torch.manual_seed(0)
        model = harness.create("backbone", name, **options).eval()
        inputs = _inputs(model)
        ours = count_flops(model, inputs, abstract=False, convention="thop").total
        keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]

        class Positional(torch.nn.Module):  # thop passes inputs positionally
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                return self.model(**dict(zip(keys, args)))

        macs, _ = thop.profile(Positional(), inputs=tuple(inputs[k] for k in keys), verbose=False)
        assert ours == int(macs), (name, options)


def test_cli_convention_flag(capsys):
    import json

    from harness.cli import main

    unet = ["flops", "unet", "--preset", "adm-tiny", "--input-size", "8"]
    assert main([*unet, "--convention", "thop", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        model = harness.create("backbone", "unet", preset="adm-tiny", input_size=8).eval()
    thop = count_flops(model, model.example_inputs(1, device="meta"), convention="thop")
    assert data["gflops"] == thop.total / 1e9 and "thop" in data["convention"]
    assert data["no_rule_modules"]["GroupNorm"] > 0 and data["flops_method"] == "meta"
    assert main([*unet, "--json"]) == 0  # the default is unchanged
    fv = json.loads(capsys.readouterr().out)
    assert fv["convention"] == "1 multiply-add = 1 FLOP (fvcore)" and fv["gflops"] > data["gflops"]
    assert main([*unet, "--convention", "thop"]) == 0
    assert "GMACs" in capsys.readouterr().out


def test_cli_bad_convention_is_one_line_with_a_suggestion(capsys):
    from harness.cli import main

    assert main(["flops", "dit", "--size", "tiny", "--patch", "4", "--input-size", "8", "--convention", "tohp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "convention 'tohp'" in err and "did you mean 'thop'" in err


def _metric_ctx(metrics):
    from harness.context import CellContext
    from harness.suite import CellConfig

    config = CellConfig.model_validate({"backbone": {"name": "dit", "size": "tiny", "patch": 4, "input_size": 8},
                                        "metrics": metrics, "device": "cpu"})
    return CellContext("s", "c", 0, config)


def test_gflops_metric_convention_option():
    ctx = _metric_ctx(["gflops"])
    thop = harness.create("metric", "gflops", convention="thop")(ctx)
    fvcore = harness.create("metric", "gflops")(ctx)
    model = ctx.abstract_model().eval()
    expected = count_flops(model, ctx.example_inputs(1, model=model), convention="thop").total / 1e9
    assert thop["value"] == expected and "thop" in thop["convention"] and thop["no_rule_modules"]["GELU"] > 0
    assert fvcore["convention"] == "1 multiply-add = 1 FLOP (fvcore)" and fvcore["value"] > thop["value"]
    with pytest.raises(harness.UserError, match="did you mean 'thop'"):
        harness.create("metric", "gflops", convention="thopp")


def test_suite_with_a_bad_convention_is_refused_when_validated(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text("suite: demo\nbase:\n  backbone: {name: dit, size: tiny, patch: 4, input_size: 8}\n"
                    "  metrics: [params, {name: gflops, convention: fvcor}]\n  device: cpu\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "suite.yaml:4" in err and "did you mean 'fvcore'" in err, err


def test_meta_build_skips_init_fills_of_meta_tensors_only():
    """Building on meta passes torch.nn.init over (a meta tensor has no values to fill), but a
    real tensor made meanwhile is filled as ever, and torch.nn.init is itself again afterwards."""
    from harness.context import _meta_building

    before = {n: getattr(torch.nn.init, n) for n in ("normal_", "xavier_uniform_", "kaiming_uniform_")}
    real = torch.zeros(3, 3)
    with _meta_building():
        lin = torch.nn.Linear(4, 4)  # its reset_parameters calls kaiming_uniform_ and uniform_
        assert lin.weight.is_meta
        with _meta_building():  # nested builds wrap nothing twice
            assert not hasattr(torch.nn.init.normal_.__wrapped_init__, "__wrapped_init__")
        torch.nn.init.normal_(real)
    assert real.abs().sum() > 0
    assert {n: getattr(torch.nn.init, n) for n in before} == before


def test_meta_build_gives_the_real_build_its_shapes_and_rng():
    """Skipping the fills changes nothing a count reads (names, shapes, ties), nor the real
    model's weights, which the same seed makes bit for bit whether a meta build came first."""
    from harness.context import CellContext
    from harness.suite import CellConfig

    config = CellConfig.model_validate({"backbone": {"name": "dit", "size": "tiny", "patch": 2, "depth": 2},
                                        "metrics": ["params"], "device": "cpu"})
    ctx = CellContext("s", "c", 0, config)
    meta = ctx.build_backbone(device="meta")
    first = ctx.build_backbone()
    again = CellContext("s", "c", 0, config).build_backbone()
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in first.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_gflops_budget_in_thops_convention():
    """`budget: gflops, convention: thop` weighs units by thop's MACs (BK-SDM's count), each
    unit its modules' share of one thop count; a convention without a GFLOPs budget is refused."""
    from pydantic import ValidationError

    from harness.context import CellContext
    from harness.flops import count_thop
    from harness.suite import CellConfig
    from harness_compress.stages import PruneSpec, unit_flops
    from harness_compress.units import discover

    config = CellConfig.model_validate({"backbone": {"name": "unet", "preset": "sd-tiny"}, "metrics": ["params"],
                                        "device": "cpu"})
    ctx = CellContext("s", "c", 0, config)
    model = ctx.model.eval()
    units = [u for u in discover(model) if u.removable]
    weights, total = unit_flops(ctx, model, units, "thop")
    thop = count_thop(model, ctx.example_inputs(1, model=model), method="traced on cpu tensors")
    assert total == thop.total and weights == {u.name: float(sum(thop.modules.get(m, 0) for m in u.covers))
                                                 for u in units}
    fvcore, _ = unit_flops(ctx, model, units)
    assert any(weights[u.name] != fvcore[u.name] for u in units)  # GroupNorm, attention: not thop's
    assert PruneSpec(criterion="random", ratio=0.3, budget="gflops", convention="thop").convention == "thop"
    for bad in ({"criterion": "random", "ratio": 0.3, "convention": "thop"},  # budget: params
                {"preset": "bk-sdm-small", "budget": "gflops", "convention": "thop"},
                {"criterion": "random", "ratio": 0.3, "budget": "gflops", "convention": "flops"}):
        with pytest.raises(ValidationError):
            PruneSpec(**bad)
