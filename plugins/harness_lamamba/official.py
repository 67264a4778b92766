"""Checkpoints of the official LaMamba-Diff code (github.com/yunxiangfu2001/LaMamba-Diff) in ours.

Its ``train.py`` saves ``{"model", "ema", "opt", "args", "config"}``; the state dicts under
``model`` and ``ema`` use the names of its ``model/lamamba.py`` (blocks from
``LaMambaBlock_conditioned``, SS2D from ``model/vmamba.py``). They map onto ours one to one:

    patch_embed.proj / .norm                  x_embedder / x_norm
    layers.i.blocks.d.X                       encoder.i.blocks.d.X'
    layers.i.downsample.(norm|reduction)      downsample.i.(norm|reduction)     (i = 0, 1)
    mid_layer.blocks.d.X                      mid.blocks.d.X'
    layers_up.j.blocks.d.X                    decoder.j.blocks.d.X'             (j = 0: deepest)
    layers_up.j.upsample.(expand|norm)        upsample.j.(expand|norm)          (j = 2, 3)
    final_up.expand / .norm                   final_expand / final_expand_norm
    final_condition_projection                final_cond_proj
    pos_embed (1, n, n, C)                    pos_embed (1, n * n, C), row-major

and in a block (its forward: ``op`` after ``norm``, ``attn`` after ``norm_swin``, ``mlp``
after ``norm2``):

    condition_projection    cond_proj           norm        norms.0   op.*    mixers.0.*  (SS2D)
    norm2                   norm_mlp            norm_swin   norms.1   attn.*  mixers.1.*  (window attention)

``attn.relative_position_index`` and ``attn_mask`` are buffers derived from the window size
and the map; ours recomputes them, so they are dropped. At XL (256x256) that is 683 keys:
656 renamed, ``pos_embed`` reshaped, 26 buffers dropped.
"""
from __future__ import annotations

import re

import torch

from harness import UserError

# Top-level names of the official model, none of which ours uses: how a checkpoint is recognised.
OFFICIAL_PREFIXES = ("patch_embed.", "layers.", "mid_layer.", "layers_up.", "final_up.", "final_condition_projection.")

_TOP = [  # (official, ours) for names outside the blocks
    (r"patch_embed\.proj\.(weight|bias)", r"x_embedder.\1"),
    (r"patch_embed\.norm\.(weight|bias)", r"x_norm.\1"),
    (r"layers\.(\d+)\.downsample\.(norm|reduction)\.(weight|bias)", r"downsample.\1.\2.\3"),
    (r"layers_up\.(\d+)\.upsample\.(expand|norm)\.(weight|bias)", r"upsample.\1.\2.\3"),
    (r"final_up\.expand\.weight", "final_expand.weight"),
    (r"final_up\.norm\.(weight|bias)", r"final_expand_norm.\1"),
    (r"final_condition_projection\.(weight|bias)", r"final_cond_proj.\1"),
    (r"(pos_embed|y_embedder\.embedding_table\.weight|t_embedder\.mlp\.[02]\.(?:weight|bias)"
     r"|final_adaLN_modulation\.1\.(?:weight|bias)|final_linear\.(?:weight|bias))", r"\1"),
]
_STAGES = [(r"layers\.(\d+)\.blocks\.(\d+)\.", r"encoder.\1.blocks.\2."),
           (r"mid_layer\.blocks\.(\d+)\.", r"mid.blocks.\1."),
           (r"layers_up\.(\d+)\.blocks\.(\d+)\.", r"decoder.\1.blocks.\2.")]
