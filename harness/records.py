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
from .files import FileRefused, atomic_write, read_regular

REQUIRED = ("suite", "cell", "config", "status", "error", "metrics", "env", "plugins")


def write_record(path: Path, record: dict) -> None:
    """Write via a temporary file in the same folder and an atomic rename: a reader (or a
    killed run) sees the old record or the new one, never half of one. A full disk is one
    line naming the folder and the record's size (:func:`harness.files.space_error`).

    The file gets the permissions of any new file (0666 less the umask): mkstemp's 0600
    would hide the records of a shared results folder from everyone else on it."""
    text = json.dumps(record, indent=2, sort_keys=False, default=_jsonable) + "\n"
    atomic_write(path, text.encode(), what=f"the record {Path(path).name}")


def _jsonable(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def check_record(data: Any) -> str | None:
    """What makes ``data`` unusable as a record, or None if every reader can use it.

    One check for every reader (tables, leaderboard, plots, resuming), so a record one of
    them accepts never crashes another."""
    if not isinstance(data, dict):
        return f"not a record: {_kind(data)}, expected a mapping"
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        return f"not a record: missing key(s) {', '.join(map(repr, missing))}"
    for key, types, expected in (("suite", str, "a string"), ("cell", str, "a string"),
                                 ("config", dict, "a mapping"), ("metrics", dict, "a mapping"),
                                 ("env", dict, "a mapping"), ("plugins", dict, "a mapping"),
                                 ("error", (str, type(None)), "a string or null")):
        if not isinstance(data[key], types):
            return f"'{key}' is {_kind(data[key])}, expected {expected}"
    if data["status"] not in ("ok", "failed"):
        return f"'status' is {data['status']!r}, expected 'ok' or 'failed'"
    for key in ("index", "seed"):  # sort keys of load_records
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            return f"'{key}' is {_kind(data[key])}, expected an integer"
    for name, entry in data["metrics"].items():
        if isinstance(entry, dict):
            if "value" not in entry:
                return f"metric '{name}' has no 'value'"
            entry = entry["value"]
        if isinstance(entry, (dict, list)):
            return f"metric '{name}' is {_kind(entry)}, expected a number, a string or null"
    return None


_MISSING = object()


def _parse(path: Path) -> tuple[Any, str | None]:
    """The JSON in ``path``, or why there is none (``_MISSING`` when there is no file)."""
    if not os.path.lexists(path):
        return _MISSING, None
    try:  # a FIFO or device dropped in a shared results folder is refused, not waited on
        text = read_regular(path, "record")
    except FileRefused as exc:
        return _MISSING, exc.reason
    except OSError as exc:
        return _MISSING, f"cannot read ({exc.strerror or exc})"
    try:
        return json.loads(text), None
    except ValueError as exc:  # UnicodeDecodeError included
        return _MISSING, f"not valid JSON ({exc})"


def inspect_record(path: Path) -> tuple[dict | None, str | None]:
    """``(record, None)``; ``(None, problem)`` for a file that is there but not a usable
    record (unreadable, truncated, malformed); ``(None, None)`` when there is no file."""
    data, problem = _parse(path)
    if data is _MISSING:
        return None, problem
    problem = check_record(data)
    return (None, problem) if problem else (data, None)


def read_record(path: Path) -> dict | None:
    """The record at ``path``, or None if it is missing or not a usable record."""
    return inspect_record(path)[0]


def warn(path: str | Path, problem: str, consequence: str = "skipped") -> None:
    """One line on stderr, the path and problem verbatim (never through rich markup)."""
    print(f"harness: warning: {path}: {problem}; {consequence}", file=sys.stderr, flush=True)


def _candidates(root: Path) -> list[Path]:
    files = []

    def unlistable(exc: OSError) -> None:
        warn(exc.filename, f"cannot list ({exc.strerror or exc})")

    for folder, dirs, names in os.walk(root, onerror=unlistable):
        dirs.sort()
        files.extend(Path(folder) / n for n in names if n.endswith(".json") and not n.startswith("."))
    return sorted(files)


def load_records(root: str | Path) -> list[dict]:
    """Every usable record under ``root`` (a suite folder, the results root, or one file).

    A file that cannot be read or is not a usable record is skipped with a warning naming
    it, so one bad file never hides the others; ``harness run`` redoes its cell. JSON that
    does not try to be a record (a pruning plan in a cell's folder) is passed over quietly."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: results directory not found")
    files: Iterable[Path] = [root] if root.is_file() else _candidates(root)
    out = []
    for f in files:
        data, problem = _parse(f)
        if data is not _MISSING:
            if isinstance(data, dict) and not {"suite", "cell", "status"} & set(data):
                continue  # JSON that does not try to be a record: a pruning plan, say
            problem = check_record(data)
        if problem is not None:
            warn(f, problem)
        elif data is not _MISSING:
            data["_path"] = str(f)
            out.append(data)
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
