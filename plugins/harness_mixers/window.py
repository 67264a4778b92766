"""Swin-style window attention: attention inside non-overlapping windows, cost linear in tokens.

Tokens are cut into windows of window_size x window_size (the map is zero-padded up to a
multiple, and padded keys are masked out); every window attends on its own, as one batch of
short sequences (not a masked full attention), with a learned relative position bias. With
``shift_size`` the map is rolled first, so that windows straddle the previous block's borders,
and Swin's mask stops tokens that the roll brought together from attending to each other. A
side no longer than the window is one window: a map no larger than the window attends
globally, unshifted.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import UserError

from ._cache import shape_cache

_MASKED = -100.0  # Swin's mask value: exp(-100) is nothing next to any real logit


# The index and mask helpers use numpy: they are bookkeeping, cached per map size, and
# fvcore's trace must see only the model's compute.
@shape_cache
def _relative_index(wh: int, ww: int, size: int) -> torch.Tensor:
    """Index into the (2 size - 1)^2 bias table for every pair of cells of a wh x ww window."""
    ys, xs = np.divmod(np.arange(wh * ww), ww)
    dy = ys[:, None] - ys[None, :] + size - 1  # offsets shifted to be >= 0
    dx = xs[:, None] - xs[None, :] + size - 1
    return torch.from_numpy(dy * (2 * size - 1) + dx).flatten()


def _windows(a: np.ndarray, wh: int, ww: int) -> np.ndarray:
    """(H, W) -> (windows, wh * ww): windows in raster order, cells in raster order within."""
    h, w = a.shape
    return a.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)


@shape_cache
def _gather_index(h: int, w: int, wh: int, ww: int, sh: int, sw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each window cell comes from, and where each token's output lands.

    ``into``: (windows * wh * ww,) raster index into the padded map of each window cell, after
    the map is rolled by (-sh, -sw); ``back``: (h * w,) the window cell of each original token.
    One gather each way replaces pad, roll, partition and their inverses (six copies)."""
    hp, wp = h + (-h % wh), w + (-w % ww)
    rows, cols = np.meshgrid((np.arange(hp) + sh) % hp, (np.arange(wp) + sw) % wp, indexing="ij")
    into = _windows(rows * wp + cols, wh, ww).ravel()
    where = np.empty(hp * wp, dtype=np.int64)
    where[into] = np.arange(into.size)
    back = where.reshape(hp, wp)[:h, :w].ravel()
    return torch.from_numpy(into), torch.from_numpy(back)


@shape_cache
def _mask(h: int, w: int, pad_h: int, pad_w: int, wh: int, ww: int, sh: int, sw: int) -> torch.Tensor | None:
    """Additive mask (windows, n, n) for a padded h x w map rolled by (-sh, -sw), or None.

    Tokens attend only within their own region (Swin's: the roll brings far-apart edges into
    one window), and never to padding."""
    if not (sh or sw or pad_h or pad_w):
        return None
    hp, wp = h + pad_h, w + pad_w
    region = np.zeros((hp, wp), dtype=np.int64)
    row_cuts = (slice(0, hp - wh), slice(hp - wh, hp - sh), slice(hp - sh, hp)) if sh else (slice(0, hp),)
    col_cuts = (slice(0, wp - ww), slice(wp - ww, wp - sw), slice(wp - sw, wp)) if sw else (slice(0, wp),)
    for i, rows in enumerate(row_cuts):
        for j, cols in enumerate(col_cuts):
            region[rows, cols] = 3 * i + j
    pad = np.zeros((hp, wp), dtype=bool)
    pad[h:], pad[:, w:] = True, True
    pad = np.roll(pad, (-sh, -sw), axis=(0, 1))  # padding is rolled with the map
    region, pad = _windows(region, wh, ww), _windows(pad, wh, ww)
    blocked = (region[:, :, None] != region[:, None, :]) | pad[:, None, :]
    return torch.from_numpy(np.where(blocked, _MASKED, 0.0).astype(np.float32))


