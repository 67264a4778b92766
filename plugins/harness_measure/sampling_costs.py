"""Cost per image: ``sample_latency``, ``throughput`` and ``peak_memory`` of a cell's whole
generation, the kind of figure the cost columns of text-to-image compression papers give
(BK-SDM: seconds for 25 denoising steps with the VAE decoder), for every backbone.

One generation of a batch has three parts, each timed on its own (synchronised on CUDA):

- ``text``: the prompts through the pipeline's text encoder(s) (``harness_t2i.encode_prompts``,
  the pipeline's own ``encode_prompt``), for text-conditioned U-Nets only;
- ``denoise``: ``steps`` steps of the cell's model as it stands (trained, pruned, distilled)
  with a diffusers scheduler, through :func:`harness.sample_batch`, the loop the
  harness samples with (classifier-free guidance included: two model calls per step);
- ``decode``: the VAE decoder of a latent backbone: the data block's VAE, else the text
  pipeline's, else the ``vae`` option; pixel-space models have no decode part.

The denoiser runs in the metric's ``dtype`` (default: the cell's); text encoder and VAE run
in float32, as the data and text plugins load them, and the record says so.
"""
from __future__ import annotations

import copy
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from harness import DTYPES, SAMPLERS, MetricUnavailable, UserError, kernels, model_learns_sigma, sample_batch

from .metrics import _load_average

PARTS = ("text", "denoise", "decode")
# The prompt the text part encodes, batch_size times. Its content does not change the cost:
# Stable Diffusion pipelines pad every prompt to the tokenizer's 77 tokens.
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
MiB = 2 ** 20


