"""How backbones build token mixers from a suite's ``mixer`` option."""
from __future__ import annotations

from typing import Any

from .plugins import registry


def build_mixer(spec: Any, dim: int, **hints):
    """Build a mixer from a name or ``{name: ..., **options}``.

    ``hints`` are what the backbone knows (``num_heads``, ``block_index``...): each is passed
    only to mixers whose factory takes it, and the suite's own options win over them.
    """
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and "name" in spec:
        options = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise ValueError(f"mixer must be a name or a mapping with 'name', got {spec!r}")
    comp = registry().get("mixer", name)
    sig = comp.signature()
    takes_all = sig is not None and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    accepted = set(sig.parameters) if sig is not None else set()
    for key, value in hints.items():
        if key not in options and (takes_all or key in accepted):
            options[key] = value
    return comp(dim=dim, **options)
