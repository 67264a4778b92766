"""The ``sample:`` block: the images a cell makes once, for every quality metric it has.

One block serves both kinds of cell. Its common fields are the contract::

    sample: {num_samples, sampler, steps, cfg_scale, batch_size, seed, keep: png|npz|none}

- A class-conditional (or unconditional) cell samples its backbone itself: ``sampler`` is
  ``ddpm`` or ``ddim`` over the cell's noise schedule, latents are decoded by ``vae`` (or the
  data block's VAE), and ``keep`` says what is written: PNGs, one ADM ``.npz`` (``arr_0``), or
  nothing but the features the metrics need.
- A text-to-image cell names ``prompts`` and ``pipeline`` (the diffusers pipeline its U-Net is
  put in). Its own fields (``scheduler``, ``guidance_scale``, ``resolution``, ``teacher``,
  ``use_cell_model``) work as before; ``sampler`` and ``cfg_scale`` are their other names, and
  ``num_samples`` takes the first N prompts. Its images are PNGs (``keep: png``): the CLIP and
  PickScore metrics read them.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

CLASS_SAMPLERS = ("ddpm", "ddim")
# Fields that only mean something for one kind of cell: given for the other, they are refused.
T2I_FIELDS = ("prompts", "pipeline", "scheduler", "guidance_scale", "resolution", "teacher", "use_cell_model")
CLASS_FIELDS = ("vae", "guided_channels", "learn_sigma", "shard_size")


class SampleSpec(BaseModel):
    """``sample:`` the images every quality metric of the cell scores (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    # -- the contract (both kinds) -----------------------------------------------------------
    num_samples: Optional[int] = Field(None, ge=1)  # class-conditional: required; text: the first N prompts
    sampler: Optional[str] = None                   # ddpm (default) | ddim; text: a diffusers scheduler
    steps: Optional[int] = Field(None, ge=1)        # default 250 (DiT's DDPM), text 25
    cfg_scale: Optional[float] = Field(None, ge=0)  # default 1.0 (no guidance), text 7.5
    batch_size: Optional[int] = Field(None, gt=0)   # per rank; default 32, text 8
    seed: Optional[int] = Field(None, ge=0)         # None: the suite's seed
    keep: Literal["png", "npz", "none"] = "png"

    # -- class-conditional -------------------------------------------------------------------
    vae: Optional[str] = None        # diffusers AutoencoderKL (hub id or folder); None: the data block's, if any
    guided_channels: Optional[int] = Field(3, ge=1)  # DiT guides the first 3 latent channels; null: all
    learn_sigma: Optional[bool] = None  # DDPM's variance from the model; None: train.learn_sigma, else the model's own
    shard_size: int = Field(1024, ge=1)  # images per shard (rounded up to whole batches): the unit a run resumes at

    # -- text-to-image (harness_t2i) ---------------------------------------------------------
    prompts: Optional[Any] = None    # validated as harness_t2i.prompts.PromptSet
    pipeline: Optional[str] = None
    scheduler: Optional[str] = None
    guidance_scale: Optional[float] = Field(None, ge=0)
    resolution: Optional[int] = Field(None, gt=0)
    teacher: Optional[bool] = None
    use_cell_model: Optional[bool] = None

    @property
    def text(self) -> bool:
        """Whether this is a text-to-image block (it names prompts)."""
        return self.prompts is not None

    @model_validator(mode="after")
    def _one_kind(self):
        given = self.model_fields_set
        if self.text:
            wrong = [f for f in CLASS_FIELDS if f in given]
            if wrong:
                raise ValueError(f"{wrong[0]} applies to class-conditional sampling; this block names prompts "
                                 f"(text-to-image)")
            if self.pipeline is None:
                raise ValueError("pipeline: a text-to-image block (prompts) needs the diffusers pipeline to sample "
                                 "through (hub id or folder)")
            if self.keep != "png":
                raise ValueError(f"keep: {self.keep!r}: text-to-image images are kept as PNGs (the CLIP and "
                                 f"PickScore metrics read them); leave keep out or give png")
            for mine, theirs in (("sampler", "scheduler"), ("cfg_scale", "guidance_scale")):
                if mine in given and theirs in given:
                    raise ValueError(f"{mine} and {theirs} name the same setting here; give one of them")
            self.t2i()  # the prompt set and scheduler are checked now, before any work
        else:
            wrong = [f for f in T2I_FIELDS if f in given]
            if wrong:
                raise ValueError(f"{wrong[0]} applies to text-to-image sampling, which needs prompts: "
                                 f"(a class-conditional block has num_samples, sampler, steps, cfg_scale, ...)")
            if self.num_samples is None:
                raise ValueError("num_samples: a class-conditional sample block needs the number of images "
                                 "(50000 for the ADM/DiT protocol)")
            if self.sampler is None:
                self.sampler = "ddpm"
            if self.sampler not in CLASS_SAMPLERS:
                from harness import suggest

                raise ValueError(f"sampler {self.sampler!r} is not one of {', '.join(CLASS_SAMPLERS)}"
                                 f"{suggest(self.sampler, CLASS_SAMPLERS)}")
            self.steps = 250 if self.steps is None else self.steps
            self.cfg_scale = 1.0 if self.cfg_scale is None else self.cfg_scale
            self.batch_size = 32 if self.batch_size is None else self.batch_size
        return self

    def t2i(self):
        """The text-to-image block as harness_t2i's sample stage takes it."""
        from harness_t2i import TextSampleSpec as TextSpec

        given = {k: getattr(self, k) for k in self.model_fields_set if k in T2I_FIELDS}
        if self.sampler is not None and "scheduler" not in given:
            given["scheduler"] = self.sampler
        if self.cfg_scale is not None and "guidance_scale" not in given:
            given["guidance_scale"] = self.cfg_scale
        for k in ("steps", "batch_size", "seed", "num_samples"):
            if getattr(self, k) is not None:
                given[k] = getattr(self, k)
        return TextSpec.model_validate(given)
