"""diffusion-harness: one measurement protocol for efficient diffusion models.

Python API, in the manner of timm::

    import harness
    harness.components("mixer")            # ['attention', ...]
    model = harness.create("backbone", "dit", size="S", patch=2)

Everything a plugin may use is importable from here and listed in ``__all__``: the base
class or protocol of each component kind, the cell's context, the helpers the built-in
plugins share, and the errors. Nothing else of ``harness.*`` is promised to plugins (the
built-in plugins, ``scripts/`` and ``examples/`` import nothing else; a test checks it).
Names are resolved on first use, so ``import harness`` does not import torch.
"""
from __future__ import annotations

import importlib
from fnmatch import fnmatch

from .errors import MetricUnavailable, PluginError, UserError, suggest

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    # plugins and the registry
    "hookimpl": ("plugins", "hookimpl"), "KINDS": ("plugins", "KINDS"), "registry": ("plugins", "registry"),
    "Lazy": ("plugins", "Lazy"),
    # component kinds (harness.hookspecs says how each is registered)
    "Backbone": ("kinds", "Backbone"), "Mixer": ("kinds", "Mixer"), "Metric": ("kinds", "Metric"),
    "Dataset": ("kinds", "Dataset"), "Criterion": ("kinds", "Criterion"), "Loss": ("kinds", "Loss"),
    "Executor": ("kinds", "Executor"), "Stage": ("stages", "Stage"), "Command": ("commands", "Command"),
    # a cell
    "CellContext": ("context", "CellContext"), "CellConfig": ("suite", "CellConfig"),
    "ComponentSpec": ("suite", "ComponentSpec"), "DTYPES": ("context", "DTYPES"),
    "DEFAULT_INPUTS": ("context", "DEFAULT_INPUTS"), "derive_seed": ("context", "derive_seed"),
    "example_inputs": ("context", "example_inputs"), "run_stages": ("stages", "run_stages"),
    "load_suite": ("suite", "load_suite"),
    # backbones and mixers
    "build_mixer": ("mixers", "build_mixer"), "kernels": ("kernels", None),
    "load_state_dict": ("weights", "load_state_dict"), "load_state_into": ("weights", "load_state_into"),
    "load_into": ("weights", "load_into"), "structure_only": ("weights", "structure_only"),
    # training and sampling
    "TrainSpec": ("training", "TrainSpec"), "train_model": ("training", "train_model"),
    "training_checkpoint": ("training", "training_checkpoint"), "make_scheduler": ("training", "make_scheduler"),
    "model_learns_sigma": ("training", "model_learns_sigma"), "stack_labels": ("training", "stack_labels"),
    "map_labels": ("training", "map_labels"), "text_conditioning": ("training", "text_conditioning"),
    "SAMPLERS": ("sampling", "SAMPLERS"), "sample_batch": ("sampling", "sample_batch"),
    "sample_to_folder": ("sampling", "sample_to_folder"), "to_uint8": ("sampling", "to_uint8"),
    "save_png": ("sampling", "save_png"), "image_intact": ("sampling", "image_intact"),
    "rank_world": ("sampling", "rank_world"),
    # pruning: units and calibration
    "Unit": ("units", "Unit"), "Skip": ("units", "Skip"), "discover_units": ("units", "discover_units"),
    "remove_units": ("units", "remove_units"), "apply_plan": ("units", "apply_plan"),
    "merge_plans": ("units", "merge_plans"), "conflicts": ("units", "conflicts"),
    "tag_origins": ("units", "tag_origins"), "origin_names": ("units", "origin_names"),
    "Calibration": ("calibration", "Calibration"), "calibration_inputs": ("calibration", "calibration_inputs"),
    "noise_channels": ("calibration", "noise_channels"), "predict_noise": ("calibration", "predict_noise"),
    "reference_outputs": ("calibration", "reference_outputs"), "output_loss": ("calibration", "output_loss"),
    "evaluating": ("calibration", "evaluating"), "alphas_cumprod": ("calibration", "alphas_cumprod"),
    # FLOPs
    "count_flops": ("flops", "count_flops"), "check_convention": ("flops", "check_convention"),
    "CONVENTIONS": ("flops", "CONVENTIONS"), "DEFAULT_CONVENTION": ("flops", "DEFAULT_CONVENTION"),
    "AbstractCountError": ("flops", "AbstractCountError"), "is_small": ("flops", "is_small"),
    "sdpa_flop": ("flops", "sdpa_flop"), "baddbmm_flop": ("flops", "baddbmm_flop"),
    # commands, executors, records
    "backbone_context": ("commands", "backbone_context"), "parse_options": ("commands", "parse_options"),
    "CellJob": ("runner", "CellJob"), "execute_cell": ("runner", "execute_cell"), "plan_jobs": ("runner", "plan"),
    "execute_cell_on_ranks": ("runner", "execute_cell_on_ranks"),
    "environment": ("records", "environment"), "read_record": ("records", "read_record"),
    "write_record": ("records", "write_record"),
    # files a user gives and caches: regular files only, atomic writes, digests (docs/security.md)
    "open_regular": ("files", "open_regular"), "read_regular": ("files", "read_regular"),
    "check_regular": ("files", "check_regular"), "atomic_write": ("files", "atomic_write"),
    "load_cache": ("weights", "load_cache"), "save_cache": ("weights", "save_cache"),
    "network_timeout": ("weights", "network_timeout"),
}

__all__ = ["create", "components", "UserError", "PluginError", "MetricUnavailable", "suggest", *_LAZY]


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'harness' has no attribute {name!r}") from None
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def create(kind: str, name: str, **options):
    """Build the component ``name`` of ``kind`` (backbone, mixer, metric, dataset,
    criterion, loss, executor) with ``options``; unknown names and options are UserErrors."""
    from .plugins import registry

    return registry().create(kind, name, **options)


def components(kind: str, pattern: str = "*") -> list[str]:
    """Sorted names of the components of ``kind``, filtered by a shell-style wildcard."""
    from .plugins import registry

    return [n for n in registry().components(kind) if fnmatch(n, pattern)]
