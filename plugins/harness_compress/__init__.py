"""Layer pruning (LAPTOP-Diff and baselines) and distillation: the ``prune`` and ``distill``
stages, their criteria and losses, the ``output_loss`` metric and the ``harness prune`` command."""
from __future__ import annotations

import harness

# Declared by reference (harness.hookspecs): listing them imports neither torch nor these modules.


@harness.hookimpl
def harness_stages():
    return {
        "prune": harness.Lazy("harness_compress.stages:STAGES.prune",
                              "layer pruning: a criterion and a budget, or a BK-SDM preset"),
        "distill": harness.Lazy("harness_compress.stages:STAGES.distill",
                                "retrain the student against the teacher with weighted losses"),
    }


@harness.hookimpl
def harness_commands():
    return {"prune": harness.Lazy("harness_compress.commands:COMMANDS.prune",
                                  "the prunable units of one backbone configuration")}


@harness.hookimpl
def harness_pruning_criteria():
    return {name: f"harness_compress.criteria:{cls}" for name, cls in (
        ("laptop", "Laptop"), ("random", "Random"), ("magnitude", "Magnitude"), ("taylor", "Taylor"),
        ("similarity", "Similarity"), ("bk-sdm", "BKSDM"),
        ("block-influence", "BlockInfluence"))}


@harness.hookimpl(specname="harness_pruning_criteria")
def learnable_criteria():  # learns the kept set rather than scoring units one by one: a module of its own
    return {"tinyfusion": "harness_compress.tinyfusion:TinyFusion"}


@harness.hookimpl
def harness_distill_losses():
    return {name: f"harness_compress.distill:{cls}" for name, cls in (
        ("task", "TaskLoss"), ("output-kd", "OutputKD"), ("feature-kd", "FeatureKD"),
        ("normalized-feature-kd", "NormalizedFeatureKD"), ("masked-kd", "MaskedKD"))}


@harness.hookimpl
def harness_metrics():
    return {"output_loss": "harness_compress.metrics:OutputLoss"}
