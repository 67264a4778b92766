"""Built-in cost metrics: parameters, GFLOPs (fvcore), latency, and per image: sample latency,
throughput and peak memory of the whole generation."""
from __future__ import annotations

import harness
from harness import baddbmm_flop, sdpa_flop

from .metrics import GFlops, Latency, Params
from .sampling_costs import PeakMemory, SampleLatency, Throughput


@harness.hookimpl
def harness_metrics():
    return {"params": Params, "gflops": GFlops, "latency": Latency, "sample_latency": SampleLatency,
            "throughput": Throughput, "peak_memory": PeakMemory}


@harness.hookimpl
def harness_flop_handles():
    return {
        "aten::scaled_dot_product_attention": sdpa_flop,
        "aten::_scaled_dot_product_flash_attention": sdpa_flop,
        "aten::_scaled_dot_product_efficient_attention": sdpa_flop,
        "aten::baddbmm": baddbmm_flop,
    }