class Generation:
    """A cell's sampling path, set up once and run batch by batch with each part timed."""

    def __init__(self, ctx, *, steps: int, sampler: str, cfg_scale: float, prompt: str, pipeline: str | None,
                 vae: str | None, dtype: str | None):
        self.ctx, self.steps, self.sampler, self.cfg_scale, self.prompt = ctx, steps, sampler, cfg_scale, prompt
        spec = ctx.input_spec
        self.shape = (spec["in_channels"], spec["input_size"], spec["input_size"])
        self.num_classes, self.context_dim = spec["num_classes"] or 0, spec["context_dim"] or 0
        self.device, self.dtype = ctx.device, (DTYPES[dtype] if dtype else ctx.dtype)
        self.pipeline = self._text_source(pipeline) if self.context_dim else None
        self.decode, self.decoder = self._decoder(vae)
        self.seed = ctx.seed("sample-cost")

    # -- set-up ------------------------------------------------------------------------------
    def _dataset(self):
        return self.ctx.dataset if self.ctx.config.data is not None else None

    def _text_source(self, pipeline: str | None) -> str:
        source = pipeline or getattr(self._dataset(), "pipeline", None)  # a captioned data block's
        if not source:
            raise MetricUnavailable("text part: the backbone takes a text context but no pipeline encodes prompts "
                                    "for it; give the metric pipeline: (hub id or folder) or a captioned data block")
        return source

    def _decoder(self, vae: str | None):
        """``(decode(latents) -> images, what decodes)``, or ``(None, None)`` in pixel space."""
        if vae:
            return _vae_decoder(vae, None), vae
        ds = self._dataset()
        if ds is not None:  # the data set knows whether it is latent: it has decode() if so
            return (ds.decode, "the data set's VAE") if hasattr(ds, "decode") else (None, None)
        if self.pipeline is not None:
            return _vae_decoder(self.pipeline, "vae"), f"{self.pipeline} (vae)"
        if self.shape[0] in (1, 3):
            return None, None  # grey or RGB channels with no data block: pixel space
        raise MetricUnavailable(f"decode part: a latent backbone ({self.shape[0]} channels) with neither a latent "
                                "data block nor a vae: option has no decoder to time; give vae: (hub id or "
                                "folder, e.g. stabilityai/sd-vae-ft-ema)")

    @contextmanager
    def session(self):
        """The model to sample with: the cell's in eval mode, or a copy in ``dtype``; on CUDA
        the float32 original waits on the CPU meanwhile, so memory counts what the copy needs."""
        model = self.ctx.model
        was_training, moved = model.training, False
        model.eval()
        try:
            runner = model
            if self.dtype != next(iter(model.parameters()), torch.empty(0)).dtype:
                if self.device.type == "cuda":
                    model.to("cpu")
                    moved = True
                runner = _Cast(model, self.dtype, self.device)
            # no_grad, not inference_mode: the text encoder and VAE load on first use, and the
            # caches that keep them serve training later, where inference tensors would not do
            with torch.no_grad(), kernels.track() as used:
                self.kernels = used
                yield runner
        finally:
            if moved:
                model.to(self.device)
            model.train(was_training)

    # -- one batch ---------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, model, batch_size: int) -> dict[str, float | None]:
        """Seconds of each part for one batch (None: the part does not apply)."""
        guided = self.cfg_scale != 1.0
        self.sync()
        t0 = time.perf_counter()
        cond = null = None
        if self.context_dim:
            cond, null = self._encode(batch_size, guided)
            self.sync()
        t1 = time.perf_counter()
        x, _ = sample_batch(model, list(range(batch_size)), shape=self.shape, num_classes=self.num_classes,
                            seed=self.seed, sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale,
                            guided_channels=None if self.context_dim else 3, schedule=self.ctx.train.schedule,
                            timesteps=self.ctx.train.timesteps, learn_sigma=self.ctx.train.learn_sigma,
                            cond=cond, null_cond=null, device=self.device)
        self.sync()
        t2 = time.perf_counter()
        if self.decode is not None:
            self.image_size = tuple(self.decode(x.float()).shape[-2:])
            self.sync()
        else:
            self.image_size = tuple(x.shape[-2:])
        t3 = time.perf_counter()
        return {"text": t1 - t0 if self.context_dim else None, "denoise": t2 - t1,
                "decode": t3 - t2 if self.decode is not None else None}

    def _encode(self, batch_size: int, guided: bool):
        """The context (and for guidance the empty prompt's) as the U-Net takes it."""
        from harness_t2i import encode_prompts

        try:
            embeds, pooled = encode_prompts(self.pipeline, [self.prompt] * batch_size + ([""] if guided else []))
        except UserError as exc:  # the pipeline's text encoder cannot be loaded here
            raise MetricUnavailable(f"text part: {exc}") from None
        if embeds.shape[-1] != self.context_dim:
            raise UserError(f"pipeline {self.pipeline!r} encodes prompts of width {embeds.shape[-1]}; the U-Net "
                            f"takes {self.context_dim}")
        size = float(8 * self.shape[-1])  # SDXL's size ids are in pixels: 8x the latent

        def cond(rows):
            y = embeds[rows].to(self.device)
            if pooled is None:
                return y
            ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=self.device).repeat(len(y), 1)
            return {"y": y, "text_embeds": pooled[rows].to(self.device), "time_ids": ids}

        return cond(slice(0, batch_size)), (cond([batch_size] * batch_size) if guided else None)

    def describe(self, batch_size: int) -> dict:
        return {
            "batch_size": batch_size, "steps": self.steps, "sampler": self.sampler, "cfg_scale": self.cfg_scale,
            "model_calls": self.steps * (2 if self.cfg_scale != 1.0 else 1),
            "resolution": self.shape[-1], "image_size": list(getattr(self, "image_size", ())) or None,
            "dtype": str(self.dtype).replace("torch.", ""), "text_encoder": self.pipeline, "vae": self.decoder,
            "text_decode_dtype": "float32", "device": str(self.device), "threads": torch.get_num_threads(),
            "kernels": kernels.describe(getattr(self, "kernels", set())),
        }


class _Cast(torch.nn.Module):
    """The model in another dtype behind the float32 sampling loop: inputs cast in, output
    cast back (the scheduler's arithmetic stays float32)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.inner = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.learn_sigma, self.dtype = model_learns_sigma(model), dtype

    def forward(self, x, t, y=None):
        return self.inner(x.to(self.dtype), t, _cast(y, self.dtype)).float()


def _cast(y, dtype):
    if isinstance(y, dict):
        return {k: _cast(v, dtype) for k, v in y.items()}
    return y.to(dtype) if isinstance(y, torch.Tensor) and y.is_floating_point() else y


def _vae_decoder(source: str, subfolder: str | None):
    """decode(latents) -> images in [-1, 1] with a diffusers AutoencoderKL (float32)."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder).eval().requires_grad_(False)
    except (OSError, ValueError) as exc:  # offline, no vae/ in the pipeline, a wrong id
        where = f"{source}/{subfolder}" if subfolder else source
        raise MetricUnavailable(f"decode part: cannot load the VAE {where!r}: {str(exc).splitlines()[0]}") from None
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))

    def decode(z: torch.Tensor) -> torch.Tensor:
        vae.to(z.device)
        return vae.decode(z / scale).sample.clamp(-1, 1)

    return decode


