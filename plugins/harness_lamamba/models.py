"""LaMamba-Diff: a U-Net of blocks that mix tokens with a 2-D selective scan and window attention.

Structure per the official code (github.com/yunxiangfu2001/LaMamba-Diff; arXiv 2408.02615):

- patch size 1 on the latent: a 1x1 conv to the first width, LayerNorm, plus a learnable
  position embedding initialised with 2-D sin-cos;
- four encoder stages (widths 320, 640, 1280, 1280 at XL) on maps of size n, n/2, n/4, n/4:
  patch merging (2x2 concat, LayerNorm, Linear 4C -> 2C) after the first two only;
- a bottleneck of 2 blocks at n/4, wrapped in a residual (``x + mid(x)``, as in the code);
- four decoder stages mirroring the encoder with one block more each; patch expanding
  (Linear C -> 2C, pixel shuffle, LayerNorm) in front of the last two; each decoder stage
  adds (not concatenates) the output of its encoder twin;
- every block: pre-norm adaLN-Zero with shift/scale/gate for each branch,
  x += g * SSM(mod(LN x)); x += g * WindowAttention(mod(LN x)); x += g * MLP(mod(LN x)),
  LayerNorm with affine (eps 1e-5), MLP ratio 4 with exact GELU, 16 heads;
- the condition t + y lives at the deepest width (1280) and is projected to a block's width
  by a Linear in that block (encoder blocks narrower than 1280, and every decoder block);
- output: a DiT-style adaLN final layer to noise and learned variance.

Windows of 8 are shifted by 4 in every other block of a stage; a stage whose map is no larger
than the window attends globally (window = map, no shift), which at 256x256 means the three
1280-wide stages and the bottleneck.

The branch mixers are registry components, so any mixer can be swapped in: ``ssm`` and
``attn`` name the two branches (None drops one), and ``mixer`` replaces both by a single
branch (adaLN 6C then, like a DiT block), which puts every mixer into the same U-Net.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness import UserError, build_mixer, suggest
from harness_dit import LabelEmbedder, Mlp, TimestepEmbedder, get_2d_sincos_pos_embed, modulate


@dataclass(frozen=True)
class LaMambaConfig:
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]  # encoder; each decoder stage has one block more
    bottleneck: int
    num_heads: int


# XL is the paper's public configuration. S, B and L are OUR scaling, not the paper's (it
# publishes only XL): the widths are multiplied by one factor, depths kept, the factor chosen
# so that the parameter count lands nearest DiT-S/2, B/2 and L/2 (33M, 130M, 458M) among
# widths divisible by the head count. "tiny" is ours too, for CPU tests and suites.
LAMAMBA_SIZES = {
    "tiny": LaMambaConfig((32, 64, 128, 128), (1, 1, 1, 1), 1, 4),
    "S": LaMambaConfig((72, 144, 288, 288), (2, 2, 2, 2), 2, 8),
    "B": LaMambaConfig((144, 288, 576, 576), (2, 2, 2, 2), 2, 16),
    "L": LaMambaConfig((272, 544, 1088, 1088), (2, 2, 2, 2), 2, 16),
    "XL": LaMambaConfig((320, 640, 1280, 1280), (2, 2, 2, 2), 2, 16),
}


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), LayerNorm, Linear 4C -> out (no bias): half the map."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x, hw):
        h, w = hw
        x = x.unflatten(1, (h, w))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.flatten(1, 2))), (h // 2, w // 2)


class PatchExpanding(nn.Module):
    """Linear C -> 2C (no bias), pixel shuffle by 2 (C/2 channels), LayerNorm: double the map."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x, hw):
        h, w = hw
        x = self.expand(x).unflatten(1, (h, w))  # B H W (2 2 C/2)
        b, c = x.shape[0], x.shape[-1] // 4
        x = x.reshape(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 4 * h * w, c)
        return self.norm(x), (2 * h, 2 * w)


class LaMambaBlock(nn.Module):
    """adaLN-Zero over any number of token-mixer branches, then the MLP.

    With the default branches (SSM, window attention) the modulation is 9C: shift, scale
    and gate for each of the three residual branches."""

    def __init__(self, dim: int, cond_dim: int, branches: list[Any], hints: dict, mlp_ratio: float,
                 project_condition: bool):
        super().__init__()
        # The condition lives at the deepest width; blocks of another width (and, in the
        # official code, every decoder block) project it with their own Linear.
        self.cond_proj = nn.Linear(cond_dim, dim) if project_condition else nn.Identity()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-5) for _ in branches)
        self.mixers = nn.ModuleList(build_mixer(spec, dim, **hints) for spec in branches)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * (len(branches) + 1) * dim))

    def forward(self, x, c, hw):
        mods = self.adaLN_modulation(self.cond_proj(c)).unsqueeze(1).chunk(3 * (len(self.mixers) + 1), dim=-1)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers)):
            shift, scale, gate = mods[3 * i: 3 * i + 3]
            x = x + gate * mixer(norm(x) * (1 + scale) + shift, hw)
        shift, scale, gate = mods[-3:]
        return x + gate * self.mlp(self.norm_mlp(x) * (1 + scale) + shift)


