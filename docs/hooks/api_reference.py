"""MkDocs hook: the API reference lists exactly ``harness.__all__``.

``docs/api.md`` holds the marker below; this hook replaces it with one mkdocstrings
directive per public name, in the order of ``__all__``, so a name added to the public API
appears in the reference without editing the page, and a name the docs cannot locate
fails the (strict) build instead of going missing.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
from functools import lru_cache
from pathlib import Path

MARKER = "<!-- harness.__all__ -->"


@lru_cache(maxsize=None)
def _assigned_names(path: str) -> frozenset[str]:
    """Names a module's source binds at top level by assignment (constants, markers)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def identifier(harness, name: str) -> str:
    """Dotted path of the definition behind ``harness.<name>``, as mkdocstrings wants it.

    Classes and functions say where they are defined; a value (``KINDS``, ``hookimpl``) is
    found in the ``harness`` module whose source assigns it.
    """
    obj = getattr(harness, name)
    if inspect.ismodule(obj):
        return obj.__name__
    if inspect.isclass(obj) or inspect.isfunction(obj):
        module, qualname = obj.__module__, obj.__qualname__
        if module.split(".")[0] == "harness" and "<" not in qualname:
            return f"{module}.{qualname}"
    for module_name, module in sorted(sys.modules.items()):
        if module_name.split(".")[0] != "harness" or vars(module).get(name) is not obj:
            continue
        source = getattr(module, "__file__", None)
        if source and name in _assigned_names(source):
            return f"{module_name}.{name}"
    raise ValueError(f"harness.__all__ names {name!r}, but no module under harness/ defines it")


def reference(harness) -> str:
    return "\n\n".join(f"::: {identifier(harness, name)}" for name in harness.__all__) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    harness = importlib.import_module("harness")
    return markdown.replace(MARKER, reference(harness))
