"""Errors the user can act on.

Anything raised as a :class:`UserError` is printed by the CLI as one line and exits with
status 2; everything else is a bug (or a failing cell, which the runner records).
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input: a suite, an option, a path. One line, no traceback, exit status 2."""


class PluginError(UserError):
    """A plugin cannot be loaded, or two plugins claim the same component name."""


class MetricUnavailable(Exception):
    """A metric cannot be computed here (no weights offline, no GPU...).

    The runner records the metric as unavailable with this reason; it never invents a value.
    """


def suggest(name: str, known: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x', 'y'?)' for the closest known names, or a list of them all."""
    known = sorted(set(known))
    close = difflib.get_close_matches(str(name), known, n=n, cutoff=0.5)
    if close:
        return "; did you mean " + ", ".join(repr(c) for c in close) + "?"
    if len(known) <= 12:
        return "; known: " + ", ".join(known) if known else "; none are known"
    return ""
