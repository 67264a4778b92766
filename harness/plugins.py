"""Plugin manager and component registry.

Plugins come from the entry-point group ``harness`` (built-ins included) and from
:func:`register` (tests, notebooks). ``HARNESS_DISABLE_PLUGINS=a,b`` blocks entry points by
name. Every hook returns ``{name: declaration}``; :class:`Registry` merges them per kind.

A declaration is the object itself (a factory, a :class:`~harness.stages.Stage`, a
:class:`~harness.commands.Command`) or a reference to it, ``"package.module:attr"`` or
:class:`Lazy`, imported the first time the component is used. References let ``harness
--help`` and ``harness ls`` answer without importing torch or the plugin's modules (see the
module docstring of :mod:`harness.hookspecs`).

A plugin that fails to import, a hook that raises and a name declared twice are problems
of that plugin alone: each is reported once, in one line naming the plugin and its
distribution, and only what needs that plugin fails.

What a component must declare (:mod:`harness.contracts`) is checked on the object itself,
so on a reference once it is imported: a factory when the registry hands it out
(:meth:`Registry.get`: a suite's validation, :func:`harness.create`), what it builds when
it is built, a stage or a command when it is looked up.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata as md
import importlib.util
import inspect
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pluggy

from . import contracts, hookspecs
from .errors import PluginError, UserError, suggest

if TYPE_CHECKING:  # annotations only: importing them here would import torch with `harness --help`
    from .commands import Command
    from .stages import Stage

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
# Kinds `harness ls` lists besides KINDS, whose objects are not built by a factory.
OTHER_KINDS = {"stage": "harness_stages", "command": "harness_commands"}


class UnknownOption(UserError):
    """An option a component's factory does not take; ``option`` is its name (a suite's
    error then points at that option's own line)."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


class PluginWarning(UserWarning):
    """A plugin could not be loaded, or declares a name another already has."""


# Where problems go: the command line prints them as ``harness: warning: ...`` lines; in
# Python they are warnings (PluginWarning).
on_problem: Callable[[str], None] | None = None


def _report(message: str) -> None:
    if on_problem is not None:
        on_problem(message)
    else:
        warnings.warn(message, PluginWarning, stacklevel=3)


# -- references -------------------------------------------------------------------------------
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.-]*$")


@dataclass(frozen=True)
class Lazy:
    """A component declared by reference, imported on first use.

    ``target`` is ``"package.module:attr"``; ``attr`` may be a dotted path, each step an
    attribute or, on a mapping, a key (``"my_plugin.stages:STAGES.quantize"``).
    ``description`` is the line ``harness ls`` and ``harness --help`` show; left empty, it is
    read from the docstring of the function or class ``attr`` names, in the module's source,
    without importing it. A plain string in a hook's mapping is ``Lazy(string)``.
    """

    target: str
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.target, str) or not _REFERENCE.match(self.target):
            raise PluginError(f"lazy reference {self.target!r}: expected 'package.module:attr'")

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def attr(self) -> str:
        return self.target.partition(":")[2]

    def resolve(self) -> Any:
        """Import the module and follow ``attr``; errors propagate (callers name the plugin)."""
        obj: Any = importlib.import_module(self.module)
        for step in self.attr.split("."):
            if isinstance(obj, Mapping) and step in obj:
                obj = obj[step]
            else:
                obj = getattr(obj, step)
        return obj

    def static_doc(self) -> str | None:
        """The docstring of the function or class ``attr`` names, read from the source (None
        when the target is not a ``def`` or ``class`` of that module, or has no source)."""
        try:
            spec = importlib.util.find_spec(self.module)  # imports the parent packages only
        except Exception:  # a parent that fails to import: no description here, the error comes on use
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        node: Any = _module_ast(spec.origin)
        for step in self.attr.split("."):
            body = getattr(node, "body", None) or []
            node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                         and n.name == step), None)
            if node is None:
                return None
        return ast.get_docstring(node)


@functools.lru_cache(maxsize=None)
def _module_ast(path: str) -> ast.Module | None:
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def as_declaration(value: Any) -> Any:
    """A hook's value as the registry keeps it: strings become :class:`Lazy`."""
    return Lazy(value) if isinstance(value, str) else value


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line (its first sentence when long): a first
    line alone can stop mid-sentence."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    if len(paragraph) > 160:
        paragraph = re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]
    return paragraph