class Stage(nn.Module):
    """Blocks at one resolution; shifted windows in every other block."""

    def __init__(self, dim: int, depth: int, res: int, cond_dim: int, branches: list[Any], num_heads: int,
                 window_size: int, d_state: int, mlp_ratio: float, project_condition: bool, first_index: int,
                 scan_d_term: bool = False):
        super().__init__()
        blocks = []
        for d in range(depth):
            if res <= window_size:  # the whole map fits one window: global attention, no shift
                window, shift = res, 0
            else:
                window, shift = window_size, (window_size // 2 if d % 2 else 0)
            hints = dict(num_heads=num_heads, window_size=window, shift_size=shift, d_state=d_state,
                         block_index=first_index + d)
            if scan_d_term:  # only then: a mixer that takes no such option still builds
                hints["scan_d_term"] = True
            blocks.append(LaMambaBlock(dim, cond_dim, branches, hints, mlp_ratio, project_condition))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, c, hw):
        for block in self.blocks:
            x = block(x, c, hw)
        return x


class LaMambaDiff(nn.Module):
    def __init__(self, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 config: LaMambaConfig = LAMAMBA_SIZES["XL"], branches: list[Any] = ("ss2d", "window-attention"),
                 d_state: int = 16, window_size: int = 8, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 learn_sigma: bool = True, scan_d_term: bool = False):
        super().__init__()
        widths, depths = config.widths, config.depths
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        cond = widths[-1]
        # Map sizes: n, n/2, n/4, n/4 (merging after the first two stages only).
        res = [input_size, input_size // 2, input_size // 4, input_size // 4]
        self.res = res
        branches = list(branches)
        stage = dict(cond_dim=cond, branches=branches, num_heads=config.num_heads, window_size=window_size,
                     d_state=d_state, mlp_ratio=mlp_ratio, scan_d_term=scan_d_term)

        self.x_embedder = nn.Conv2d(in_channels, widths[0], kernel_size=1)
        self.x_norm = nn.LayerNorm(widths[0], eps=1e-5)
        self.pos_embed = nn.Parameter(torch.zeros(1, input_size * input_size, widths[0]))
        self.t_embedder = TimestepEmbedder(cond)
        self.y_embedder = LabelEmbedder(num_classes, cond, class_dropout_prob) if num_classes else None
        # the label fed for a dropped class (classifier-free guidance): row num_classes of the table
        self.null_class = num_classes if class_dropout_prob > 0 else None

        index = 0
        self.encoder, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i in range(4):
            self.encoder.append(Stage(widths[i], depths[i], res[i], project_condition=widths[i] != cond,
                                      first_index=index, **stage))
            index += depths[i]
            self.downsample.append(PatchMerging(widths[i], widths[i + 1]) if i < 2 else nn.Identity())
        self.mid = Stage(cond, config.bottleneck, res[3], project_condition=False, first_index=index, **stage)
        index += config.bottleneck
        self.decoder, self.upsample = nn.ModuleList(), nn.ModuleList()
        for j, i in enumerate(reversed(range(4))):  # decoder stage j is the twin of encoder stage i
            self.upsample.append(PatchExpanding(widths[i + 1]) if i < 2 else nn.Identity())
            self.decoder.append(Stage(widths[i], depths[i] + 1, res[i], project_condition=True,
                                      first_index=index, **stage))
            index += depths[i] + 1

        # Final layer: Linear + LayerNorm (the code's patch expanding by 1), then DiT's adaLN head.
        self.final_expand = nn.Linear(widths[0], widths[0], bias=False)
        self.final_expand_norm = nn.LayerNorm(widths[0], eps=1e-5)
        self.final_cond_proj = nn.Linear(cond, widths[0])
        self.norm_final = nn.LayerNorm(widths[0], elementwise_affine=False, eps=1e-6)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(widths[0], 2 * widths[0]))
        self.final_linear = nn.Linear(widths[0], self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.input_size)
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for stage in [*self.encoder, self.mid, *self.decoder]:
            for block in stage.blocks:
                for mixer in block.mixers:  # mixers with their own init (SSM A, D, dt) redo it
                    if hasattr(mixer, "reset_parameters_"):
                        mixer.reset_parameters_()
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[-1].bias)
        # Zero output like DiT (the official code means to, but its loop misses the layer).
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def forward(self, x, t, y=None):
        b = x.shape[0]
        # The map size as Python ints (the model is built for one size, like its position
        # embedding): under fvcore's trace x.shape holds tensors, which mixers index with.
        h = w = self.input_size
        x = self.x_norm(self.x_embedder(x).flatten(2).transpose(1, 2)) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:  # unconditional: the null class
                y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, self.training)
        hw, skips = (h, w), []
        for stage, down in zip(self.encoder, self.downsample):
            x = stage(x, c, hw)
            skips.append(x)
            if isinstance(down, PatchMerging):
                x, hw = down(x, hw)
        x = x + self.mid(x, c, hw)
        for stage, up in zip(self.decoder, self.upsample):
            if isinstance(up, PatchExpanding):
                x, hw = up(x, hw)
            x = stage(x + skips.pop(), c, hw)
        x = self.final_expand_norm(self.final_expand(x))
        shift, scale = self.final_adaLN_modulation(self.final_cond_proj(c)).chunk(2, dim=1)
        x = self.final_linear(modulate(self.norm_final(x), shift, scale))
        return x.transpose(1, 2).reshape(b, self.out_channels, h, w)


