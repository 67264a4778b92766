"""diffusion-harness: one measurement protocol for efficient diffusion models.

Python API, in the manner of timm::

    import harness
    harness.components("mixer")            # ['attention', ...]
    model = harness.create("backbone", "dit", size="S", patch=2)
"""
from __future__ import annotations

from fnmatch import fnmatch

from .errors import MetricUnavailable, PluginError, UserError
from .plugins import KINDS, Lazy, hookimpl, registry

__version__ = "0.1.0"

__all__ = ["create", "components", "hookimpl", "KINDS", "Lazy", "MetricUnavailable", "PluginError", "UserError"]


def create(kind: str, name: str, **options):
    """Build the component ``name`` of ``kind`` (backbone, mixer, metric, dataset,
    criterion, loss, executor) with ``options``; unknown names and options are UserErrors."""
    return registry().create(kind, name, **options)


def components(kind: str, pattern: str = "*") -> list[str]:
    """Sorted names of the components of ``kind``, filtered by a shell-style wildcard."""
    return [n for n in registry().components(kind) if fnmatch(n, pattern)]
