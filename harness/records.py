"""Result records: one JSON file per cell, written atomically, read back for tables."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError

REQUIRED = ("suite", "cell", "config", "status", "error", "metrics", "env", "plugins")


def write_record(path: Path, record: dict) -> None:
    """Write via a temporary file in the same folder and an atomic rename: a reader (or a
    killed run) sees the old record or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=False, default=_jsonable)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def read_record(path: Path) -> dict | None:
    """The record at ``path``, or None if it is missing or not a record."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        return None
    return data


def load_records(root: str | Path) -> list[dict]:
    """Every record under ``root`` (a suite folder or the results root)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: results directory not found")
    files: Iterable[Path] = [root] if root.is_file() else sorted(root.rglob("*.json"))
    out = []
    for f in files:
        rec = read_record(f)
        if rec is not None:
            rec["_path"] = str(f)
            out.append(rec)
    # suite by suite, each in the order of its cells (records predating `index` go last)
    # suite order, replicates (`--seed`) of a cell side by side in seed order
    return sorted(out, key=lambda r: (r["suite"], r.get("index", float("inf")), r.get("seed", 0), r["cell"]))


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{folder}: results directory is not writable ({exc.strerror or exc})") from None


@lru_cache(maxsize=1)
def _git_commit() -> dict:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def environment(device: str | None = None) -> dict:
    """Versions, hardware and threads: what a reader needs to compare figures."""
    import numpy
    import torch

    from . import __version__

    env = {
        "harness": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": device,
        "git": _git_commit(),
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    used = libraries()
    owners = _owners()
    for mod in _NAMED:  # the usual suspects also at the top level, as records always had them
        if mod in sys.modules:
            dist = next(iter(owners.get(mod, ())), None)
            env[mod] = used.get(dist) if dist else getattr(sys.modules[mod], "__version__", None)
    env["libraries"] = used
    return env


# Libraries whose versions move figures most (FLOP handles, pipelines, Inception weights,
# kernels), kept as top-level keys of ``env`` when a cell imported them.
_NAMED = ("diffusers", "fvcore", "transformers", "torch_fidelity", "safetensors", "scipy", "open_clip",
          "mamba_ssm", "timm")


@lru_cache(maxsize=1)
def _owners() -> dict[str, list[str]]:
    """Top-level module -> distributions (a third of a second to build: once per process)."""
    try:
        return metadata.packages_distributions()
    except Exception:  # one broken install must not cost every record its env
        return {}


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """Distribution -> version; the first on sys.path wins, as for an import."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(name, dist.version)
    return out


def libraries() -> dict[str, str]:
    """Distribution -> version of every installed library with a module imported in this
    process. Called after a cell, so it lists what the cell used, imported lazily or not."""
    owners, versions = _owners(), _versions()
    dists = {d for name in list(sys.modules) if "." not in name for d in owners.get(name, ())}
    return {d: versions[d] for d in sorted(dists, key=str.lower) if d in versions}
