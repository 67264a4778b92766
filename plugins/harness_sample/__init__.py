"""The ``sample`` stage: a cell's images, made once, for every quality metric of the cell.

Class-conditional cells sample their backbone (DDPM/DDIM, classifier-free guidance, a VAE
decoder) in fixed shards spread over the ranks of a torch.distributed group; the Inception
(and DINOv2) features the metrics need are extracted as each batch is decoded, so
``keep: none`` writes no image at all, and ``keep: png``/``npz`` give the same figures.
Text-to-image cells go through :mod:`harness_t2i.sample` (a diffusers pipeline with the
cell's U-Net). See docs/protocols/class-conditional.md.
"""
from __future__ import annotations

import importlib

import harness

__all__ = ["SampleSpec"]


@harness.hookimpl
def harness_stages():
    return {"sample": harness.Lazy("harness_sample.stage:STAGES.sample",
                                   "make the cell's images once for every quality metric: class labels "
                                   "(DDPM/DDIM, keep png|npz|none) or prompts through a diffusers pipeline")}


def __getattr__(name):  # PEP 562: SampleSpec loads its module on first use
    if name == "SampleSpec":
        return importlib.import_module(".spec", __name__).SampleSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