_BLOCK = [  # within a block
    (r"condition_projection\.(weight|bias)", r"cond_proj.\1"),
    (r"norm\.(weight|bias)", r"norms.0.\1"),
    (r"norm_swin\.(weight|bias)", r"norms.1.\1"),
    (r"norm2\.(weight|bias)", r"norm_mlp.\1"),
    (r"op\.(in_proj\.weight|conv2d\.weight|conv2d\.bias|x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds"
     r"|out_norm\.weight|out_norm\.bias|out_proj\.weight)", r"mixers.0.\1"),
    (r"attn\.(relative_position_bias_table|qkv\.weight|qkv\.bias|proj\.weight|proj\.bias)", r"mixers.1.\1"),
    (r"mlp\.(fc[12]\.(?:weight|bias))", r"mlp.\1"),
    (r"adaLN_modulation\.1\.(weight|bias)", r"adaLN_modulation.1.\1"),
]
_DROPPED = re.compile(r"(layers|layers_up)\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)"
                      r"|mid_layer\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)")


def is_official(state: dict) -> bool:
    return any(k.startswith(OFFICIAL_PREFIXES) for k in state)


def official_name(key: str) -> str | None:
    """Our name for the official ``key``; None for a buffer we recompute. Raises KeyError if
    ``key`` is no name of the official model."""
    if _DROPPED.fullmatch(key):
        return None
    for pattern, ours in _TOP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, ours, key)
    for stage, ours_stage in _STAGES:
        head = re.match(stage, key)
        if head:
            rest = key[head.end():]
            for pattern, ours in _BLOCK:
                if re.fullmatch(pattern, rest):
                    return head.expand(ours_stage) + re.sub(pattern, ours, rest)
    raise KeyError(key)


def _hint(key: str) -> str:
    if key.endswith("conv2d.bias"):
        return " (the checkpoint's SS2D conv has a bias: build with ssm: {name: ss2d, conv_bias: true})"
    if key.endswith(("A_logs", "x_proj_weight")):
        return " (its SSM state size differs: set d_state to the checkpoint's SSM_D_STATE)"
    if key == "pos_embed":
        return " (its latent size differs: set input_size to the checkpoint's image size / 8)"
    return ""


def from_official(state: dict, model: torch.nn.Module, source: str) -> dict:
    """``state`` (official names) as a state dict of ``model`` (ours); any key of the official
    checkpoint that has no place in ``model`` is a one-line UserError naming it."""
    from .models import LaMambaDiff

    what = f"pretrained {source!r} (official LaMamba-Diff checkpoint)"
    block = model.encoder[0].blocks[0] if isinstance(model, LaMambaDiff) else None
    kinds = [type(m).__name__ for m in block.mixers] if block is not None else []
    if kinds != ["SS2D", "WindowAttention"]:
        raise UserError(f"{what}: the official model has ss2d and window-attention branches; this one has "
                        f"{kinds or type(model).__name__} (leave ssm, attn and mixer at their defaults)")
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        try:
            name = official_name(key)
        except KeyError:
            raise UserError(f"{what}: key {key!r} is no parameter of the official model that maps onto ours") from None
        if name is None:
            continue
        if name not in own:
            raise UserError(f"{what}: key {key!r} has no counterpart {name!r} in this model{_hint(key)}")
        if key == "pos_embed" and value.dim() == 4:  # (1, n, n, C) -> (1, n * n, C), row-major as ours
            value = value.flatten(1, 2)
        if tuple(value.shape) != tuple(own[name].shape):
            raise UserError(f"{what}: key {key!r} has shape {tuple(value.shape)}, this model's {name!r} "
                            f"{tuple(own[name].shape)}{_hint(key)}")
        out[name] = value
    missing = [k for k in own if k not in out]
    if missing:
        raise UserError(f"{what}: {len(missing)} of this model's tensors are not in it, first {missing[0]!r} "
                        f"(is it the same configuration: size, depths, widths?)")
    return out


def to_official(state: dict, names: list[str]) -> dict:
    """Our ``state`` under the official ``names`` (their pos_embed shape too): the inverse map,
    for tests and for taking a model of ours back to the official code."""
    out = {}
    for key in names:
        name = official_name(key)
        if name is not None:
            value = state[name]
            if key == "pos_embed":
                n = int(round(value.shape[1] ** 0.5))
                value = value.reshape(1, n, n, value.shape[-1])
            out[key] = value
    return out
