"""Training-free acceleration of sampling: the ``deepcache`` and ``tome`` stages.

They change how the denoiser computes a step, not its weights, so what the sampling metrics
(``sample_latency``, ``throughput``) and the quality metrics measure is the accelerated
sampler; each stage says so in the record.
"""
from __future__ import annotations

import harness


@harness.hookimpl
def harness_stages():
    return {
        "deepcache": harness.Lazy("harness_accel.deepcache:STAGE", "DeepCache: reuse deep U-Net features (or DiT "
                                  "middle blocks) across sampling steps (interval N, branch B)"),
    }