# -- metrics ---------------------------------------------------------------------------------
class _SamplingCost:
    """Options shared by the three metrics: what one generation is. (Each metric lists them in
    its own signature: the signature is what a suite may give, checked before any work.)"""

    name = ""
    samples = True  # times the cell's sampler: a stage that changes it is named in the entry

    def __init__(self, steps: int = 25, sampler: str = "ddim", cfg_scale: float = 1.0, prompt: str = DEFAULT_PROMPT,
                 pipeline: str | None = None, vae: str | None = None, dtype: str | None = None):
        if steps < 1:
            raise ValueError(f"{self.name} needs steps >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"{self.name} sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{self.name} dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.gen_options = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale, prompt=prompt, pipeline=pipeline,
                                vae=vae, dtype=dtype)

    def generation(self, ctx) -> Generation:
        return Generation(ctx, **self.gen_options)


def _check_timing(warmup: int, runs: int, name: str) -> None:
    if warmup < 0 or runs < 1:
        raise ValueError(f"{name} needs warmup >= 0 and runs >= 1")


def _timed(gen: Generation, model, batch_size: int, warmup: int, runs: int) -> list[dict]:
    for _ in range(warmup):  # loads the text encoder and VAE, fills caches, picks kernels
        gen.run(model, batch_size)
    return [gen.run(model, batch_size) for _ in range(runs)]


def _summary(times: list[dict]) -> dict:
    """Median and IQR of the whole generation, each part's median seconds and share of the time."""
    totals = [sum(v for v in t.values() if v is not None) for t in times]
    q = statistics.quantiles(totals, n=4) if len(totals) >= 2 else [totals[0]] * 3
    applies = [k for k in PARTS if times[0][k] is not None]
    return {
        "value": statistics.median(totals), "iqr": q[2] - q[0], "min": min(totals), "runs": len(totals),
        "seconds": {k: statistics.median(t[k] for t in times) if k in applies else None for k in PARTS},
        "share": {k: sum(t[k] for t in times) / sum(totals) if k in applies else None for k in PARTS},
    }


class SampleLatency(_SamplingCost):
    """Seconds to generate one batch: text encoding + denoising steps + VAE decode (median, IQR, shares)."""

    name, direction, unit = "sample_latency", "lower", "s"
    role = "cost"
    timing_sensitive = True  # executors run it with no other cell on the machine

    def __init__(self, batch_size: int = 1, warmup: int = 1, runs: int = 5, steps: int = 25, sampler: str = "ddim",
                 cfg_scale: float = 1.0, prompt: str = DEFAULT_PROMPT, pipeline: str | None = None,
                 vae: str | None = None, dtype: str | None = None):
        super().__init__(steps, sampler, cfg_scale, prompt, pipeline, vae, dtype)
        _check_timing(warmup, runs, self.name)
        if batch_size < 1:
            raise ValueError(f"{self.name} needs batch_size >= 1, got {batch_size}")
        self.batch_size, self.warmup, self.runs = batch_size, warmup, runs

    def __call__(self, ctx) -> dict:
        gen = self.generation(ctx)
        load_before = _load_average()
        with gen.session() as model:
            times = _timed(gen, model, self.batch_size, self.warmup, self.runs)
        out = _summary(times)
        out["per_image"] = out["value"] / self.batch_size
        return {**out, "warmup": self.warmup, **gen.describe(self.batch_size),
                "load_average": [load_before, _load_average()]}


