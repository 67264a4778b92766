"""A per-shape cache for index and mask tensors."""
from __future__ import annotations

from functools import lru_cache, wraps

import torch


def shape_cache(fn):
    """lru_cache whose tensors are made outside inference mode: one made inside (a latency
    run) and cached would break every later forward that records autograd."""
    cached = lru_cache(maxsize=64)(fn)

    @wraps(fn)
    def call(*args):
        with torch.inference_mode(False):
            return cached(*args)

    call.cache_clear = cached.cache_clear
    return call
