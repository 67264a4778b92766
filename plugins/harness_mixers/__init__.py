"""Built-in token mixers. Each maps (B, L, dim) tokens on an H x W grid to (B, L, dim).

- ``attention``: global multi-head attention (SDPA), quadratic in tokens.
- ``window-attention``: Swin window attention (window.py), linear in tokens.
- ``mamba``: Mamba v1 over raster order, 1 or 2 directions (mamba.py).
- ``ss2d``: VMamba/LaMamba-Diff four-direction 2-D scan (ss2d.py).
- ``lamamba``: SS2D then window attention, as one mixer (lamamba.py).

The selective scan they share is ``harness_mixers.scan.selective_scan``, the registered op
``harness_mixers::selective_scan``; its FLOP rule reaches the count through the
``harness_flop_handles`` hook below.
"""
from __future__ import annotations

import harness


@harness.hookimpl
def harness_mixers():
    return {"attention": "harness_mixers.attention:attention",
            "window-attention": "harness_mixers.window:window_attention", "mamba": "harness_mixers.mamba:mamba",
            "ss2d": "harness_mixers.ss2d:ss2d",
            "lamamba": "harness_mixers.lamamba:lamamba"}


@harness.hookimpl
def harness_flop_handles():
    return {"harness_mixers::selective_scan": "harness_mixers.scan:selective_scan_flop"}
