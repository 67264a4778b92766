"""Built-in cost metrics: parameters, GFLOPs (fvcore), latency, and per image: sample latency,
throughput and peak memory of the whole generation."""
from __future__ import annotations

import harness
from harness.flops import baddbmm_flop, sdpa_flop

from .metrics import GFlops, Latency, Params
from .sampling_costs import PeakMemory, SampleLatency, Throughput


@harness.hookimpl
def harness_metrics():
    return {"params": Params, "gflops": GFlops, "latency": Latency, "sample_latency": SampleLatency,
            "throughput": Throughput, "peak_memory": PeakMemory}


@harness.hookimpl
def harness_flop_handles():
    return {
        # SDPA as a model calls it, and its fused kernels where one is called directly (or
        # reached outside inference mode): all take query, key, value first
        **dict.fromkeys(("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
                         "aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
                         "aten::_scaled_dot_product_attention_math"), sdpa_flop),
        "aten::baddbmm": baddbmm_flop,
    }