class Throughput(_SamplingCost):
    """Images per second of the whole generation at a given batch size, or on CUDA at the
    largest that fits (doubling from 1 until out of memory or max_batch_size)."""

    name, direction, unit = "throughput", "higher", "images/s"
    role = "cost"
    timing_sensitive = True

    def __init__(self, batch_size: int | None = None, max_batch_size: int = 256, warmup: int = 1, runs: int = 3,
                 steps: int = 25, sampler: str = "ddim", cfg_scale: float = 1.0,
                 prompt: str = DEFAULT_PROMPT, pipeline: str | None = None, vae: str | None = None,
                 dtype: str | None = None):
        super().__init__(steps, sampler, cfg_scale, prompt, pipeline, vae, dtype)
        _check_timing(warmup, runs, self.name)
        if (batch_size is not None and batch_size < 1) or max_batch_size < 1:
            raise ValueError(f"{self.name} needs batch_size and max_batch_size >= 1")
        self.batch_size, self.max_batch_size, self.warmup, self.runs = batch_size, max_batch_size, warmup, runs

    def __call__(self, ctx) -> dict:
        gen = self.generation(ctx)
        search, load_before = {}, _load_average()
        with gen.session() as model:
            if self.batch_size is not None:
                batch, how = self.batch_size, "given"
            elif gen.device.type != "cuda":
                # no out-of-memory signal to search by on the CPU (it swaps): one image a batch
                batch, how = 1, "cpu default: no largest-batch search off CUDA; set batch_size"
            else:
                batch, how, search = self._largest(gen, model)
            times = _timed(gen, model, batch, self.warmup, self.runs)
        out = _summary(times)
        return {"value": batch / out["value"], "latency": out["value"], "iqr": out["iqr"], "runs": out["runs"],
                "share": out["share"], "batch_size_from": how, "search": search or None, "warmup": self.warmup,
                **gen.describe(batch), "load_average": [load_before, _load_average()]}

    def _largest(self, gen: Generation, model) -> tuple[int, str, dict]:
        """Double the batch until CUDA runs out of memory; each size's images/s from one run."""
        search, batch, how = {}, 1, f"largest that fits up to max_batch_size {self.max_batch_size}"
        while batch <= self.max_batch_size:
            try:
                search[batch] = batch / sum(v for v in gen.run(model, batch).values() if v is not None)
            except torch.cuda.OutOfMemoryError:
                how = f"largest that fits: {batch} ran out of CUDA memory"
                break
            finally:
                torch.cuda.empty_cache()
            batch *= 2
        if not search:
            raise MetricUnavailable(f"{self.name}: a batch of 1 does not fit in CUDA memory")
        return max(search), how, {str(k): v for k, v in search.items()}


class PeakMemory(_SamplingCost):
    """Peak memory of one whole generation in MiB: CUDA max allocated; on the CPU the growth
    of the process's peak resident set over the run."""

    name, direction, unit = "peak_memory", "lower", "MiB"
    role = "cost"

    def __init__(self, batch_size: int = 1, steps: int = 25, sampler: str = "ddim", cfg_scale: float = 1.0,
                 prompt: str = DEFAULT_PROMPT, pipeline: str | None = None, vae: str | None = None,
                 dtype: str | None = None):
        super().__init__(steps, sampler, cfg_scale, prompt, pipeline, vae, dtype)
        if batch_size < 1:
            raise ValueError(f"{self.name} needs batch_size >= 1, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, ctx) -> dict:
        gen = self.generation(ctx)
        with gen.session() as model:
            gen.run(model, self.batch_size)  # loads encoders and VAE first: their loading is no peak of sampling
            out = self._cuda(gen, model) if gen.device.type == "cuda" else self._cpu(gen, model)
        return {**out, **gen.describe(self.batch_size)}

    def _cuda(self, gen, model) -> dict:
        gen.sync()
        torch.cuda.reset_peak_memory_stats(gen.device)
        before = torch.cuda.memory_allocated(gen.device)
        gen.run(model, self.batch_size)
        peak = torch.cuda.max_memory_allocated(gen.device)
        return {"value": peak / MiB, "bytes": peak, "baseline_bytes": before, "growth_bytes": peak - before,
                "measure": "torch.cuda.max_memory_allocated over one generation (weights held included)"}

    def _cpu(self, gen, model) -> dict:
        status = Path("/proc/self/status")
        _release_free_memory()  # else the warm-up's freed pages are reused and the growth reads ~0
        if status.is_file() and _reset_peak_rss():
            # Linux: writing 5 to clear_refs resets the kernel's peak RSS (VmHWM) to the current RSS
            before = _proc_kib("VmRSS") * 1024
            gen.run(model, self.batch_size)
            peak = _proc_kib("VmHWM") * 1024
            how = ("peak resident set (VmHWM, reset by /proc/self/clear_refs) minus the resident set before, "
                   "after malloc_trim")
        else:  # ru_maxrss is the process's lifetime peak: growth shows only if this run set a new one
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            gen.run(model, self.batch_size)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            if peak <= before:
                raise MetricUnavailable(f"{self.name}: the process's earlier peak resident set hides this run's "
                                        "(no way to reset it on this OS)")
            how = "growth of ru_maxrss, the lifetime peak resident set"
        return {"value": (peak - before) / MiB, "bytes": peak - before, "baseline_bytes": before, "measure": how}


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc's malloc_trim), so that the run's
    resident-set growth counts what it allocates rather than what an earlier run left free."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the growth may read low
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise MetricUnavailable(f"peak_memory: /proc/self/status has no {field}")
