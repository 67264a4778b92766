"""Which implementation of each custom kernel ran: the runner puts it in ``env.kernels``.

A component with more than one implementation of an operator (the selective scan: mamba-ssm's
CUDA kernel, the compiled CPU loop or the PyTorch fallback, at very different speeds) calls
:func:`note` every time it dispatches. The runner collects the notes of one cell with
:func:`track`; a metric can track its own span too (latency records the kernels it timed)::

    from harness import kernels
    kernels.note("selective_scan", "compiled-cpu")

The core imports no plugin: plugins report here, the core only records.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["note", "track", "describe"]

_lock = threading.Lock()
_open: list[dict[str, list[str]]] = []  # every span being tracked now, outermost first


def note(kernel: str, impl: str) -> None:
    """Say that ``kernel`` just ran as ``impl``. Cheap when nothing is tracking."""
    if not _open:
        return
    with _lock:  # autograd may run a backward on another thread
        for used in _open:
            impls = used.setdefault(kernel, [])
            if impl not in impls:
                impls.append(impl)


@contextmanager
def track() -> Iterator[dict[str, list[str]]]:
    """Collect the notes made inside the block: ``{kernel: [impl, ...]}`` in order of first use."""
    used: dict[str, list[str]] = {}
    with _lock:
        _open.append(used)
    try:
        yield used
    finally:
        with _lock:  # by identity: two spans with the same notes are equal dicts
            del _open[next(i for i, span in enumerate(_open) if span is used)]


def describe(used: dict[str, list[str]]) -> dict[str, str]:
    """``{kernel: impl}`` for a record; a kernel that ran several ways lists them all, joined
    by " + " (the compiled loop for float32 and the fallback for another dtype, say)."""
    return {kernel: " + ".join(impls) for kernel, impls in sorted(used.items())}
