"""ToMe: Token Merging for Stable Diffusion, through the ``tomesd`` package.

Token merging (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", CVPR Workshops
2023; code: github.com/dbolya/tomesd, on PyPI as ``tomesd``) shortens the token sequence a
U-Net's transformer block works on. Before the block's self-attention, the tokens of its
feature map are split into destinations (one per ``sx x sy`` region, drawn at random when
``use_rand``) and sources; the ``ratio`` share of all tokens that are most similar (cosine) to
a destination are averaged into it (bipartite soft matching). After the attention, every merged
token takes its destination's output again ("unmerging"), so the block's output keeps its
length. Only blocks on feature maps downsampled at most ``max_downsample`` times merge;
``merge_crossattn`` and ``merge_mlp`` merge before the cross-attention and the feed-forward
too.

The merging is tomesd's own: :func:`patch` calls ``tomesd.apply_patch`` on the diffusers
U-Net, which swaps the class of every ``BasicTransformerBlock`` for tomesd's subclass (its
``forward`` calls ``tomesd.merge.bipartite_soft_matching_random2d``) and hooks the U-Net's
forward to read the latent's height and width. tomesd 0.1.3 (2023) was written against the
diffusers of its day; its replacement ``forward`` is a copy of that version's, which diffusers
0.42's still computes the same way for the blocks the Stable Diffusion U-Nets have (``norm_type``
``layer_norm``, no positional embedding, no GLIGEN fuser): at ratio 0 the patched U-Net's
outputs equal the plain one's exactly (tests/test_tome.py). Blocks tomesd's copy would
compute differently (PixArt's ``ada_norm_single``, ``ada_norm_continuous``, positional
embeddings, GLIGEN) are refused rather than patched. Diffusers' feed-forward chunking
(``enable_forward_chunking``) is a memory saving that tomesd's forward does not do; the
figures are the same without it.

Random destinations. tomesd draws them from ``_tome_info["args"]["generator"]``, which it
otherwise forks from the global RNG on first use; the stage sets it to a generator seeded from
the cell (``ctx.seed("tome")``), on the model's device, so a rerun of the cell draws the same
destinations in the same order. tomesd turns ``use_rand`` off for a batch of odd size (its
guidance batches pair conditional and unconditional halves).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness import CONVENTIONS, DEFAULT_CONVENTION, CellContext, Stage, UserError, count_flops, is_small

# The ``norm_type`` values of diffusers' BasicTransformerBlock that tomesd's forward computes as
# diffusers 0.42 does (it branches on ``use_ada_layer_norm`` / ``use_ada_layer_norm_zero`` only).
NORM_TYPES = ("layer_norm", "ada_norm", "ada_norm_zero")


class ToMeSpec(BaseModel):
    """``tome: {ratio, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp}``
    (tomesd's ``apply_patch`` arguments and defaults); a bare number is the ratio."""

    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.5, ge=0, lt=1, description="share of a block's tokens merged away")
    max_downsample: Literal[1, 2, 4, 8] = Field(1, description="merge in blocks downsampled at most this much")
    sx: int = Field(2, ge=1, description="destination stride along the width")
    sy: int = Field(2, ge=1, description="destination stride along the height")
    use_rand: bool = Field(True, description="draw each region's destination at random (from the cell's seed)")
    merge_attn: bool = Field(True, description="merge before self-attention")
    merge_crossattn: bool = Field(False, description="merge before cross-attention")
    merge_mlp: bool = Field(False, description="merge before the feed-forward")

    @model_validator(mode="before")
    @classmethod
    def _bare_ratio(cls, value: Any) -> Any:
        return {"ratio": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _mergeable(self) -> "ToMeSpec":
        # One destination per sx*sy region: at most 1 - 1/(sx*sy) of the tokens are sources, and
        # tomesd quietly merges no more than that; a ratio above it would be recorded yet not done.
        most = 1 - 1 / (self.sx * self.sy)
        if self.ratio > most:
            raise ValueError(f"ratio {self.ratio} cannot be merged with sx={self.sx}, sy={self.sy}: one token in "
                             f"every {self.sx}x{self.sy} region is a destination, so at most {most:.4g}")
        return self

    def settings(self) -> dict:
        return self.model_dump()


# -- finding what tomesd patches ---------------------------------------------------------------
def transformer_unet(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The diffusers model inside ``model`` (itself, or the ``.unet`` of the harness's wrapper)
    whose BasicTransformerBlocks tomesd patches; None when there is none."""
    from diffusers import ModelMixin
    from diffusers.models.attention import BasicTransformerBlock

    for module in model.modules():
        if isinstance(module, ModelMixin) and any(isinstance(m, BasicTransformerBlock) for m in module.modules()):
            return module
    return None


def transformer_blocks(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def _incompatible(block: torch.nn.Module) -> Optional[str]:
    """Why tomesd's replacement forward would not compute this block as diffusers does, or None."""
    if getattr(block, "norm_type", "layer_norm") not in NORM_TYPES:
        return f"norm_type {block.norm_type!r} (tomesd's forward knows {', '.join(NORM_TYPES)})"
    if getattr(block, "pos_embed", None) is not None:
        return "a positional embedding, which tomesd's forward leaves out"
    if hasattr(block, "fuser"):
        return "a GLIGEN fuser, which tomesd's forward leaves out"
    return None


def _no_blocks(model: torch.nn.Module, what: str) -> str:
    from diffusers import ModelMixin

    diffusers_models = [type(m).__name__ for m in model.modules() if isinstance(m, ModelMixin)]
    if diffusers_models:
        why = f"its diffusers {diffusers_models[0]} attends through plain Attention layers, which tomesd does not patch"
    else:
        why = "it is not a diffusers model (tomesd patches the transformer blocks of diffusers U-Nets)"
    return f"ToMe merges tokens inside diffusers' BasicTransformerBlocks and {what} has none: {why}"


def find_unet(model: torch.nn.Module, what: str = "the model") -> torch.nn.Module:
    """The U-Net tomesd is to patch; UserError naming why when ``model`` has none it can patch."""
    unet = transformer_unet(model)
    if unet is None:
        raise UserError(_no_blocks(model, what))
    for name, block in transformer_blocks(unet):
        reason = _incompatible(block)
        if reason:
            raise UserError(f"ToMe cannot patch {what}: its transformer block {name!r} has {reason}")
    return unet


# -- applying it -------------------------------------------------------------------------------
def patch(model: torch.nn.Module, spec: ToMeSpec, seed: int, what: str = "the model") -> torch.nn.Module:
    """Apply tomesd to ``model``'s U-Net in place, its random destinations drawn from ``seed``;
    return the patched U-Net. Applying again replaces the earlier patch (tomesd removes it first)."""
    import tomesd

    unet = find_unet(model, what)
    tomesd.apply_patch(unet, **spec.settings())
    param = next(unet.parameters(), None)
    # tomesd draws on the activations' device; a meta model (counting) draws on the CPU
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    unet._tome_info["args"]["generator"] = torch.Generator(device=device).manual_seed(seed)
    return unet


def remove(model: torch.nn.Module) -> None:
    """Undo :func:`patch`: the blocks get their diffusers class back and the size hook goes."""
    import tomesd

    unet = transformer_unet(model)
    if unet is not None:
        tomesd.remove_patch(unet)


def is_patched(model: torch.nn.Module) -> bool:
    unet = transformer_unet(model)
    return unet is not None and any(type(b).__name__ == "ToMeBlock" for _, b in transformer_blocks(unet))


# -- measuring what it changed ------------------------------------------------------------------
def count(model: torch.nn.Module, inputs: dict, handles: dict | None = None) -> tuple[Any, dict]:
    """The FLOP count of one forward (harness.count_flops, fvcore's convention) and, for every
    transformer block, the tokens it receives and those each of its parts (self-attention,
    cross-attention, feed-forward) receives."""
    unet = transformer_unet(model)
    tokens: dict[str, dict[str, int]] = {}

    def note(name: str, part: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            tokens.setdefault(name, {})[part] = x.shape[1]
        return hook

    hooks = []
    for name, block in transformer_blocks(unet) if unet is not None else []:
        parts = {"in": block, "self_attention": block.attn1, "cross_attention": block.attn2, "feed_forward": block.ff}
        hooks += [m.register_forward_pre_hook(note(name, part), with_kwargs=True)
                  for part, m in parts.items() if m is not None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # a big model is counted on a meta copy (the hooks travel with it); a small one as it is
            fc = count_flops(model, inputs, handles, abstract=not is_small(model))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return fc, tokens


def _flops_record(fc) -> dict:
    kept = fc.record()
    return {"gflops": fc.total / 1e9, "convention": CONVENTIONS[DEFAULT_CONVENTION],
            **{k: kept[k] for k in ("uncounted_ops", "flops_method", "flops_fallback_reason") if k in kept}}


def tome_cell(ctx, spec: ToMeSpec) -> None:
    model = ctx.model
    what = f"backbone {ctx.config.backbone.name!r}"
    find_unet(model, what)  # before any counting: a model it cannot patch fails here, in one line
    inputs = ctx.example_inputs(1, model=model, generator=ctx.generator("tome-flops"))
    handles = ctx.registry.flop_handles()
    plain, _ = count(model, inputs, handles)
    seed = ctx.seed("tome")
    patch(model, spec, seed, what)
    merged, tokens = count(model, inputs, handles)
    merging = sorted(name for name, seen in tokens.items() if min(seen.values()) < seen["in"])
    ctx.extra["tome"] = {
        **spec.settings(), "seed": seed, "package": f"tomesd {_version()}",
        "blocks": len(tokens), "blocks_merging": len(merging),
        # per block at the cell's input size: the tokens it receives ("in") and those each part sees
        "tokens": dict(sorted(tokens.items())),
        **_flops_record(merged), "gflops_unmerged": plain.total / 1e9, "batch_size": 1,
        "apply": {**spec.settings(), "seed": seed},  # what the other ranks of a run apply (Stage.apply)
    }
    ctx.change_sampling("tome", describe(spec, len(merging), len(tokens), merged.total / 1e9, plain.total / 1e9))


def describe(spec: ToMeSpec, merging: int, blocks: int, gflops: float, unmerged: float) -> str:
    where = [w for w, on in (("self-attention", spec.merge_attn), ("cross-attention", spec.merge_crossattn),
                             ("feed-forward", spec.merge_mlp)) if on]
    if not merging:  # SDXL at max_downsample 1: its full-resolution level has no transformer block
        return (f"ToMe (tomesd) patched {blocks} transformer blocks, but none merges at this input size with "
                f"max_downsample {spec.max_downsample}: the steps compute as the plain model's")
    return (f"ToMe (tomesd): {spec.ratio:.0%} of the tokens merged before {', '.join(where) or 'nothing'} in "
            f"{merging} of {blocks} transformer blocks; {gflops:.4g} GFLOPs per forward instead of {unmerged:.4g}")


def _version() -> str:
    from importlib.metadata import version

    return version("tomesd")


def apply(model: torch.nn.Module, value: Any) -> dict:
    """``harness flops --tome 0.5`` (a ratio, or a YAML mapping of the block's options such as
    ``"{ratio: 0.5, max_downsample: 2}"``), and the other ranks of a run (the recorded settings
    with their seed): tomesd applied to ``model`` in place."""
    import yaml

    options = yaml.safe_load(value) if isinstance(value, str) else value
    options = dict(options) if isinstance(options, dict) else options
    seed = options.pop("seed", 0) if isinstance(options, dict) else 0
    try:
        spec = ToMeSpec.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"--tome {value!r}: {key + ': ' if key else ''}{err['msg']}") from None
    patch(model, spec, int(seed))
    return {**spec.settings(), "summary": f"tome: tomesd {_version()} applied, ratio {spec.ratio}"}


def check(config, spec: ToMeSpec) -> None:
    """At validation: refuse a backbone with no transformer block tomesd can patch (DiT,
    LaMamba-Diff, the class-conditional ADM U-Nets), found on a meta build of the backbone.
    A ``pretrained`` backbone is loaded only when the cell runs, and checked then."""
    if "pretrained" in config.backbone.options:
        return
    # The data block only sets input shapes, which decide no block type; left out, validating
    # builds no data set (a latent one encodes its images first).
    ctx = CellContext("validate", "tome-check", 0, config.model_copy(update={"data": None}))
    try:
        with torch.random.fork_rng(devices=[]):
            model = ctx.build_backbone(device="meta")
    except Exception:  # a factory that needs real tensors: the run checks the model it builds
        return
    preset = config.backbone.options.get("preset")
    find_unet(model, f"backbone {config.backbone.name!r}" + (f" (preset {preset!r})" if preset else ""))


STAGE = Stage(schema=ToMeSpec, run=tome_cell, after=("train", "prune", "distill"), apply=apply, check=check,
              description="ToMe: merge similar tokens in a diffusers U-Net's transformer blocks (tomesd; ratio)")
