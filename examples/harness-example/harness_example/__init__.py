"""The plugin module: each hook returns {component name: factory}.

The harness reads the factories' signatures: their keyword options are what a suite may
set (``backbone: {name: uvit, depth: 5}``), and a misspelt one is rejected before any work.
"""
import harness

from .compress import CosineKD, UpdateNorm
from .models import dwconv, uvit


@harness.hookimpl
def harness_backbones():
    return {"uvit": uvit}


@harness.hookimpl
def harness_mixers():
    return {"dwconv": dwconv}


@harness.hookimpl
def harness_pruning_criteria():
    return {"update-norm": UpdateNorm}


@harness.hookimpl
def harness_distill_losses():
    return {"cosine-kd": CosineKD}
