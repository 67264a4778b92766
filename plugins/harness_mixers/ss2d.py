"""SS2D: the four-direction 2-D selective scan of VMamba, as LaMamba-Diff's SSM branch.

    x, z = in_proj(tokens)                      Linear C -> 4C, no bias; d_inner = expand * C each
    x    = SiLU(depthwise conv d_conv x d_conv)   no bias, as LaMamba-Diff's released config
                                                (SSM_CONV_BIAS: false); conv_bias=True adds it (VMamba)
    four scans over the map (``snake``, the default: LaMamba-Diff's continuous paths, two by
    rows and two by columns, every other row/column walked backwards so consecutive tokens stay
    neighbours; see scan_orders), each with its own x_proj, dt_proj, A, D; outputs put back in
    place (raster order) and summed
    out  = out_proj(LayerNorm(y) * SiLU(z))    Linear 2C -> C, no bias

The four directions run as one scan of width 4 * d_inner with four groups of B and C.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._cache import shape_cache
from .mamba import init_ssm_, resolve_dt_rank
from .scan import selective_scan

K = 4  # directions


def _snake(grid: np.ndarray) -> np.ndarray:
    """Row by row, every other row backwards: consecutive steps stay neighbours."""
    grid = grid.copy()
    grid[1::2] = grid[1::2, ::-1]
    return grid.ravel()


@shape_cache
def scan_orders(h: int, w: int, snake: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, L) raster index visited at each step of each direction, and the flat (K * L) index
    that puts the (K, L) outputs back in raster order, direction by direction.

    ``snake`` follows LaMamba-Diff's continuous paths (official ``model/continuous_scan.py``,
    ``get_continuous_paths``): rows from the top-left corner (rows downward) and from the
    bottom-left corner (rows upward), each first row walked rightward; columns from the
    bottom-left corner (columns rightward) and from the bottom-right corner (columns
    leftward), each first column walked upward. Without it, VMamba's cross-scan: raster rows,
    their reverse, raster columns, their reverse.

    Built with numpy: index bookkeeping is no model compute, so fvcore's trace must not see it."""
    grid = np.arange(h * w).reshape(h, w)
    if snake:
        order = np.stack([_snake(grid), _snake(grid[::-1]), _snake(grid[::-1].T), _snake(grid[::-1, ::-1].T)])
    else:
        rows, cols = grid.ravel(), grid.T.ravel()
        order = np.stack([rows, rows[::-1], cols, cols[::-1]])
    back = np.argsort(order, axis=-1) + (h * w) * np.arange(K)[:, None]
    return torch.from_numpy(order.copy()), torch.from_numpy(back.ravel().copy())


class SS2D(nn.Module):
    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, dt_rank="auto", d_conv: int = 3,
                 snake: bool = True, conv_bias: bool = False, scan_d_term: bool = False):
        super().__init__()
        d_inner = expand * dim
        self.d_inner, self.d_state, self.snake = d_inner, d_state, bool(snake)
        self.scan_d_term = bool(scan_d_term)  # FLOP counts only: add B·D·L for D·u, as the official flops()
        self.dt_rank = resolve_dt_rank(dt_rank, dim, "ss2d")
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        # Per-direction parameters, stacked on a leading axis of K (VMamba's layout).
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.reset_parameters_()

    def reset_parameters_(self) -> None:
        """x_proj as nn.Linear's default; dt, A and D as mamba-ssm's (see init_ssm_)."""
        bound = self.d_inner ** -0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        init_ssm_(self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = hw
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.transpose(1, 2).reshape(b, self.d_inner, h, w))).flatten(2)  # (B, d, L)
        order, back = scan_orders(h, w, self.snake)
        xs = x[:, :, order.to(x.device)].transpose(1, 2)  # (B, K, d, L): each direction's sequence
        # Batched matmuls with the batch operand first (fvcore counts these exactly; einsum's
        # count goes through numpy's path estimate and is off).
        proj = xs.transpose(2, 3) @ self.x_proj_weight.transpose(1, 2)  # (B, K, L, rank + 2N)
        dt, B, C = proj.split([self.dt_rank, self.d_state, self.d_state], dim=3)
        delta = (dt @ self.dt_projs_weight.transpose(1, 2)).transpose(2, 3)  # (B, K, d, L)
        y = selective_scan(xs.reshape(b, -1, n), delta.reshape(b, -1, n), -torch.exp(self.A_logs.float()),
                           B.transpose(2, 3), C.transpose(2, 3), self.Ds.float(),
                           delta_bias=self.dt_projs_bias.flatten().float(),
                           delta_softplus=True, count_d_term=self.scan_d_term).view(b, K, self.d_inner, n)
        # Back to raster order (position p of direction k was visited at step argsort(order)[k, p]).
        y = y.transpose(2, 3).reshape(b, K * n, self.d_inner)[:, back.to(x.device)]
        y = y.view(b, K, n, self.d_inner).sum(1)
        y = self.out_norm(y.to(x.dtype)) * F.silu(z)
        return self.out_proj(y)


def ss2d(dim: int, d_state: int = 16, expand: int = 2, dt_rank="auto", d_conv: int = 3, snake: bool = True,
         conv_bias: bool = False, scan_d_term: bool = False) -> SS2D:
    """VMamba/LaMamba-Diff four-direction 2-D selective scan (the SSM branch).

    ``conv_bias``: a bias on the depthwise conv (VMamba's default; LaMamba-Diff's released
    config has none). ``scan_d_term``: FLOP counts add B·D·L per scan for the skip term D·u,
    as the official ``flops()`` does (the output is the same)."""
    return SS2D(dim, d_state=d_state, expand=expand, dt_rank=dt_rank, d_conv=d_conv, snake=snake,
                conv_bias=conv_bias, scan_d_term=scan_d_term)
