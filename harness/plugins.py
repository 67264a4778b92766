"""Plugin manager and component registry.

Plugins come from the entry-point group ``harness`` (built-ins included) and from
:func:`register` (tests, notebooks). ``HARNESS_DISABLE_PLUGINS=a,b`` blocks entry points by
name. Every hook returns ``{name: factory}``; :class:`Registry` merges them per kind.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from . import contracts, hookspecs
from .errors import PluginError, UserError, suggest

hookimpl = pluggy.HookimplMarker("harness")

# kind -> hook name; the order is the order of `harness ls`.
KINDS = {
    "backbone": "harness_backbones",
    "mixer": "harness_mixers",
    "metric": "harness_metrics",
    "dataset": "harness_datasets",
    "criterion": "harness_pruning_criteria",
    "loss": "harness_distill_losses",
    "executor": "harness_executors",
}


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str

    @property
    def description(self) -> str:
        """The docstring's first paragraph on one line (its first sentence when long): a first
        line alone can stop mid-sentence."""
        doc = inspect.getdoc(self.factory) or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        if len(paragraph) > 160:
            paragraph = re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]
        return paragraph

    def signature(self) -> inspect.Signature | None:
        return _signature(self.factory)

    def defaults(self) -> dict[str, Any]:
        sig = self.signature()
        if sig is None:
            return {}
        return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}

    def check_options(self, options: dict[str, Any]) -> None:
        """Reject options the factory does not take, naming the closest ones it does, then let
        the factory check their values if it can (``validate_options(options)``, raising
        UserError): a suite's mistake shows when it is loaded, not after a cell's training."""
        sig = self.signature()
        params = sig.parameters if sig is not None else {}
        if sig is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            for key in options:
                if key not in accepted:
                    raise UserError(
                        f"{self.kind} {self.name!r} has no option {key!r}{suggest(key, accepted)}"
                    )
        validate = getattr(self.factory, "validate_options", None)
        if callable(validate):
            validate(options)

    def __call__(self, **options):
        self.check_options(options)
        built = self.factory(**options)
        contracts.check_built(self.kind, self.name, self.plugin, built)
        return built


@functools.lru_cache(maxsize=None)
def _signature(factory) -> inspect.Signature | None:
    """A factory's signature, read once: every cell checks its options against it."""
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