_UNRESOLVED = object()


@dataclass(frozen=True, eq=False)
class Declared:
    """One name a plugin declares in one hook: what it is, who declares it, how to get it."""

    kind: str
    name: str
    declared: Any  # the object, or a Lazy reference to it
    plugin: str
    distribution: str | None = None
    _resolved: list = field(default_factory=lambda: [_UNRESOLVED], repr=False)

    @property
    def lazy(self) -> bool:
        return isinstance(self.declared, Lazy)

    @property
    def origin(self) -> str:
        """``plugin 'x' (distribution 'd')``: who to blame."""
        return f"plugin {self.plugin!r}" + (f" (distribution {self.distribution!r})" if self.distribution else "")

    def resolve(self) -> Any:
        """The declared object, imported on first use; a failure is one line naming the plugin."""
        if self._resolved[0] is _UNRESOLVED:
            if not self.lazy:
                self._resolved[0] = self.declared
            else:
                try:
                    self._resolved[0] = self.declared.resolve()
                except Exception as exc:  # the plugin's bug or missing dependency, not the user's input
                    raise PluginError(f"{self.kind} {self.name!r} of {self.origin} cannot be imported from "
                                      f"{self.declared.target}: {type(exc).__name__}: {_one_line(exc)}") from exc
        return self._resolved[0]

    @property
    def resolved(self) -> bool:
        return self._resolved[0] is not _UNRESOLVED

    def static_description(self) -> str | None:
        """The description without importing anything of the plugin, None when that needs the import."""
        if self.lazy and not self.resolved:
            if self.declared.description:
                return self.declared.description
            doc = self.declared.static_doc()
            return summary(doc) if doc is not None else None
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class Component(Declared):
    """A component built by a factory (backbone, mixer, metric...): its options are the
    factory's signature."""

    def __init__(self, kind: str, name: str, factory: Any, plugin: str, distribution: str | None = None):
        super().__init__(kind, name, as_declaration(factory), plugin, distribution)

    @property
    def factory(self) -> Callable[..., Any]:
        return self.resolve()

    @property
    def description(self) -> str:
        """One line: the declaration's, else the factory's docstring (read without importing
        it when the declaration is a reference)."""
        static = self.static_description()
        if static is not None:
            return static
        try:
            return summary(inspect.getdoc(self.factory))
        except PluginError:  # listing never fails: using the component says why it cannot be imported
            return ""

    def signature(self) -> inspect.Signature | None:
        return _signature(self.factory)

    def defaults(self) -> dict[str, Any]:
        sig = self.signature()
        if sig is None:
            return {}
        return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}

    def options(self) -> list[dict[str, Any]]:
        """The options a suite may give: name, default (absent when required), annotation (as
        written), in the factory's order. ``**options`` shows as ``**name``."""
        sig = self.signature()
        out = []
        for name, p in (sig.parameters.items() if sig is not None else ()):
            if p.kind is p.VAR_POSITIONAL:
                continue
            row: dict[str, Any] = {"name": f"**{name}" if p.kind is p.VAR_KEYWORD else name}
            if p.default is not p.empty:
                row["default"] = p.default
            if p.annotation is not p.empty:
                row["annotation"] = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(
                    p.annotation)
            out.append(row)
        return out

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
                    raise UnknownOption(f"{self.kind} {self.name!r} has no option {key!r}{suggest(key, accepted)}",
                                        key)
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


class LazyMapping(Mapping):
    """``{name: object}`` over declarations, each imported when first looked up: a suite that
    uses one stage imports that stage's module alone."""

    def __init__(self, declared: dict[str, Declared]):
        self._declared = declared

    def __getitem__(self, name: str) -> Any:
        return self._declared[name].resolve()

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared)

    def __len__(self) -> int:
        return len(self._declared)

    def __contains__(self, name: object) -> bool:
        return name in self._declared


