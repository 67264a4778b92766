"""Mamba (v1) token mixer over the tokens in raster order, the layout of mamba-ssm's Mamba.

    x, z = in_proj(tokens)                      d_inner = expand * dim each
    x    = SiLU(causal depthwise conv1d(x))     kernel d_conv
    dt, B, C = x_proj(x)                        dt of rank dt_rank, B and C of size d_state
    y    = selective_scan(x, dt_proj(dt), A = -exp(A_log), B, C, D, z, dt bias, softplus)
    out  = out_proj(y)

``directions=2`` adds a backward scan with its own conv, projections, A, D and dt over the
reversed sequence (Vision Mamba's bidirectional block); the two share in_proj, z and
out_proj, and their outputs are averaged before out_proj.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness import UserError

from .scan import selective_scan


def resolve_dt_rank(dt_rank, dim: int, owner: str) -> int:
    if dt_rank == "auto":
        return math.ceil(dim / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise UserError(f"{owner}: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


def init_ssm_(dt_weight: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
              dt_min: float = 0.001, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
    """mamba-ssm's initialisation, in place (tensors may carry leading direction axes).

    dt_proj weight uniform in +-dt_rank^-1/2; its bias the inverse softplus of a dt drawn
    log-uniformly in [dt_min, dt_max]; A_log = log(1..N) per channel, so A = -(1..N); D = 1."""
    with torch.no_grad():
        std = dt_weight.shape[-1] ** -0.5
        dt_weight.uniform_(-std, std)
        dt = torch.exp(torch.rand_like(dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt
        A_log.copy_(torch.log(torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32)).expand_as(A_log))
        D.fill_(1.0)


class SSMCore(nn.Module):
    """One scan direction's own parameters: x_proj, dt_proj, A_log, D, and the scan."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.reset_parameters_()

    def reset_parameters_(self) -> None:
        init_ssm_(self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x, z: (B, d_inner, L) -> (B, d_inner, L)."""
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # the bias goes in as delta_bias
        return selective_scan(x, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                              self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)


class MambaDirection(nn.Module):
    """Causal depthwise conv, SiLU, then the selective scan: one pass over the sequence."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.ssm = SSMCore(d_inner, d_state, dt_rank)

    def forward(self, x, z):
        x = F.silu(self.conv1d(x)[..., : x.shape[-1]])  # causal: drop the look-ahead outputs
        return self.ssm(x, z)


class Mamba(nn.Module):
    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 directions: int = 1):
        super().__init__()
        if directions not in (1, 2):
            raise UserError(f"mamba: directions must be 1 (forward) or 2 (forward and backward), got {directions!r}")
        d_inner = expand * dim
        rank = resolve_dt_rank(dt_rank, dim, "mamba")
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.directions = nn.ModuleList(MambaDirection(d_inner, d_state, d_conv, rank) for _ in range(directions))
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def reset_parameters_(self) -> None:
        for d in self.directions:
            d.ssm.reset_parameters_()

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        y = self.directions[0](x, z)
        if len(self.directions) == 2:
            y = (y + self.directions[1](x.flip(-1), z.flip(-1)).flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))


def mamba(dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto", directions: int = 1) -> Mamba:
    """Mamba v1 over tokens in raster order; ``directions`` 2 adds a backward scan."""
    return Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, directions=directions)