_DEFAULT_SSM, _DEFAULT_ATTN = "ss2d", "window-attention"


def lamamba(*, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, context_dim: int = 0,
            size: str = "XL", ssm: Any = _DEFAULT_SSM, attn: Any = _DEFAULT_ATTN, mixer: Any = None,
            d_state: int = 16, window_size: int = 8, mlp_ratio: float = 4.0, learn_sigma: bool = True,
            class_dropout_prob: float = 0.1, widths: list[int] | None = None, depths: list[int] | None = None,
            bottleneck_depth: int | None = None, num_heads: int | None = None,
            pretrained: str | None = None, checkpoint_key: str | None = None, scan_d_term: bool = False) -> LaMambaDiff:
    """LaMamba-Diff U-Net (SS2D + window attention): XL is the paper's; tiny/S/B/L are our scaling.

    ``pretrained``/``checkpoint_key`` as for DiT: a state dict, or a checkpoint's ``ema`` (default)
    or ``model`` entry; ours, or one the official code's ``train.py`` wrote (its names are mapped,
    see official.py).

    ``scan_d_term``: count FLOPs as the official ``flops()`` does, which adds B·D·L per selective
    scan for its skip term D·u (ours leaves it out, as fvcore counts no elementwise product);
    the model computes the same either way."""
    if size not in LAMAMBA_SIZES:
        raise UserError(f"unknown LaMamba-Diff size {size!r}{suggest(size, LAMAMBA_SIZES)}")
    if context_dim:
        raise UserError("lamamba is class-conditional; context_dim must be 0 (text context is not supported)")
    if input_size < 4 or input_size % 4:
        raise UserError(f"lamamba input_size must be a multiple of 4 (two 2x merges), got {input_size}")
    if mixer is not None:
        if ssm != _DEFAULT_SSM or attn != _DEFAULT_ATTN:
            raise UserError("lamamba: give either 'mixer' (one branch) or 'ssm'/'attn' (two branches), not both")
        branches = [mixer]
    else:
        branches = [spec for spec in (ssm, attn) if spec is not None]
        if not branches:
            raise UserError("lamamba: 'ssm' and 'attn' are both None; keep at least one token mixer")
    base = LAMAMBA_SIZES[size]
    config = LaMambaConfig(
        widths=tuple(widths) if widths is not None else base.widths,
        depths=tuple(depths) if depths is not None else base.depths,
        bottleneck=base.bottleneck if bottleneck_depth is None else bottleneck_depth,
        num_heads=num_heads or base.num_heads,
    )
    if len(config.widths) != 4 or len(config.depths) != 4:
        raise UserError(f"lamamba widths and depths need 4 entries each, got {list(config.widths)} and "
                        f"{list(config.depths)}")
    bad = [w for w in config.widths if w % config.num_heads or w % 4]
    if bad:
        raise UserError(f"lamamba widths {bad} must be divisible by num_heads={config.num_heads} and by 4")
    model = LaMambaDiff(input_size=input_size, in_channels=in_channels, num_classes=num_classes, config=config,
                        branches=branches, d_state=d_state, window_size=window_size, mlp_ratio=mlp_ratio,
                        class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma, scan_d_term=scan_d_term)
    if pretrained:
        load_pretrained(model, pretrained, checkpoint_key)
    return model


def load_pretrained(model: LaMambaDiff, source: str, key: str | None = None) -> None:
    """A state dict or training checkpoint of ours or of the official code, read without running
    pickled code (harness.weights), into ``model`` strictly."""
    from harness import load_state_dict, load_state_into

    from .official import from_official, is_official

    state = load_state_dict(source, key=key, what="pretrained", key_option="checkpoint_key")
    if is_official(state):
        state = from_official(state, model, str(source))
    load_state_into(model, state, source, what="pretrained")


__all__ = ["LAMAMBA_SIZES", "LaMambaConfig", "LaMambaDiff", "lamamba"]
