"""Every registered token mixer: shapes, gradients, determinism, the swap into a tiny DiT, and
FLOPs that grow linearly (windows, scans) or quadratically (global attention) in tokens."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import harness
from harness import UserError
from harness.flops import count_flops
from harness.plugins import registry
from harness_mixers.mamba import Mamba
from harness_mixers.scan import selective_scan_ref
from harness_mixers.ss2d import SS2D, scan_orders
from harness_mixers.window import WindowAttention, window_attention

MIXERS = harness.components("mixer")
DIM, HEADS = 16, 2


def _mixer(name, seed=0, **options):
    torch.manual_seed(seed)
    hints = {"num_heads": HEADS} if name in ("attention", "window-attention", "lamamba") else {}
    return harness.create("mixer", name, dim=DIM, **hints, **options)


def _tokens(hw=(6, 5), batch=2, seed=1):
    return torch.randn(batch, hw[0] * hw[1], DIM, generator=torch.Generator().manual_seed(seed))


def test_the_issue_mixers_are_registered():
    assert {"attention", "window-attention", "mamba", "ss2d", "lamamba"} <= set(MIXERS)


# -- every mixer -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", MIXERS)
def test_shape_and_gradients_reach_every_parameter(name):
    # window 4 on a 6 x 5 map: padded, shifted windows (block 1) where a mixer has windows
    options = {"window_size": 4, "block_index": 1} if name in ("window-attention", "lamamba") else {}
    m = _mixer(name, **options)
    x = _tokens().requires_grad_()
    y = m(x, (6, 5))
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MIXERS)
def test_same_seed_same_output(name):
    x = _tokens()
    a, b = _mixer(name, seed=3)(x, (6, 5)), _mixer(name, seed=3)(x, (6, 5))
    assert torch.equal(a, b)
    assert not torch.equal(a, _mixer(name, seed=4)(x, (6, 5)))


@pytest.mark.parametrize("name", MIXERS)
def test_swaps_into_a_tiny_dit(name):
    torch.manual_seed(0)
    model = harness.create("backbone", "dit", size="tiny", mixer=name, input_size=16, num_classes=10)
    assert type(model.blocks[0].attn) is type(_mixer(name))
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dit_init_keeps_the_ssm_initialisation():
    """DiT's xavier pass zeroes Linear biases; reset_parameters_ must restore dt, A and D."""
    torch.manual_seed(0)
    model = harness.create("backbone", "dit", size="tiny", mixer="mamba", input_size=16, num_classes=10)
    ssm = model.blocks[0].attn.directions[0].ssm
    dt = F.softplus(ssm.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.allclose(ssm.A_log, torch.log(torch.arange(1, ssm.d_state + 1.0)).expand_as(ssm.A_log))
    assert torch.equal(ssm.D, torch.ones_like(ssm.D))


# -- FLOPs: linear against quadratic -----------------------------------------------------------
def _flops(name, side, **options):
    m = _mixer(name, **options).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, (side, side))

    fc = count_flops(Wrap(), {"x": torch.randn(1, side * side, DIM)}, registry().flop_handles())
    assert not fc.uncounted_ops, fc.uncounted_ops
    return fc.total


@pytest.mark.parametrize("name, options", [("window-attention", {"window_size": 4}),
                                           ("window-attention", {"window_size": 4, "shift": 2}),
                                           ("mamba", {}), ("ss2d", {}), ("lamamba", {"window_size": 4})])
def test_windows_and_scans_count_linear_in_tokens(name, options):
    """Affine in tokens, exactly (a causal conv's padded outputs add a constant)."""
    sides = (4, 8, 12)
    (l1, l2, l3), (f1, f2, f3) = [s * s for s in sides], [_flops(name, s, **options) for s in sides]
    assert (f3 - f2) * (l2 - l1) == (f2 - f1) * (l3 - l2)
    assert f3 > f2 > f1


def test_attention_counts_quadratic_in_tokens():
    small, large = _flops("attention", 8), _flops("attention", 16)
    n = 64
    # 4x the tokens: the projections 4x, Q K^T and A V (n^2 dim each) 16x
    assert large - 4 * small == (16 - 4) * 2 * n * n * DIM


