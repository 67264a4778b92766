"""The LaMamba-Diff token mixer as one unit: the SSM branch, then window attention.

A LaMamba-Diff block runs its two mixers as two residual branches, each with its own
adaLN modulation and gate. A DiT block has one mixer slot, modulated and gated once, so
inside it the composite is

    s   = SS2D(x)
    out = s + WindowAttention(LayerNorm(s))

(LayerNorm with affine, eps 1e-5, as LaMamba-Diff's). Swapping it into a DiT keeps DiT's
adaLN-Zero, MLP and global sizes, so the comparison isolates the mixer from the U-Net.
"""
from __future__ import annotations

import torch
from torch import nn

from .ss2d import SS2D
from .window import window_attention


class LaMambaMixer(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 8, shift="auto", shift_size: int | None = None,
                 d_state: int = 16, expand: int = 2, snake: bool = True, block_index: int = 0, conv_bias: bool = False,
                 scan_d_term: bool = False):
        super().__init__()
        self.ssm = SS2D(dim, d_state=d_state, expand=expand, snake=snake, conv_bias=conv_bias, scan_d_term=scan_d_term)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.attn = window_attention(dim, num_heads=num_heads, window_size=window_size, shift=shift,
                                     shift_size=shift_size, block_index=block_index)

    def reset_parameters_(self) -> None:
        self.ssm.reset_parameters_()

    def forward(self, x: torch.Tensor, hw) -> torch.Tensor:
        s = self.ssm(x, hw)
        return s + self.attn(self.norm(s), hw)


def lamamba(dim: int, num_heads: int = 8, window_size: int = 8, shift="auto", shift_size: int | None = None,
            d_state: int = 16, expand: int = 2, snake: bool = True, block_index: int = 0,
            conv_bias: bool = False, scan_d_term: bool = False) -> LaMambaMixer:
    """LaMamba-Diff's SS2D then window attention, as one mixer (see the module docstring)."""
    return LaMambaMixer(dim, num_heads=num_heads, window_size=window_size, shift=shift, shift_size=shift_size,
                        d_state=d_state, expand=expand, snake=snake, block_index=block_index, conv_bias=conv_bias,
                        scan_d_term=scan_d_term)
