"""GPU figures for issue 3: selective-scan parity against the reference loop, and bf16 latency of DiT-XL/2 and
LaMamba-Diff-XL at 256x256 (latent 32) at batch 1 and 64.

Writes one JSON (rewritten after every figure, so a timeout keeps what was measured). Each
check is independent: a failure is recorded with its error and the next check runs.
``--device cpu --tiny`` runs the same code at toy sizes, which is how it is tested without a GPU.
The scan's reference is the sequential loop (``selective_scan_ref``) in float64 on the CPU, so
the CPU run, too, checks the fast path (compiled loop or parallel scan) against the definition.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

BUILTIN_PLUGINS = ("harness_measure", "harness_mixers", "harness_dit", "harness_lamamba")


def ensure_plugins() -> None:
    """Use the installed entry points; from a bare checkout, register the built-ins by hand."""
    import harness
    from harness import registry

    if "lamamba" in harness.components("backbone"):
        return
    reg = registry()
    for name in BUILTIN_PLUGINS:
        if reg.pm.get_plugin(name) is None:
            reg.register(importlib.import_module(name), name)


class Report:
    def __init__(self, path: Path, device: torch.device):
        self.path = path
        self.data = {"device": str(device), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "env": _env(device), "scan": {}, "latency": {}, "errors": {}}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        tmp.replace(self.path)

    def run(self, section: str, key: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            value = fn()
            value["wall_s"] = round(time.perf_counter() - t0, 2)
            self.data[section][key] = value
        except Exception as exc:  # one failing figure must not lose the others
            self.data["errors"][f"{section}/{key}"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.save()
        print(f"[{time.perf_counter() - t0:6.1f}s] {section}/{key}: "
              f"{self.data[section].get(key, self.data['errors'].get(f'{section}/{key}'))}", flush=True)


def _env(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import mamba_ssm  # noqa: F401

        env["mamba_ssm"] = getattr(mamba_ssm, "__version__", "present")
    except Exception as exc:  # noqa: BLE001 - any import failure means: our scan is used
        env["mamba_ssm"] = f"unavailable ({type(exc).__name__})"
    return env


def scan_parity(device: torch.device, batch: int, dim: int, state: int, length: int) -> dict:
    """selective_scan on ``device`` (float32) against the sequential loop in float64 on the CPU."""
    from harness_mixers.scan import selective_scan, selective_scan_ref

    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g) * 0.5
    a = -torch.exp(torch.randn(dim, state, generator=g) * 0.5)
    b = torch.randn(batch, state, length, generator=g)
    c = torch.randn(batch, state, length, generator=g)
    d = torch.randn(dim, generator=g)
    z = torch.randn(batch, dim, length, generator=g)
    bias = torch.randn(dim, generator=g) * 0.1
    args = (u, delta, a, b, c, d, z, bias)
    ref = selective_scan_ref(*(x.double() for x in args), delta_softplus=True)
    on = [x.to(device) for x in args]
    out = selective_scan(*on, delta_softplus=True)
    _sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        selective_scan(*on, delta_softplus=True)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    err = (out.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"shape": {"B": batch, "D": dim, "N": state, "L": length},
            "reference": "selective_scan_ref (sequential loop), float64, CPU", "max_abs_err": err,
            "max_rel_err": err / max(scale, 1e-12), "finite": bool(torch.isfinite(out).all()),
            "ms_median": statistics.median(times)}


def latency(device: torch.device, name: str, options: dict, input_size: int, batch: int, dtype: torch.dtype,
            runs: int, warmup: int = 3) -> dict:
    import harness

    torch.manual_seed(0)
    with torch.device(device):
        model = harness.create("backbone", name, input_size=input_size, **options)
    model = model.to(dtype).eval()
    x = torch.randn(batch, 4, input_size, input_size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):  # kernels, allocator, cuDNN choices
            model(x, t, y)
        _sync(device)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x, t, y)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    out = {"backbone": name, "options": options, "input_size": input_size, "batch_size": batch,
           "dtype": str(dtype).replace("torch.", ""), "ms_median": statistics.median(times), "ms_iqr": q[2] - q[0],
           "runs": runs, "warmup": warmup, "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["images_per_s"] = batch / (out["ms_median"] / 1e3)
    del model
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes (tiny models, short scans) to test the script")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420, help="skip the remaining checks past this")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --device cpu --tiny to test the script", file=sys.stderr)
        return 2
    ensure_plugins()
    report = Report(Path(args.out), device)
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    if args.tiny:  # a 16x16 latent (128 px), one warm-up: seconds on a CPU
        latent, warmup = 16, 1
        scans = [(1, 16, 4, 64)]
        models = {"dit-tiny/2": ("dit", {"size": "tiny", "patch": 2}), "lamamba-tiny": ("lamamba", {"size": "tiny"})}
    else:  # 256x256 (latent 32); scans: the CPU benchmark's shape, then a LaMamba-XL-sized scan
        # (4 directions x 2 x 320, L 1024)
        scans = [(2, 384, 16, 1024), (1, 2560, 16, 1024)]
        latent, warmup = 32, 3
        models = {"DiT-XL/2": ("dit", {"size": "XL", "patch": 2}), "LaMamba-Diff-XL": ("lamamba", {"size": "XL"})}

    for batch, dim, state, length in scans:
        key = f"B{batch}-D{dim}-N{state}-L{length}"
        report.run("scan", key, lambda: scan_parity(device, batch, dim, state, length))
    for bs in args.batch_sizes:
        for label, (name, options) in models.items():
            key = f"{label}@{8 * latent}-bs{bs}"
            if time.perf_counter() - start > args.budget_s:
                report.data["errors"][f"latency/{key}"] = f"skipped: past the {args.budget_s:.0f} s budget"
                report.save()
                continue
            report.run("latency", key, lambda: latency(device, name, options, latent, bs, dtype, args.runs, warmup))
    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.data["total_s"] = round(time.perf_counter() - start, 1)
    report.save()
    print(f"wrote {args.out}")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