def test_window_attention_counts_one_window_at_a_time():
    """Per window of t tokens, Q K^T and A V cost 2 t^2 dim: far below global attention."""
    side, window = 16, 4
    projections = 4 * side * side * DIM * DIM  # qkv (3) and out (1)
    windows = (side // window) ** 2
    assert _flops("window-attention", side, window_size=window) == projections + windows * 2 * window ** 4 * DIM


# -- window attention -------------------------------------------------------------------------
def _masked_full_attention(m: WindowAttention, x, hw):
    """The definition, on the full map: token i attends to j iff the (rolled, padded) map puts
    them in one window and the roll did not wrap one of them around (Swin's regions)."""
    b, n, c = x.shape
    h, w = hw
    ws = m.window_size
    wh, ww = min(ws, h), min(ws, w)
    sh, sw = (m.shift_size if h > ws else 0), (m.shift_size if w > ws else 0)
    hp, wp = h + (-h % wh), w + (-w % ww)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ry, rx = (ys - sh) % hp, (xs - sw) % wp  # where the roll puts each token
    key = ((ry // wh) * 1000 + rx // ww) * 4 + ((ys - sh) < 0).long() * 2 + ((xs - sw) < 0).long()
    allowed = key.flatten()[:, None] == key.flatten()[None, :]
    py, px = (ry % wh).flatten(), (rx % ww).flatten()
    index = (py[:, None] - py[None, :] + ws - 1) * (2 * ws - 1) + (px[:, None] - px[None, :] + ws - 1)
    bias = m.relative_position_bias_table[index].permute(2, 0, 1)
    q, k, v = m.qkv(x).view(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-1, -2)) * (c // m.num_heads) ** -0.5 + bias
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return m.proj((att @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("h, w, window, shift", [
    (8, 8, 4, 0), (8, 8, 4, 2),  # plain and shifted windows
    (10, 7, 4, 2),  # padded, shifted
    (6, 5, 8, 0), (6, 5, 8, 4),  # no larger than the window: global, never shifted
    (12, 3, 4, 1),  # one side fits a window, the other is shifted
])
def test_window_attention_matches_masked_full_attention(h, w, window, shift):
    torch.manual_seed(0)
    m = WindowAttention(DIM, HEADS, window, shift)
    torch.nn.init.normal_(m.relative_position_bias_table, std=1.0)  # make the bias matter
    x = torch.randn(2, h * w, DIM)
    torch.testing.assert_close(m(x, (h, w)), _masked_full_attention(m, x, (h, w)), atol=2e-6, rtol=1e-5)


def test_window_factory_shift_options():
    assert window_attention(DIM, HEADS, 8, block_index=0).shift_size == 0
    assert window_attention(DIM, HEADS, 8, block_index=3).shift_size == 4  # "auto": odd blocks
    assert window_attention(DIM, HEADS, 8, shift=2, block_index=3).shift_size == 2
    assert window_attention(DIM, HEADS, 8, shift_size=0, block_index=3).shift_size == 0  # a backbone's hint
    with pytest.raises(UserError, match="shift must be 'auto' or an int"):
        window_attention(DIM, HEADS, 8, shift="half")
    with pytest.raises(UserError, match="shift_size < window_size"):
        window_attention(DIM, HEADS, 4, shift=4)


# -- mamba -------------------------------------------------------------------------------------
def test_mamba_defaults_follow_mamba_ssm():
    m = Mamba(48)
    ssm = m.directions[0].ssm
    assert m.in_proj.out_features == 2 * 96 and ssm.d_state == 16 and ssm.dt_rank == math.ceil(48 / 16)
    assert m.directions[0].conv1d.kernel_size == (4,)


def test_mamba_one_direction_is_causal_two_are_not():
    x = _tokens(hw=(4, 4), batch=1)
    later = x.clone()
    later[:, 10:] += 1.0  # change only tokens after position 9
    one, two = _mixer("mamba"), _mixer("mamba", directions=2)
    assert torch.equal(one(x, (4, 4))[:, :10], one(later, (4, 4))[:, :10])
    assert not torch.allclose(two(x, (4, 4))[:, :10], two(later, (4, 4))[:, :10])


def test_mamba_rejects_bad_options():
    with pytest.raises(UserError, match="directions must be 1"):
        harness.create("mixer", "mamba", dim=DIM, directions=3)
    with pytest.raises(UserError, match="dt_rank must be 'auto' or a positive int"):
        harness.create("mixer", "mamba", dim=DIM, dt_rank=0)


# -- ss2d ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("snake", [True, False])
def test_ss2d_orders_are_four_permutations_and_snake_keeps_neighbours(snake):
    h, w = 3, 4
    order, back = scan_orders(h, w, snake)
    assert all(sorted(o.tolist()) == list(range(h * w)) for o in order)
    steps = [(abs(a // w - b // w) + abs(a % w - b % w)) for o in order for a, b in zip(o[:-1].tolist(), o[1:].tolist())]
    assert (max(steps) == 1) == snake  # snake: every step goes to a neighbouring cell
    # Direction k's output at step i belongs to raster cell order[k, i]: an output that says
    # which cell it came from must land on that cell once put back.
    assert torch.equal(order.flatten()[back].view(4, h * w), torch.arange(h * w).expand(4, -1))


def test_ss2d_snake_paths_are_lamamba_diffs_continuous_scans():
    """The four paths of the official model/continuous_scan.py on a 4x4 map, written out by hand
    (cell r * 4 + c): rows from the top-left and the bottom-left corners, columns from the
    bottom-left and the bottom-right corners, each first row rightward, each first column upward."""
    order, _ = scan_orders(4, 4, True)
    assert order.tolist() == [
        [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
        [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
        [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],
        [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12],
    ]
    plain, _ = scan_orders(2, 3, False)  # VMamba's cross-scan: raster rows, columns, and their reverses
    assert plain.tolist() == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 3, 1, 4, 2, 5], [5, 2, 4, 1, 3, 0]]


def test_ss2d_equals_four_separate_scans_put_back_and_summed():
    torch.manual_seed(0)
    m = SS2D(DIM, d_state=4)
    h, w = 3, 5
    x = _tokens(hw=(h, w))
    b, n = x.shape[:2]
    order, _ = scan_orders(h, w, True)
    xi, z = m.in_proj(x).chunk(2, dim=-1)
    xi = F.silu(m.conv2d(xi.transpose(1, 2).reshape(b, -1, h, w))).flatten(2)
    total = torch.zeros(b, m.d_inner, n)
    d = m.d_inner
    for k in range(4):
        seq = xi[:, :, order[k]]
        dt, B, C = (seq.transpose(1, 2) @ m.x_proj_weight[k].t()).split([m.dt_rank, 4, 4], dim=-1)
        y = selective_scan_ref(seq, (dt @ m.dt_projs_weight[k].t()).transpose(1, 2),
                               -torch.exp(m.A_logs[k * d:(k + 1) * d]), B.transpose(1, 2), C.transpose(1, 2),
                               m.Ds[k * d:(k + 1) * d], delta_bias=m.dt_projs_bias[k], delta_softplus=True)
        total[:, :, order[k]] += y  # step i of direction k is raster cell order[k, i]
    expected = m.out_proj(m.out_norm(total.transpose(1, 2)) * F.silu(z))
    torch.testing.assert_close(m(x, (h, w)), expected, atol=1e-5, rtol=1e-4)


def test_window_bias_cache_follows_the_bias_table():
    """Forwards without gradients reuse bias + mask until the table is updated in place."""
    torch.manual_seed(0)
    m = WindowAttention(DIM, HEADS, 4, 2)
    x = torch.randn(1, 64, DIM)
    with torch.no_grad():
        cached = m(x, (8, 8))
    with_grad = m(x, (8, 8)).detach()
    torch.testing.assert_close(cached, with_grad)
    with torch.no_grad():
        m.relative_position_bias_table.add_(1.0 * torch.randn_like(m.relative_position_bias_table))
        after = m(x, (8, 8))
    torch.testing.assert_close(after, _masked_full_attention(m, x, (8, 8)).detach(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["window-attention", "ss2d", "lamamba", "mamba", "attention"])
def test_inference_mode_then_training_forward(name):
    """A latency run (inference mode) first must not poison cached index tensors."""
    torch.manual_seed(0)
    opts = {"num_heads": 4} if name in ("attention", "window-attention", "lamamba") else {}
    mixer = harness.create("mixer", name, dim=32, **opts)
    x = torch.randn(2, 36, 32)
    with torch.inference_mode():
        mixer(x, (6, 6))
    mixer(x, (6, 6)).sum().backward()


@pytest.mark.parametrize("shift", [0, 4])
def test_window_attention_takes_the_fused_sdpa_kernel(shift):
    """A 3-D bias sent SDPA down its unfused math path on the CPU, which grew 5-6x at 4x
    the tokens (tests/perf/test_mixer_perf.py times it)."""
    mixer = harness.create("mixer", "window-attention", dim=64, num_heads=4, window_size=8, shift=shift).eval()
    x = torch.randn(1, 16 * 16, 64)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mixer(x, (16, 16))
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops, sorted(ops)
