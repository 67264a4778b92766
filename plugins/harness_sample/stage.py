"""The stage itself: one block, two kinds of cell."""
from __future__ import annotations

from harness import Stage, UserError

from .spec import SampleSpec


def sample_cell(ctx, spec: SampleSpec) -> None:
    """Make the cell's images (or their features) and leave them at ``ctx.samples``."""
    if spec.text:
        from harness_t2i import sample_prompts

        sample_prompts(ctx, spec.t2i())
        ctx.extra["sample"]["keep"] = "png"
        return
    from .classes import sample_classes

    sample_classes(ctx, spec)


def sample_check(config, spec: SampleSpec) -> None:
    """``keep: none`` keeps only the features the cell's quality metrics read: without one of
    them it would sample for nothing, so the suite is refused now rather than after the sampling."""
    if spec.text or spec.keep != "none":
        return
    from harness_quality import STREAMED_METRICS

    if not {m.name for m in config.metric_specs()} & set(STREAMED_METRICS):
        err = UserError(f"keep: none writes no image and the cell has no metric that scores the features it keeps "
                        f"({', '.join(sorted(STREAMED_METRICS))}); add one or keep png/npz")
        err.option = "keep"
        raise err


def sample_costs(config, spec: SampleSpec, model_gflops, input_size: int) -> dict:
    """Images, denoiser passes, PFLOPs and disk of the block (``harness validate --costs``)."""
    from .costs import stage_costs

    return stage_costs(config, spec, model_gflops, input_size)


STAGES = {"sample": Stage(schema=SampleSpec, run=sample_cell, after=("train", "prune", "distill"), every_rank=True,
                          costs=sample_costs, check=sample_check,
                          description="make the cell's images once for every quality metric: class labels "
                                      "(DDPM/DDIM, keep png|npz|none) or prompts through a diffusers pipeline")}
