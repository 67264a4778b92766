"""What a component must declare, checked when it is loaded: one line naming the plugin, the
component and what is missing, before any cell runs (not a failed cell after its training).

The contracts themselves are documented in :mod:`harness.hookspecs` and :mod:`harness.kinds`.
A factory that is a class is checked as soon as the registry hands it out (a suite's
validation, ``harness.create``); what only the built object can show (a factory function's
product, a data set's shape attributes set in ``__init__``) is checked when it is built.
The registry calls :func:`check_factory` and :func:`check_built`, nothing else does.
"""
from __future__ import annotations

import inspect
from typing import Any

from .errors import PluginError

DIRECTIONS = ("lower", "higher", None)
ROLES = ("cost", "quality")
_MISSING = object()


def _where(plugin: str, kind: str, name: str) -> str:
    return f"plugin {plugin!r}: {kind} {name!r}"


def _callable(obj: Any, attr: str) -> bool:
    return callable(getattr(obj, attr, None))


def problems(kind: str, obj: Any, built: bool) -> list[str]:
    """What ``obj`` (a factory class when not ``built``, else what a factory returned) lacks
    of the contract of ``kind``; empty when it complies."""
    out: list[str] = []
    if kind == "metric":
        direction = getattr(obj, "direction", _MISSING)
        if direction is _MISSING:
            out.append("declares no direction (set direction = 'lower', 'higher' or None)")
        elif direction not in DIRECTIONS:
            out.append(f"declares direction {direction!r}; expected 'lower', 'higher' or None")
        role = getattr(obj, "role", None)
        if role is not None and role not in ROLES:
            out.append(f"declares role {role!r}; expected 'cost' or 'quality'")
        if not isinstance(getattr(obj, "path_options", {}), dict):
            out.append("path_options must be a dict {option: what the file is}")
        if built and not callable(obj):
            out.append("is not callable (a metric is called with the cell's context)")
    elif kind == "loss":
        for flag in ("needs_features", "needs_teacher"):
            if not isinstance(getattr(obj, flag, False), bool):
                out.append(f"{flag} must be True or False, not {getattr(obj, flag)!r}")
        if _callable(obj, "terms") and not getattr(obj, "needs_features", False):
            out.append("defines terms() over features but does not set needs_features = True "
                       "(without it no features are collected)")
        if built and not callable(obj):
            out.append("is not callable (loss(student_out, teacher_out, noise, student_feats, teacher_feats))")
    elif kind == "criterion":
        if not _callable(obj, "score"):
            out.append("has no score(model, units, ctx) method")
    elif kind == "executor":
        if not _callable(obj, "run"):
            out.append("has no run(jobs, on_done, on_start=None) method")
    elif kind == "dataset":
        for method in ("__len__", "__getitem__"):
            if not _callable(obj, method):
                out.append(f"has no {method}")
        if built:
            missing = [a for a in ("num_classes", "channels", "resolution") if not hasattr(obj, a)]
            if missing:
                out.append(f"has no {', '.join(missing)} (every data set reports them)")
            if getattr(obj, "null_context", None) is not None and not _callable(obj, "encode_labels"):
                out.append("serves captions (null_context) but has no encode_labels(captions)")
    elif kind in ("backbone", "mixer") and built:
        if not callable(obj):
            out.append("is not a module (the factory must return a torch.nn.Module)")
    return out


def check_factory(kind: str, name: str, plugin: str, factory: Any) -> None:
    """Refuse a factory that is not callable, or a class that lacks what its kind declares."""
    if not callable(factory):
        raise PluginError(f"{_where(plugin, kind, name)}: the factory is a {type(factory).__name__}, not callable")
    if inspect.isclass(factory):
        found = problems(kind, factory, built=False)
        if found:
            raise PluginError(f"{_where(plugin, kind, name)} ({factory.__qualname__}) {'; '.join(found)}")


def check_built(kind: str, name: str, plugin: str, obj: Any) -> None:
    """Refuse what a factory built when it lacks what its kind declares."""
    found = problems(kind, obj, built=True)
    if found:
        raise PluginError(f"{_where(plugin, kind, name)}: the object its factory built ({type(obj).__name__}) "
                          f"{'; '.join(found)}")


def check_stage(name: str, plugin: str, stage: Any) -> None:
    """A stage's schema is a pydantic model, its ``run``/``apply``/``active`` callables, and
    ``after``/``replaces`` name stages (strings)."""
    from pydantic import BaseModel

    where = f"plugin {plugin!r}: stage {name!r}"
    if not (inspect.isclass(stage.schema) and issubclass(stage.schema, BaseModel)):
        raise PluginError(f"{where}: schema must be a pydantic BaseModel subclass, not {stage.schema!r}")
    for attr in ("run",):
        if not callable(getattr(stage, attr)):
            raise PluginError(f"{where}: {attr} is not callable")
    for attr in ("active", "apply"):
        value = getattr(stage, attr)
        if value is not None and not callable(value):
            raise PluginError(f"{where}: {attr} must be callable or None")
    for attr in ("after", "replaces"):
        value = getattr(stage, attr)
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise PluginError(f"{where}: {attr} must be a tuple of stage names, not {value!r}")


def check_command(name: str, plugin: str, command: Any) -> None:
    """A command has a one-line ``help`` and callable ``arguments`` and ``run``."""
    where = f"plugin {plugin!r}: command {name!r}"
    if not isinstance(command.help, str) or not command.help.strip():
        raise PluginError(f"{where}: help must be a one-line description")
    for attr in ("arguments", "run"):
        if not callable(getattr(command, attr)):
            raise PluginError(f"{where}: {attr} is not callable")