class WindowAttention(nn.Module):
    """Multi-head self-attention within (shifted) windows, relative position bias (Swin)."""

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 8, shift_size: int = 0,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"window-attention: dim {dim} is not divisible by num_heads {num_heads}")
        if window_size < 1 or not 0 <= shift_size < window_size:
            raise UserError(f"window-attention: need window_size >= 1 and 0 <= shift_size < window_size, "
                            f"got window_size={window_size}, shift_size={shift_size}")
        self.num_heads, self.window_size, self.shift_size = num_heads, window_size, shift_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._cache = None  # (key, bias + mask) for forwards without gradients

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}"

    def _bias(self, wh: int, ww: int) -> torch.Tensor:
        index = _relative_index(wh, ww, self.window_size).to(self.relative_position_bias_table.device)
        return self.relative_position_bias_table[index].view(wh * ww, wh * ww, -1).permute(2, 0, 1)

    def _masked_bias(self, h, w, pad_h, pad_w, wh, ww, sh, sw, x) -> torch.Tensor:
        """Relative position bias (heads, t, t), plus the shift/padding mask: (nW, heads, t, t).

        Without gradients (sampling, benchmarks) the sum is cached until the bias table changes
        (its version counter moves on every in-place update), which saves a pass over a
        tensor as large as the attention matrices."""
        key = (h, w, wh, ww, sh, sw, x.device, x.dtype, self.relative_position_bias_table._version)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        bias = self._bias(wh, ww).to(x.dtype)
        mask = _mask(h, w, pad_h, pad_w, wh, ww, sh, sw)
        if mask is not None:
            bias = bias + mask.to(x.device, x.dtype)[:, None]
        if not torch.is_grad_enabled():
            self._cache = (key, bias)
        return bias

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        # A side no longer than the window is one window along it, and is never shifted.
        wh, ww = min(self.window_size, h), min(self.window_size, w)
        sh = self.shift_size if h > self.window_size else 0
        sw = self.shift_size if w > self.window_size else 0
        pad_h, pad_w = -h % wh, -w % ww
        if pad_h or pad_w:
            x = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_w, 0, pad_h)).flatten(1, 2)
        into, back = _gather_index(h, w, wh, ww, sh, sw)
        windows = x[:, into.to(x.device)]  # (B, nW * t, C): rolled, padded, cut into windows
        t = wh * ww
        nw = windows.shape[1] // t
        # 4-D (B * nW, heads, t, d): SDPA's fused CPU kernel takes 4-D only (5-D runs the
        # unfused math path, twice as slow at 4096 tokens).
        qkv = self.qkv(windows).view(b * nw, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self._masked_bias(h, w, pad_h, pad_w, wh, ww, sh, sw, x)  # (heads or nW * heads, t, t)
        if bias.dim() == 4 and b > 1:
            bias = bias.expand(b, -1, -1, -1, -1).reshape(b * nw, self.num_heads, t, t)
        elif bias.dim() == 3:
            # A 3-D mask sends SDPA to its unfused math path on the CPU (softmax of materialised
            # scores plus an all(-inf) pass over them), which cost 5-6x at 4x the tokens; a
            # 4-D one, broadcast over the windows, takes the fused kernel.
            bias = bias[None]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        out = self.proj(out.transpose(1, 2).reshape(b, nw * t, c))
        return out[:, back.to(x.device)]


def resolve_shift(shift, window_size: int, block_index: int) -> int:
    """``"auto"``: half a window in odd blocks (Swin, LaMamba-Diff); an int: that shift."""
    if shift == "auto":
        return window_size // 2 if block_index % 2 else 0
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise UserError(f"window-attention: shift must be 'auto' or an int, got {shift!r}")
    return shift


def window_attention(dim: int, num_heads: int = 8, window_size: int = 8, shift="auto", shift_size: int | None = None,
                     qkv_bias: bool = True, block_index: int = 0) -> WindowAttention:
    """Swin window attention. ``shift``: "auto" (half a window in odd blocks) or an int.

    ``shift_size`` is a backbone's hint (LaMamba-Diff decides per stage); an explicit int
    ``shift`` from the suite still wins over it."""
    if shift == "auto" and shift_size is not None:
        return WindowAttention(dim, num_heads, window_size, shift_size, qkv_bias)
    return WindowAttention(dim, num_heads, window_size, resolve_shift(shift, window_size, block_index), qkv_bias)