class Registry:
    """The plugin manager plus the components its plugins declare."""

    def __init__(self, load_entrypoints: bool = True):
        self.pm = pluggy.PluginManager("harness")
        self.pm.add_hookspecs(hookspecs)
        self._dists: dict[str, tuple[str, str]] = {}
        self._components: dict[str, dict[str, Component]] | None = None
        self._stages: dict | None = None
        self._checked: set[tuple[str, str]] = set()  # components whose factory passed its contract
        if load_entrypoints:
            self._load_entrypoints()

    # -- plugins -------------------------------------------------------------------------
    def _load_entrypoints(self) -> None:
        blocked = {n.strip() for n in os.environ.get("HARNESS_DISABLE_PLUGINS", "").split(",") if n.strip()}
        for name in blocked:
            self.pm.set_blocked(name)
        seen: set[tuple[str, str]] = set()
        for dist in md.distributions():
            dist_name = dist.metadata["Name"]
            for ep in dist.entry_points:
                if ep.group != "harness" or (dist_name, ep.name) in seen:
                    continue
                seen.add((dist_name, ep.name))  # a dist visible twice on sys.path
                if self.pm.is_blocked(ep.name):
                    continue
                if self.pm.get_plugin(ep.name) is not None:
                    other = self._dists.get(ep.name, ("?", ""))[0]
                    if other == dist_name:
                        continue
                    raise PluginError(
                        f"plugin name {ep.name!r} is declared by both {other!r} and {dist_name!r}"
                    )
                try:
                    plugin = ep.load()
                except Exception as exc:  # the user must learn which package is broken
                    raise PluginError(
                        f"plugin {ep.name!r} of distribution {dist_name!r} ({ep.value}) failed to import: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self.pm.register(plugin, name=ep.name)
                self._dists[ep.name] = (dist_name, dist.version)
        self._components = self._stages = None

    def register(self, plugin: object, name: str | None = None) -> str:
        name = self.pm.register(plugin, name=name)
        self._components = self._stages = None
        self._checked = set()
        return name

    def unregister(self, plugin: object | None = None, name: str | None = None) -> None:
        self.pm.unregister(plugin=plugin, name=name)
        self._components = self._stages = None
        self._checked = set()

    def plugins(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            dist, version = self._dists.get(name, (None, None))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            out.append(PluginInfo(name, dist, version, hooks))
        return sorted(out, key=lambda p: p.name)

    def versions(self) -> dict[str, str | None]:
        return {p.name: (f"{p.distribution} {p.version}" if p.distribution else None) for p in self.plugins()}

    # -- components ----------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, Component]]:
        if self._components is not None:
            return self._components
        table: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                try:
                    declared = impl.function() or {}
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} failed in {hook_name}(): {type(exc).__name__}: {exc}"
                    ) from exc
                for cname, factory in declared.items():
                    if cname in table[kind]:
                        first = table[kind][cname].plugin
                        raise PluginError(
                            f"{kind} {cname!r} is declared by both plugin {first!r} and plugin {impl.plugin_name!r}"
                        )
                    table[kind][cname] = Component(kind, cname, factory, impl.plugin_name)
        self._components = table
        return table

    def flop_handles(self) -> dict[str, Callable]:
        handles: dict[str, Callable] = {}
        for impl in self.pm.hook.harness_flop_handles.get_hookimpls():
            for op, handle in (impl.function() or {}).items():
                if op in handles:
                    raise PluginError(f"FLOP handle for {op!r} is declared twice (plugin {impl.plugin_name!r})")
                handles[op] = handle
        return handles

    def _declared(self, hook_name: str, what: str, cls: type) -> dict[str, tuple[object, str]]:
        """``{name: (object, plugin)}`` from a hook whose values must be ``cls`` instances."""
        out: dict[str, tuple[object, str]] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                declared = impl.function() or {}
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}(): {type(exc).__name__}: {exc}"
                ) from exc
            for name, obj in declared.items():
                if not isinstance(obj, cls):
                    raise PluginError(f"plugin {impl.plugin_name!r} declares {what} {name!r} as "
                                      f"{type(obj).__name__}, expected {cls.__module__}.{cls.__name__}")
                if name in out:
                    raise PluginError(f"{what} {name!r} is declared by both plugin {out[name][1]!r} and plugin "
                                      f"{impl.plugin_name!r}")
                out[name] = (obj, impl.plugin_name)
        return dict(sorted(out.items()))

    def stages(self) -> dict[str, "Stage"]:
        """Every registered stage by the block it owns (see :func:`harness.hookspecs.harness_stages`)."""
        from .stages import Stage

        if self._stages is None:
            self._stages = self._declared("harness_stages", "stage", Stage)
            for name, (stage, plugin) in self._stages.items():
                contracts.check_stage(name, plugin, stage)
        return {name: stage for name, (stage, _) in self._stages.items()}

    def stage_plugin(self, name: str) -> str:
        self.stages()
        return self._stages[name][1]

    def commands(self) -> dict[str, tuple["Command", str]]:
        """``{name: (Command, plugin)}`` (see :func:`harness.hookspecs.harness_commands`)."""
        from .commands import Command

        commands = self._declared("harness_commands", "command", Command)
        for name, (command, plugin) in commands.items():
            contracts.check_command(name, plugin, command)
        return commands

    def components(self, kind: str) -> dict[str, Component]:
        _check_kind(kind)
        return dict(sorted(self._collect()[kind].items()))

    def get(self, kind: str, name: str) -> Component:
        """The component, its factory checked against its kind's contract (once)."""
        known = self.components(kind)
        if not isinstance(name, str) or name not in known:
            raise UserError(f"unknown {kind} {name!r}{suggest(str(name), known)}")
        comp = known[name]
        if (kind, name) not in self._checked:
            contracts.check_factory(kind, name, comp.plugin, comp.factory)
            self._checked.add((kind, name))
        return comp

    def create(self, kind: str, name: str, **options):
        return self.get(kind, name)(**options)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown component kind {kind!r}{suggest(kind, KINDS)}")


_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def reset_registry() -> None:
    """Forget the loaded plugins (tests; after installing a plugin at run time)."""
    global _registry
    _registry = None
