"""DiT: adaLN-Zero transformer blocks over patch tokens of a latent.

Faithful to the reference implementation (facebookresearch/DiT): LayerNorm without affine
(eps 1e-6), adaLN-Zero modulation, fixed 2-D sin-cos position embedding, 256-d timestep
frequencies, a class table with one extra null entry for classifier-free guidance, a
zero-initialised final layer predicting noise and (optionally) variance. Parameter names
match the reference, so its checkpoints load with ``pretrained=PATH``. The token mixer of
every block is a registry component (``mixer`` option); ``attention`` reproduces DiT.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from harness import build_mixer

# size -> (depth, hidden size, heads). "tiny" is ours, for CPU runs; the rest are the paper's.
DIT_SIZES = {
    "tiny": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies of t, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: int = 10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # in the weights' dtype (bf16 latency); a quantised MLP has no float weights and takes float32
        return self.mlp(freq.to(next(self.mlp.parameters(), freq).dtype))


class LabelEmbedder(nn.Module):
    """Class table with an extra null class; labels are dropped to it for guidance training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch, flattened to tokens in raster order."""

    def __init__(self, patch: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * mixer(mod(LN x)); x += gate * MLP(mod(LN x))."""

    def __init__(self, hidden_size: int, num_heads: int, mixer: Any, mlp_ratio: float = 4.0, index: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build_mixer(mixer, hidden_size, num_heads=num_heads, block_index=index)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, hw):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hw)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size: int = 32, patch: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, mixer: Any = "attention"):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"patch {patch} does not divide input_size {input_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch = patch
        self.input_size = input_size
        self.num_classes = num_classes
        self.grid = input_size // patch

        self.x_embedder = PatchEmbed(patch, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        # the label fed for a dropped class (classifier-free guidance): row num_classes of the table
        self.null_class = num_classes if class_dropout_prob > 0 else None
        # Fixed, not learned: a buffer keeps it out of the parameter count and the optimiser,
        # and under the reference's key so its checkpoints load.
        self.register_buffer("pos_embed", torch.zeros(1, self.grid * self.grid, hidden_size))
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mixer, mlp_ratio=mlp_ratio, index=i) for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            if hasattr(block.attn, "reset_parameters_"):  # mixers with their own init (SSM A, D, dt)
                block.attn.reset_parameters_()
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        c, p, h = self.out_channels, self.patch, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q (a permute: fvcore counts einsum)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x, t, y=None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:  # unconditional: the null class
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, self.training)
        hw = (self.grid, self.grid)
        for block in self.blocks:
            x = block(x, c, hw)
        return self.unpatchify(self.final_layer(x, c))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def load_checkpoint(model: nn.Module, path: str, key: str | None = None) -> None:
    """A local .pt/.pth/.safetensors file or an http(s) URL, read without running pickled code:
    a state dict, or the ``key`` entry of a train.py checkpoint (``ema`` unless told otherwise)."""
    from harness import load_into

    load_into(model, path, key=key, what="pretrained")


def dit(*, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, context_dim: int = 0,
        size: str = "XL", patch: int = 2, mixer: Any = "attention", learn_sigma: bool = True,
        class_dropout_prob: float = 0.1, mlp_ratio: float = 4.0, depth: int | None = None,
        hidden_size: int | None = None, num_heads: int | None = None, pretrained: str | None = None,
        checkpoint_key: str | None = None) -> DiT:
    """DiT (Peebles & Xie): sizes tiny/S/B/L/XL, patch 2/4/8, adaLN-Zero, class-conditional.

    ``pretrained``: a state dict or a facebookresearch/DiT ``train.py`` checkpoint (file or URL);
    of the latter ``checkpoint_key`` picks ``ema`` (the default, what DiT samples with) or ``model``."""
    if size not in DIT_SIZES:
        from harness import UserError, suggest

        raise UserError(f"unknown DiT size {size!r}{suggest(size, DIT_SIZES)}")
    if context_dim:
        raise ValueError("DiT is class-conditional; text context (context_dim > 0) is not supported")
    d, h, n = DIT_SIZES[size]
    model = DiT(input_size=input_size, patch=patch, in_channels=in_channels, hidden_size=hidden_size or h,
                depth=depth or d, num_heads=num_heads or n, mlp_ratio=mlp_ratio,
                class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                mixer=mixer)
    if pretrained:
        load_checkpoint(model, pretrained, checkpoint_key)
    return model
