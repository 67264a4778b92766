"""Parameters, GFLOPs and latency of a cell's model."""
from __future__ import annotations

import os
import statistics
import time

import torch

from harness import (CONVENTIONS, DEFAULT_CONVENTION, DTYPES, AbstractCountError, CellContext, check_convention,
                     count_flops, is_small, kernels)


class Params:
    """Number of parameters (buffers such as fixed position embeddings excluded)."""

    name, direction, unit = "params", "lower", "params"
    role = "cost"

    def __call__(self, ctx: CellContext) -> dict:
        model = ctx.abstract_model()  # shapes are all a count needs: no weights built for it
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"value": total, "trainable": trainable}


class GFlops:
    """GFLOPs of one forward at batch 1 (fvcore: one multiply-add = one FLOP; or thop's MACs with
    ``convention: thop``), counted on the meta device (harness.flops), or on real tensors where
    the model cannot run on meta or is small and already built for real (trained, pruned)."""

    name, direction, unit = "gflops", "lower", "G"
    role = "cost"

    def __init__(self, by_module: bool = False, convention: str = DEFAULT_CONVENTION):
        self.by_module = by_module
        self.convention = check_convention(convention)

    @staticmethod
    def validate_options(options: dict) -> None:
        """Checked when the suite is loaded, not after the cell's training."""
        check_convention(options.get("convention", DEFAULT_CONVENTION))

    def __call__(self, ctx: CellContext) -> dict:
        model = ctx.abstract_model()
        try:
            # one already built for real, and small, is cheaper traced as it is (harness.flops.SMALL_MODEL_PARAMS)
            fc = self._count(ctx, model, abstract=not is_small(model))
        except AbstractCountError as exc:  # built on meta but needs data: build it for real
            fc = self._count(ctx, ctx.model, abstract=False)
            fc.fallback_reason = str(exc)
        out = {"value": fc.total / 1e9, "batch_size": 1, "resolution": ctx.input_spec["input_size"],
               "convention": CONVENTIONS[self.convention], **fc.record()}
        if self.by_module:
            out["by_module"] = {k: v / 1e9 for k, v in fc.by_module.items()}
        return out

    def _count(self, ctx: CellContext, model: torch.nn.Module, abstract: bool = True):
        was_training = model.training
        model.eval()
        try:
            inputs = ctx.example_inputs(1, model=model, generator=ctx.generator("flops-inputs"))
            return count_flops(model, inputs, ctx.registry.flop_handles(), abstract=abstract,
                               convention=self.convention)
        finally:
            model.train(was_training)


class Latency:
    """Forward latency in ms: eval and inference mode, warm-up, median and IQR of timed runs."""

    name, direction, unit = "latency", "lower", "ms"
    role = "cost"
    timing_sensitive = True  # executors run it with no other cell on the machine

    def __init__(self, batch_size: int = 1, warmup: int = 3, min_runs: int = 10, max_runs: int = 200,
                 min_time: float = 1.0, dtype: str | None = None):
        if batch_size < 1 or warmup < 0 or min_runs < 1 or max_runs < min_runs or min_time < 0:
            raise ValueError("latency needs batch_size >= 1, warmup >= 0, 1 <= min_runs <= max_runs, min_time >= 0")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"latency dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.batch_size, self.warmup = batch_size, warmup
        self.min_runs, self.max_runs, self.min_time = min_runs, max_runs, min_time
        self.dtype = dtype

    def __call__(self, ctx: CellContext) -> dict:
        dtype = DTYPES[self.dtype] if self.dtype else ctx.dtype
        model = ctx.model
        was_training = model.training
        device = ctx.device
        model.eval()
        cast = model if dtype == torch.float32 else _cast_copy(model, dtype)
        inputs = ctx.example_inputs(self.batch_size, model=cast, device=device,
                                    generator=ctx.generator("latency-inputs"))
        inputs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in inputs.items()}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        load_before = _load_average()
        times: list[float] = []
        try:
            with torch.inference_mode(), kernels.track() as used:
                for _ in range(self.warmup):
                    cast(**inputs)
                sync()
                start = time.perf_counter()
                while len(times) < self.max_runs and (len(times) < self.min_runs or
                                                      time.perf_counter() - start < self.min_time):
                    t0 = time.perf_counter()
                    cast(**inputs)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
        finally:
            model.train(was_training)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        return {
            "value": statistics.median(times), "iqr": q[2] - q[0], "min": min(times), "runs": len(times),
            "warmup": self.warmup, "batch_size": self.batch_size, "resolution": ctx.input_spec["input_size"],
            "dtype": str(dtype).replace("torch.", ""), "device": str(device), "threads": torch.get_num_threads(),
            # CPU timings are only comparable on a quiet machine: keep the load they were taken under
            "load_average": [load_before, _load_average()], "cpu_count": os.cpu_count(),
            "kernels": kernels.describe(used),  # the implementations timed (compiled scan or fallback...)
        }


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none, e.g. Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)
