"""Built-in cost metrics: parameters, GFLOPs (fvcore), latency, and per image: sample latency,
throughput and peak memory of the whole generation."""
from __future__ import annotations

import harness


@harness.hookimpl
def harness_metrics():
    return {"params": "harness_measure.metrics:Params", "gflops": "harness_measure.metrics:GFlops",
            "latency": "harness_measure.metrics:Latency",
            "sample_latency": "harness_measure.sampling_costs:SampleLatency",
            "throughput": "harness_measure.sampling_costs:Throughput",
            "peak_memory": "harness_measure.sampling_costs:PeakMemory"}


@harness.hookimpl
def harness_flop_handles():
    return {
        # SDPA as a model calls it, and its fused kernels where one is called directly (or
        # reached outside inference mode): all take query, key, value first
        **dict.fromkeys(("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
                         "aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
                         "aten::_scaled_dot_product_attention_math"), "harness:sdpa_flop"),
        "aten::baddbmm": "harness:baddbmm_flop",
    }
