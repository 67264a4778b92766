"""A U-ViT-style backbone and a depthwise-convolution token mixer.

U-ViT (Bao et al., "All are Worth Words") is an isotropic transformer with long skip
connections from the shallow half to the deep half. Here time and class are added to every
token rather than given as extra tokens, so that every block's mixer sees exactly the H x W
grid the harness's mixer contract promises; any registered mixer can replace attention.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from harness import build_mixer


class DWConvMixer(nn.Module):
    """Depthwise k x k conv over the token grid, then a pointwise projection: linear in tokens."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        return self.proj(self.conv(grid).flatten(2).transpose(1, 2))


def dwconv(dim: int, kernel_size: int = 7) -> DWConvMixer:
    """Depthwise-conv token mixer (k x k, then pointwise); cost linear in tokens."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"dwconv kernel_size must be odd and positive, got {kernel_size}")
    return DWConvMixer(dim, kernel_size)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block; ``skip`` (deep half) is fused in by a linear layer first."""

    def __init__(self, dim: int, heads: int, mixer: Any, index: int, skip: bool):
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = build_mixer(mixer, dim, num_heads=heads, block_index=index)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, hw, skip=None):
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        x = x + self.mixer(self.norm1(x), hw)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, input_size: int, in_channels: int, num_classes: int, patch: int, depth: int,
                 width: int, heads: int, mixer: Any):
        super().__init__()
        self.patch, self.in_channels, self.input_size = patch, in_channels, input_size
        self.learn_sigma = False
        grid = input_size // patch
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.time = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        # one extra row: the null class of classifier-free guidance
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        half = depth // 2
        self.down = nn.ModuleList(Block(width, heads, mixer, i, skip=False) for i in range(half))
        self.mid = Block(width, heads, mixer, half, skip=False)
        self.up = nn.ModuleList(Block(width, heads, mixer, half + 1 + i, skip=True) for i in range(half))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch * patch * in_channels)
        self.final = nn.Conv2d(in_channels, in_channels, 3, padding=1)  # smooths patch seams, as in U-ViT

    def forward(self, x, t, y=None):
        b, _, h, w = x.shape
        hw = (h // self.patch, w // self.patch)
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.time(timestep_embedding(t, tokens.shape[-1]))
        if self.label is not None and y is not None:
            cond = cond + self.label(y)
        tokens = tokens + cond[:, None]
        skips = []
        for block in self.down:
            tokens = block(tokens, hw)
            skips.append(tokens)
        tokens = self.mid(tokens, hw)
        for block in self.up:
            tokens = block(tokens, hw, skips.pop())
        out = self.head(self.norm(tokens))  # (B, h*w, p*p*C) -> (B, C, H, W)
        p, c = self.patch, self.in_channels
        out = out.reshape(b, hw[0], hw[1], p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return self.final(out)


def uvit(*, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, context_dim: int = 0,
         patch: int = 2, depth: int = 7, width: int = 256, heads: int = 4, mixer: Any = "attention") -> UViT:
    """U-ViT-style transformer with long skips; class-conditional; any token mixer."""
    if context_dim:
        raise ValueError("uvit is class-conditional; it takes no text context (context_dim must be 0)")
    if input_size % patch:
        raise ValueError(f"uvit: patch {patch} does not divide input_size {input_size}")
    if depth < 1 or depth % 2 == 0:
        raise ValueError(f"uvit: depth must be odd (down blocks, a middle block, up blocks), got {depth}")
    if width % heads:
        raise ValueError(f"uvit: width {width} is not divisible by heads {heads}")
    return UViT(input_size, in_channels, num_classes, patch, depth, width, heads, mixer)