class Registry:
    """The plugin manager plus the components its plugins declare.

    Nothing here stops at one plugin's fault: each problem is kept in :attr:`problems`,
    reported once (see :data:`on_problem`), and raised only where a name that needs the
    faulty plugin is used."""

    def __init__(self, load_entrypoints: bool = True):
        self.pm = pluggy.PluginManager("harness")
        self.pm.add_hookspecs(hookspecs)
        self._dists: dict[str, tuple[str, str]] = {}
        self._tables: dict[str, dict[str, Declared]] = {}
        self._clashes: dict[tuple[str, str], str] = {}  # (kind, name) -> the problem's line
        self.problems: list[str] = []
        self.broken: dict[str, str] = {}  # plugin name -> why it is not loaded
        self._contract_checked: set[tuple[str, str]] = set()  # components whose contract passed
        if load_entrypoints:
            self._load_entrypoints()

    def _problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)
            _report(message)

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
                if self.pm.get_plugin(ep.name) is not None or ep.name in self.broken:
                    other = self._dists.get(ep.name, ("?", ""))[0]
                    if other == dist_name:
                        continue
                    self._problem(f"plugin name {ep.name!r} is declared by both distribution {other!r} and "
                                  f"distribution {dist_name!r}; the second is not loaded")
                    continue
                self._dists[ep.name] = (dist_name, dist.version)
                try:
                    plugin = ep.load()
                    self.pm.register(plugin, name=ep.name)
                except Exception as exc:  # the user must learn which package is broken, and go on without it
                    why = (f"plugin {ep.name!r} of distribution {dist_name!r} ({ep.value}) failed to import: "
                           f"{type(exc).__name__}: {_one_line(exc)}")
                    self.broken[ep.name] = why
                    self._problem(why + "; its components are unavailable")
        self._tables = {}
        self._contract_checked = set()

    def register(self, plugin: object, name: str | None = None) -> str:
        name = self.pm.register(plugin, name=name)
        self._tables = {}
        self._contract_checked = set()
        return name

    def unregister(self, plugin: object | None = None, name: str | None = None) -> None:
        self.pm.unregister(plugin=plugin, name=name)
        self._tables = {}
        self._contract_checked = set()

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

    def distribution(self, plugin: str) -> str | None:
        return self._dists.get(plugin, (None, None))[0]

    def _origin(self, plugin: str) -> str:
        dist = self.distribution(plugin)
        return f"plugin {plugin!r}" + (f" (distribution {dist!r})" if dist else "")

    # -- declarations --------------------------------------------------------------------
    def declared(self, kind: str) -> dict[str, Declared]:
        """Every name of ``kind`` (a component kind, ``stage`` or ``command``) as its plugin
        declares it, nothing imported; names declared twice are left out (and reported)."""
        if kind not in self._tables:
            hook_name = KINDS.get(kind) or OTHER_KINDS[kind]
            cls = Component if kind in KINDS else Declared
            table: dict[str, Declared] = {}
            reserved = _core_keys() if kind == "stage" else ()
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin, dist = impl.plugin_name, self.distribution(impl.plugin_name)
                try:
                    declared = impl.function() or {}
                    if not isinstance(declared, Mapping):
                        raise TypeError(f"returned {type(declared).__name__}, expected a mapping of names")
                    entries = [(n, cls(kind, n, as_declaration(v), plugin, dist)) for n, v in declared.items()]
                except Exception as exc:
                    self._problem(f"{self._origin(plugin)} failed in {hook_name}(): {type(exc).__name__}: "
                                  f"{_one_line(exc)}; its {kind} declarations are unavailable")
                    continue
                for cname, entry in entries:
                    if cname in reserved:  # a block the core reads itself: the stage could never run
                        self._problem(f"{entry.origin} declares stage {cname!r}, a key the core reads itself "
                                      f"({', '.join(reserved)}); it is not added")
                        continue
                    if (kind, cname) in self._clashes:
                        continue
                    if cname in table:
                        first = table.pop(cname)
                        message = (f"{kind} {cname!r} is declared by both {first.origin} and {entry.origin}; "
                                   f"uninstall or disable one (HARNESS_DISABLE_PLUGINS)")
                        self._clashes[(kind, cname)] = message
                        self._problem(message)
                        continue
                    table[cname] = entry
            self._tables[kind] = dict(sorted(table.items()))
        return self._tables[kind]

    def flop_handles(self) -> dict[str, Callable]:
        handles: dict[str, Callable] = {}
        for impl in self.pm.hook.harness_flop_handles.get_hookimpls():
            for op, handle in (impl.function() or {}).items():
                if op in handles:
                    raise PluginError(f"FLOP handle for {op!r} is declared twice ({self._origin(impl.plugin_name)})")
                handles[op] = Declared("flop handle", op, as_declaration(handle), impl.plugin_name,
                                       self.distribution(impl.plugin_name)).resolve()
        return handles

    def _checked(self, kind: str, cls: type) -> dict[str, Declared]:
        """Declarations of ``kind`` whose objects, once imported, must be ``cls`` instances
        keeping their contract; those declared as objects (imported already) are checked now,
        references when first looked up."""
        out = self.declared(kind)
        for entry in out.values():
            if not entry.lazy:
                self.checked_object(entry, cls)
        return out

    def checked_object(self, entry: Declared, cls: type) -> Any:
        """The stage or command ``entry`` declares, imported, of type ``cls`` and checked
        against its contract (:func:`harness.contracts.check_stage`, ``check_command``) once."""
        obj = entry.resolve()
        if not isinstance(obj, cls):
            raise PluginError(f"{entry.origin} declares {entry.kind} {entry.name!r} as {type(obj).__name__}, "
                              f"expected {cls.__module__}.{cls.__name__}")
        if (entry.kind, entry.name) not in self._contract_checked:
            check = contracts.check_stage if entry.kind == "stage" else contracts.check_command
            check(entry.name, entry.plugin, obj)
            self._contract_checked.add((entry.kind, entry.name))
        return obj

    def stages(self) -> Mapping[str, "Stage"]:
        """Every registered stage by the block it owns (see :func:`harness.hookspecs.harness_stages`),
        each imported when first looked up."""
        from .stages import Stage

        return _TypedMapping(self, self._checked("stage", Stage), Stage)

    def stage_plugin(self, name: str) -> str:
        return self.declared("stage")[name].plugin

    def commands(self) -> dict[str, tuple["Command", str]]:
        """``{name: (Command, plugin)}``, every command imported (see
        :func:`harness.hookspecs.harness_commands`); :meth:`declared` lists them without importing."""
        from .commands import Command

        commands = _TypedMapping(self, self._checked("command", Command), Command)
        return {name: (commands[name], entry.plugin) for name, entry in self.declared("command").items()}

    def components(self, kind: str) -> dict[str, Component]:
        _check_kind(kind)
        return dict(self.declared(kind))

    def get(self, kind: str, name: str) -> Component:
        """The component, its factory imported and checked against its kind's contract (once)."""
        _check_kind(kind)
        if isinstance(name, str) and (kind, name) in self._clashes:
            raise PluginError(self._clashes[(kind, name)])
        known = self.components(kind)
        if not isinstance(name, str) or name not in known:
            raise UserError(f"unknown {kind} {name!r}{suggest(str(name), known)}{self.broken_note()}")
        comp = known[name]
        if (kind, name) not in self._contract_checked:
            contracts.check_factory(kind, name, comp.plugin, comp.factory)
            self._contract_checked.add((kind, name))
        return comp

    def broken_note(self) -> str:
        """What an unknown name's error adds when plugins failed to load: one of them may own it."""
        if not self.broken:
            return ""
        first = next(iter(self.broken.values()))
        more = f" (and {len(self.broken) - 1} more plugin(s))" if len(self.broken) > 1 else ""
        return f"; it may belong to a plugin that did not load: {first}{more}"

    def create(self, kind: str, name: str, **options):
        return self.get(kind, name)(**options)


class _TypedMapping(LazyMapping):
    """A :class:`LazyMapping` that checks what a reference leads to: its type and its contract."""

    def __init__(self, registry: Registry, declared: dict[str, Declared], cls: type):
        super().__init__(declared)
        self._registry = registry
        self._cls = cls

    def __getitem__(self, name: str) -> Any:
        return self._registry.checked_object(self._declared[name], self._cls)


def _core_keys() -> tuple[str, ...]:
    from .suite import CORE_KEYS

    return CORE_KEYS


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
