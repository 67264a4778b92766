"""Built-in cost metrics: parameters, GFLOPs (fvcore) and latency."""
from __future__ import annotations

import harness
from harness.flops import baddbmm_flop, sdpa_flop

from .metrics import GFlops, Latency, Params


@harness.hookimpl
def harness_metrics():
    return {"params": Params, "gflops": GFlops, "latency": Latency}


@harness.hookimpl
def harness_flop_handles():
    return {
        "aten::scaled_dot_product_attention": sdpa_flop,
        "aten::_scaled_dot_product_flash_attention": sdpa_flop,
        "aten::_scaled_dot_product_efficient_attention": sdpa_flop,
        "aten::baddbmm": baddbmm_flop,
    }
