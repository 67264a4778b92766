"""The ``sample`` stage: a cell's images, made once, for every quality metric of the cell.

Class-conditional cells sample their backbone (DDPM/DDIM, classifier-free guidance, a VAE
decoder) in fixed shards spread over the ranks of a torch.distributed group; the Inception
(and DINOv2) features the metrics need are extracted as each batch is decoded, so
``keep: none`` writes no image at all, and ``keep: png``/``npz`` give the same figures.
Text-to-image cells go through :mod:`harness_t2i.sample` (a diffusers pipeline with the
cell's U-Net). See docs/protocols/class-conditional.md.
"""
from __future__ import annotations

import harness

from .spec import SampleSpec
from .stage import STAGES

__all__ = ["SampleSpec"]


@harness.hookimpl
def harness_stages():
    return dict(STAGES)
