"""U-Net backbones from diffusers behind the harness contract ``forward(x, t, y)``.

- ``adm``: a class-conditional ADM-style U-Net (Dhariwal & Nichol's guided-diffusion layout:
  base width 256, channel multipliers by resolution, two ResNets per level, attention at
  maps 32/16/8 with 64-channel heads, scale-shift time conditioning, ResNet up/down
  sampling) as diffusers ``UNet2DModel`` with a class table (one extra null class for
  guidance). It fits pixel or latent input; ``adm-tiny`` (one ResNet per stage) and
  ``adm-small`` (three per stage: two thirds of it can be pruned) are ours, for CPU runs.
- ``sd15`` / ``sdxl``: Stable Diffusion U-Nets (``UNet2DConditionModel``) from the
  ``unet/config.json`` of stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0;
  no weights are needed to count parameters and FLOPs. ``sd-tiny`` and ``sdxl-tiny`` keep
  their block types at a width a CPU can train (ours).
- ``pretrained``: a hub id or a local folder. A pipeline (folder with ``unet/``) is read
  with ``subfolder="unet"``; a bare U-Net folder directly. Its config replaces the preset's.

The diffusers model stays reachable as ``.unet`` (pruning removes its blocks in place).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness import UserError, suggest

# -- presets ---------------------------------------------------------------------------------
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Ours: the same block types at CPU scale (tests, CPU suites, pruning experiments).
SD_TINY = dict(SD15, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4,
               norm_num_groups=8, sample_size=16)
SDXL_TINY = dict(SDXL, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 4, 4), cross_attention_dim=32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, sample_size=16)

TEXT_PRESETS = {"sd15": SD15, "sdxl": SDXL, "sd-tiny": SD_TINY, "sdxl-tiny": SDXL_TINY}
CLASS_PRESETS = ("adm", "adm-tiny", "adm-small")
PRESETS = (*CLASS_PRESETS, *TEXT_PRESETS)

# guided-diffusion's channel multipliers by input size (its script defaults).
_ADM_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
             32: (1, 2, 2, 2)}
_CONTEXT_TOKENS = 77  # CLIP's text length
_ADM_NATIVE = 32  # the ADM presets' input_size when none is given (a 256 px image's latent)


def adm_config(input_size: int, in_channels: int, out_channels: int, num_classes: int, preset: str = "adm") -> dict:
    """UNet2DModel kwargs for an ADM-style class-conditional U-Net at ``input_size``."""
    if preset == "adm-tiny":  # one ResNet per stage: the smallest that trains on a CPU
        base, mult, layers, attn_res, head, groups = 32, (1, 2), 1, (input_size // 2,), 16, 8
    elif preset == "adm-small":
        # Ours: several ResNets per stage (so down/up skip pairs exist), attention on the
        # coarser map, one width throughout (no ResNet changes channels, so every down-stage
        # ResNet can go): ~65% of its parameters are removable, against ~34% for adm-tiny.
        # Three per stage, not ADM's two: with two only ~55% is removable, so a 50% budget
        # leaves a single feasible set and every pruning criterion picks it.
        base, mult, layers, attn_res, head, groups = 48, (1, 1), 3, (input_size // 2,), 16, 8
    else:
        if input_size not in _ADM_MULT:
            raise UserError(f"unet preset 'adm' needs input_size in {sorted(_ADM_MULT)}, got {input_size}")
        base, mult, layers, attn_res, head, groups = 256, _ADM_MULT[input_size], 2, (32, 16, 8), 64, 32
    widths, down, up, res = [], [], [], input_size
    for m in mult:
        widths.append(int(base * m))
        down.append("AttnDownBlock2D" if res in attn_res else "DownBlock2D")
        res //= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return dict(
        sample_size=input_size, in_channels=in_channels, out_channels=out_channels,
        block_out_channels=tuple(widths), down_block_types=tuple(down), up_block_types=tuple(up),
        layers_per_block=layers, attention_head_dim=head, norm_num_groups=groups,
        resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet",
        # One extra class, the null label used for classifier-free guidance (as DiT).
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


# -- wrappers --------------------------------------------------------------------------------
class ClassUNet(nn.Module):
    """forward(x, t, y=labels or None) over a diffusers UNet2DModel; None is the null class."""

    def __init__(self, unet: nn.Module, num_classes: int, learn_sigma: bool):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma

    def forward(self, x, t, y=None):
        if self.num_classes and y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y if self.num_classes else None, return_dict=False)[0]

    @property
    def input_size(self) -> int:
        return self.unet.config.sample_size

    def example_inputs(self, batch_size: int, device=None, generator=None) -> dict:
        gen = generator or torch.Generator().manual_seed(0)
        cfg = self.unet.config
        n = cfg.sample_size
        x = torch.randn(batch_size, cfg.in_channels, n, n, generator=gen)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=gen) if self.num_classes else None
        return _to({"x": x, "t": t, "y": y}, device)


class TextUNet(nn.Module):
    """forward(x, t, y=context (B, S, D), text_embeds=None, time_ids=None) over UNet2DConditionModel.

    SDXL's micro-conditioning (pooled text embedding and the six size/crop numbers) comes
    as keyword arguments; ``example_inputs`` supplies them."""

    learn_sigma = False
    num_classes = 0  # conditioned on text, not on a class label

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def input_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def context_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def needs_text_time(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    def forward(self, x, t, y=None, text_embeds=None, time_ids=None):
        if isinstance(y, dict):  # captioned SDXL data: the conditioning comes as one label
            text_embeds, time_ids, y = y.get("text_embeds", text_embeds), y.get("time_ids", time_ids), y.get("y")
        if y is None:
            raise ValueError("a text-conditioned U-Net needs a context y of shape (B, S, cross_attention_dim)")
        added = None
        if self.needs_text_time:
            if text_embeds is None or time_ids is None:
                raise ValueError("SDXL-style U-Nets need text_embeds (B, D) and time_ids (B, 6)")
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=y, added_cond_kwargs=added, return_dict=False)[0]

    def example_inputs(self, batch_size: int, device=None, generator=None) -> dict:
        gen = generator or torch.Generator().manual_seed(0)
        cfg = self.unet.config
        n = cfg.sample_size
        out = {
            "x": torch.randn(batch_size, cfg.in_channels, n, n, generator=gen),
            "t": torch.randint(0, 1000, (batch_size,), generator=gen),
            "y": torch.randn(batch_size, _CONTEXT_TOKENS, cfg.cross_attention_dim, generator=gen),
        }
        if self.needs_text_time:
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["text_embeds"] = torch.randn(batch_size, pooled, generator=gen)
            size = 8 * n  # pixels: original size, crop top-left (0, 0), target size
            out["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch_size, 1)
        return _to(out, device)


def _to(inputs: dict, device) -> dict:
    if device is None:
        return inputs
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _load_pretrained(cls, source: str):
    """A pipeline's ``unet/`` subfolder, or a bare U-Net folder, from a local path or the hub.

    Built on the meta device only to be counted (:func:`harness.structure_only`: ``harness
    validate --costs``), only the folder's ``config.json`` is read: the structure is the
    checkpoint's own (BK-SDM's U-Nets have fewer blocks than the SD preset they come from) and
    no weights are loaded."""
    from harness import structure_only

    path = Path(source)
    on_meta = torch.get_default_device().type == "meta" and structure_only()

    def load(sub):
        if on_meta:
            return cls.from_config(cls.load_config(source, subfolder=sub))
        return cls.from_pretrained(source, subfolder=sub)

    try:
        if path.exists():
            sub = "unet" if (path / "unet" / "config.json").is_file() else None
            if sub is None and not (path / "config.json").is_file():
                raise UserError(f"pretrained {source!r}: no config.json here or in {source}/unet")
            return load(sub)
        try:
            return load("unet")
        except EnvironmentError:
            return load(None)
    except UserError:
        raise
    except EnvironmentError as exc:  # offline, unknown id, missing files
        raise UserError(f"pretrained {source!r} cannot be loaded: {str(exc).splitlines()[0]}") from None


# -- factory ---------------------------------------------------------------------------------
def unet(*, input_size: int | None = None, in_channels: int = 4, num_classes: int = 1000, context_dim: int = 0,
         preset: str = "adm", pretrained: str | None = None, learn_sigma: bool | None = None) -> nn.Module:
    """U-Nets via diffusers: class-conditional ADM (adm, adm-tiny, adm-small) and Stable Diffusion
    (sd15, sdxl). ``input_size`` None is the preset's native size: the SD config's
    ``sample_size`` (64 for SD-1.5, 128 for SDXL), 32 for the ADM presets; the model reports
    the size it was built for as ``.input_size``."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if preset not in PRESETS:
        raise UserError(f"unknown unet preset {preset!r}{suggest(preset, PRESETS)}")
    if input_size is None:
        input_size = TEXT_PRESETS[preset]["sample_size"] if preset in TEXT_PRESETS else _ADM_NATIVE
    if preset in CLASS_PRESETS:
        if context_dim:
            raise UserError(f"unet preset {preset!r} is class-conditional; context_dim must be 0")
        if pretrained:
            model = _load_pretrained(UNet2DModel, pretrained)
            classes = (model.config.num_class_embeds or 1) - 1
            return ClassUNet(model, classes, model.config.out_channels == 2 * model.config.in_channels)
        learn_sigma = True if learn_sigma is None else learn_sigma  # ADM learns the variance
        out = 2 * in_channels if learn_sigma else in_channels
        cfg = adm_config(input_size, in_channels, out, num_classes, preset)
        return ClassUNet(UNet2DModel(**cfg), num_classes, learn_sigma)

    if learn_sigma:
        raise UserError(f"unet preset {preset!r} predicts noise only; learn_sigma must be false")

    if pretrained:
        return TextUNet(_load_pretrained(UNet2DConditionModel, pretrained))
    cfg = dict(TEXT_PRESETS[preset])
    # The sample size is the latent it is measured at: input_size (native: 64 for SD-1.5 at
    # 512 px, 128 for SDXL at 1024 px).
    cfg["sample_size"] = input_size
    cfg["in_channels"] = cfg["out_channels"] = in_channels
    if context_dim:
        cfg["cross_attention_dim"] = context_dim
    return TextUNet(UNet2DConditionModel(**cfg))


__all__ = ["ClassUNet", "TextUNet", "PRESETS", "SD15", "SDXL", "adm_config", "unet"]
