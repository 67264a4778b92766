"""Checkpoints of the official LaMamba-Diff code (yunxiangfu2001/LaMamba-Diff) load into ours.

The official state-dict layout is written here from reading its code, not from our model:
``official_layout`` follows ``LaMambaDiff.__init__`` in ``model/lamamba.py`` (its layers,
``LaMambaBlock_conditioned``, ``WindowAttention``, ``PatchMerging2D``, ``PatchExpanding2D``,
``FinalPatchExpanding2D``) and ``SS2D.__initv2__`` in ``model/vmamba.py``; the tiny
configuration's keys and shapes are kept as data in ``data/lamamba_official_tiny.txt``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

import harness
from harness import UserError
from harness_lamamba.official import from_official, official_name, to_official

DATA = Path(__file__).parent / "data" / "lamamba_official_tiny.txt"
TINY = dict(dims=(32, 64, 128, 128), depths=(1, 1, 1, 1), bottleneck=1, latent=16, heads=4)


def official_layout(dims, depths, bottleneck, latent, heads, window=8, d_state=1, conv_bias=False,
                    num_classes=1000, in_chans=4) -> dict[str, tuple]:
    """{key: shape} of the official ``LaMambaDiff(...).state_dict()`` (buffers included)."""
    c0, cc = dims[0], dims[-1]
    s = {"pos_embed": (1, latent, latent, c0), "patch_embed.proj.weight": (c0, in_chans, 1, 1),
         "patch_embed.proj.bias": (c0,), "patch_embed.norm.weight": (c0,), "patch_embed.norm.bias": (c0,),
         "t_embedder.mlp.0.weight": (cc, 256), "t_embedder.mlp.0.bias": (cc,), "t_embedder.mlp.2.weight": (cc, cc),
         "t_embedder.mlp.2.bias": (cc,), "y_embedder.embedding_table.weight": (num_classes + 1, cc)}

    def block(p, c, res, d, project):
        if project:  # full_condition_project or condition_dim != hidden_dim
            s[p + "condition_projection.weight"], s[p + "condition_projection.bias"] = (c, cc), (c,)
        ws = min(window, res)  # input_resolution <= window_size: one window, no shift
        shift = 0 if res <= window or d % 2 == 0 else window // 2
        for n in ("norm_swin", "norm", "norm2"):
            s[f"{p}{n}.weight"], s[f"{p}{n}.bias"] = (c,), (c,)
        s[p + "attn.relative_position_bias_table"] = ((2 * ws - 1) ** 2, heads)
        s[p + "attn.relative_position_index"] = (ws * ws, ws * ws)
        s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = (c, c), (c,)
        if shift:
            s[p + "attn_mask"] = ((res // ws) ** 2, ws * ws, ws * ws)
        di, r = 2 * c, math.ceil(c / 16)  # ssm_ratio 2, dt_rank "auto"
        s.update({p + "op.in_proj.weight": (2 * di, c), p + "op.conv2d.weight": (di, 1, 3, 3),
                  p + "op.x_proj_weight": (4, r + 2 * d_state, di), p + "op.dt_projs_weight": (4, di, r),
                  p + "op.dt_projs_bias": (4, di), p + "op.A_logs": (4 * di, d_state), p + "op.Ds": (4 * di,),
                  p + "op.out_norm.weight": (di,), p + "op.out_norm.bias": (di,), p + "op.out_proj.weight": (c, di)})
        if conv_bias:
            s[p + "op.conv2d.bias"] = (di,)
        s.update({p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,), p + "mlp.fc2.weight": (c, 4 * c),
                  p + "mlp.fc2.bias": (c,), p + "adaLN_modulation.1.weight": (9 * c, c),
                  p + "adaLN_modulation.1.bias": (9 * c,)})

    for i in range(4):  # encoder: maps n, n/2, n/4, n/4; merging after the first two
        res = latent // 2 ** i if i < 2 else latent // 4
        for d in range(depths[i]):
            block(f"layers.{i}.blocks.{d}.", dims[i], res, d, dims[i] != cc)
        if i < 2:
            s[f"layers.{i}.downsample.reduction.weight"] = (dims[i + 1], 4 * dims[i])
            s[f"layers.{i}.downsample.norm.weight"] = s[f"layers.{i}.downsample.norm.bias"] = (4 * dims[i],)
    for d in range(bottleneck):
        block(f"mid_layer.blocks.{d}.", cc, latent // 4, d, False)
    up = dims[::-1]
    for i in range(4):  # decoder (sd_unet_decoder_design: one block more), full_condition_project
        res = latent // 4 if i < 1 else latent // 2 ** (4 - i - 1)
        if i > 1:
            s[f"layers_up.{i}.upsample.expand.weight"] = (2 * up[i - 1], up[i - 1])
            s[f"layers_up.{i}.upsample.norm.weight"] = s[f"layers_up.{i}.upsample.norm.bias"] = (up[i - 1] // 2,)
        for d in range(depths[-(i + 1)] + 1):
            block(f"layers_up.{i}.blocks.{d}.", up[i], res, d, True)
    s.update({"final_up.expand.weight": (c0, c0), "final_up.norm.weight": (c0,), "final_up.norm.bias": (c0,),
              "final_condition_projection.weight": (c0, cc), "final_condition_projection.bias": (c0,),
              "final_adaLN_modulation.1.weight": (2 * c0, c0), "final_adaLN_modulation.1.bias": (2 * c0,),
              "final_linear.weight": (2 * in_chans, c0), "final_linear.bias": (2 * in_chans,)})
    return s


BUFFERS = ("attn.relative_position_index", "attn_mask")


def _data() -> dict[str, tuple]:
    rows = (line.split() for line in DATA.read_text().splitlines() if line and not line.startswith("#"))
    return {key: tuple(int(n) for n in shape.split("x")) for key, shape in rows}


def _ours(**options):
    torch.manual_seed(0)
    opts = dict(size="tiny", input_size=16, d_state=1)
    opts.update(options)
    return harness.create("backbone", "lamamba", **opts)


def _randomise(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0 if p.dim() > 1 else 0.5))
    return model


def _inputs(batch=1, size=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randint(0, 1000, (batch,), generator=g))


def _official_state(ours: dict, layout: dict) -> dict:
    """Our weights under the official names, with the official buffers as its code builds them."""
    state = to_official(ours, list(layout))
    for key, shape in layout.items():
        if key.endswith(BUFFERS):
            state[key] = torch.zeros(shape) if key.endswith("attn_mask") else torch.zeros(shape, dtype=torch.long)
    assert set(state) == set(layout) and all(tuple(state[k].shape) == layout[k] for k in layout)
    return state


def _save_train_py(path, model_state, ema_state):
    """What the official train.py saves: model, ema, opt, args and the yacs config."""
    from yacs.config import CfgNode

    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    cfg.MODEL.TYPE = "LaMamba-Diff"
    cfg.MODEL.VSSM = CfgNode()
    cfg.MODEL.VSSM.SSM_D_STATE, cfg.MODEL.VSSM.SSM_CONV_BIAS, cfg.MODEL.VSSM.DEPTHS = 1, False, [1, 1, 1, 1]
    cfg.freeze()
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    opt.step()
    args = argparse.Namespace(model="LaMamba-Diff", image_size=128, num_classes=1000, num_heads=[4] * 4,
                              window_size=8, cfg="configs/LaMamba-DIff-XL.yaml", opts=None, ckpt=None)
    torch.save({"model": model_state, "ema": ema_state, "opt": opt.state_dict(), "args": args, "config": cfg}, path)


# -- the layout ------------------------------------------------------------------------------------
def test_the_data_file_is_the_official_layout_of_the_tiny_configuration():
    assert _data() == official_layout(**TINY)


def test_xl_official_keys_map_656_renamed_pos_embed_reshaped_26_buffers_dropped():
    layout = official_layout(dims=(320, 640, 1280, 1280), depths=(2, 2, 2, 2), bottleneck=2, latent=32, heads=16)
    names = {k: official_name(k) for k in layout}
    dropped = [k for k, v in names.items() if v is None]
    assert (len(layout), len(dropped)) == (683, 26)
    assert all(k.endswith(BUFFERS) for k in dropped)
    with torch.device("meta"):
        ours = harness.create("backbone", "lamamba", size="XL", d_state=1)
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    same = [k for k, v in names.items() if v is not None and own.get(v) == layout[k]]
    assert len(same) == 656 and set(names.values()) - {None} == set(own)  # + pos_embed, reshaped
    assert own["pos_embed"] == (1, 32 * 32, 320) and layout["pos_embed"] == (1, 32, 32, 320)
    # The official parameter count (its buffers aside) is ours, to the unit.
    official_params = sum(math.prod(v) for k, v in layout.items() if not k.endswith(BUFFERS))
    assert official_params == sum(p.numel() for p in ours.parameters()) == 652_484_648


def test_names_are_what_the_official_forward_runs():
    """Read off its forward: ``op`` after ``norm``, attention after ``norm_swin``, the MLP after
    ``norm2``; ``layers_up.0`` is the first decoder stage after the bottleneck (the deepest)."""
    pairs = {
        "layers.0.blocks.0.norm.weight": "encoder.0.blocks.0.norms.0.weight",
        "layers.3.blocks.1.norm_swin.bias": "encoder.3.blocks.1.norms.1.bias",
        "layers.1.blocks.1.norm2.weight": "encoder.1.blocks.1.norm_mlp.weight",
        "layers.2.blocks.0.op.A_logs": "encoder.2.blocks.0.mixers.0.A_logs",
        "mid_layer.blocks.1.attn.relative_position_bias_table": "mid.blocks.1.mixers.1.relative_position_bias_table",
        "layers_up.0.blocks.2.condition_projection.weight": "decoder.0.blocks.2.cond_proj.weight",
        "layers_up.1.blocks.0.op.conv2d.weight": "decoder.1.blocks.0.mixers.0.conv2d.weight",
        "layers_up.3.blocks.2.attn.qkv.bias": "decoder.3.blocks.2.mixers.1.qkv.bias",
        "layers.1.downsample.reduction.weight": "downsample.1.reduction.weight",
        "layers_up.2.upsample.expand.weight": "upsample.2.expand.weight",
        "patch_embed.norm.weight": "x_norm.weight",
        "final_up.norm.bias": "final_expand_norm.bias",
        "final_condition_projection.weight": "final_cond_proj.weight",
        "layers_up.3.blocks.1.attn_mask": None,
        "layers.0.blocks.0.attn.relative_position_index": None,
    }
    assert {k: official_name(k) for k in pairs} == pairs


# -- loading ---------------------------------------------------------------------------------------
def test_official_train_py_checkpoint_loads_with_identical_outputs(tmp_path, monkeypatch):
    layout = _data()
    ema, raw = _randomise(_ours()).eval(), _randomise(_ours())
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.01)
    path = tmp_path / "0050000.pt"
    _save_train_py(path, _official_state(raw.state_dict(), layout), _official_state(ema.state_dict(), layout))
    for name in [m for m in sys.modules if m == "yacs" or m.startswith("yacs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "yacs", None)  # importing yacs now fails: reading must not need it
    x, t, y = _inputs()
    loaded = _ours(pretrained=str(path)).eval()
    assert torch.equal(loaded(x, t, y), ema(x, t, y))
    loaded = _ours(pretrained=str(path), checkpoint_key="model").eval()
    assert torch.equal(loaded(x, t, y), raw.eval()(x, t, y))


def test_a_state_dict_with_the_official_names_lands_where_they_say():
    """Tensors made from the layout alone (not from a model of ours) go to the mapped places."""
    layout = _data()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=g) for k, v in layout.items() if not k.endswith(BUFFERS)}
    model = _ours()
    model.load_state_dict(from_official(state, model, "x"))
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[official_name(key)], value.flatten(1, 2) if key == "pos_embed" else value), key
    assert set(map(official_name, state)) == set(own)


def _saved(tmp_path, state, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_a_key_that_does_not_map_is_one_line_naming_it(tmp_path):
    state = _official_state(_ours().state_dict(), _data())
    state["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(4, 6)
    with pytest.raises(UserError, match=r"'layers\.0\.blocks\.0\.op\.x_proj_bias' is no parameter") as err:
        _ours(pretrained=_saved(tmp_path, state))
    assert "\n" not in str(err.value)


def test_conv_bias_and_d_state_mismatches_say_which_option(tmp_path):
    layout = official_layout(**TINY, conv_bias=True)
    biased = _randomise(_ours(ssm={"name": "ss2d", "conv_bias": True})).eval()
    path = _saved(tmp_path, {"ema": _official_state(biased.state_dict(), layout), "model": {}})
    loaded = _ours(pretrained=path, ssm={"name": "ss2d", "conv_bias": True}).eval()
    assert torch.equal(loaded(*_inputs()), biased(*_inputs()))
    with pytest.raises(UserError, match=r"'layers\.0\.blocks\.0\.op\.conv2d\.bias' has no counterpart.*"
                                        r"conv_bias: true"):
        _ours(pretrained=path)
    with pytest.raises(UserError, match=r"'layers\.0\.blocks\.0\.op\.x_proj_weight' has shape .*d_state"):
        _ours(pretrained=path, ssm={"name": "ss2d", "conv_bias": True}, d_state=16)


def test_an_official_checkpoint_needs_the_official_branches(tmp_path):
    path = _saved(tmp_path, _official_state(_ours().state_dict(), _data()))
    with pytest.raises(UserError, match="ss2d and window-attention"):
        _ours(pretrained=path, attn="attention")
    with pytest.raises(UserError, match=r"(?s)^(?!.*\n).*not in it, first 'encoder\.0\.blocks\.1\."):
        _ours(pretrained=path, depths=[2, 1, 1, 1])
