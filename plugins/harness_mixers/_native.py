"""Build and load the compiled CPU selective scan (csrc/selective_scan.cpp) through ctypes.

Why not torch.utils.cpp_extension: the kernel needs no torch header, so plain g++ builds it in
about a second instead of most of a minute, with no ninja. The shared library is cached under
``$HARNESS_CACHE`` (default ``~/.cache/harness``) by a hash of the source, the flags and the
machine, and is written atomically, so concurrent test workers never load a half-written file.
Any failure (no compiler, a sandbox without a writable cache) returns None and the scan falls
back to its PyTorch path; ``HARNESS_NATIVE_SCAN=0`` forces that fallback.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "selective_scan.cpp"
# -ffast-math lets gcc vectorise exp over the state dimension (glibc's libmvec declares its
# vector exp only under __FAST_MATH__); the kernel relies on no NaN/inf semantics, and its
# results match the loop to ~1e-6 relative.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c++17"]


def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness")) / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(cxx: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *FLAGS, platform.machine(), platform.node()]).encode()).hexdigest()
    target = cache_dir() / f"selective_scan-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)  # atomic: another process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled scan library, or None where it cannot be built (the caller falls back)."""
    if os.environ.get("HARNESS_NATIVE_SCAN", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        log.info("no C++ compiler: the selective scan uses its PyTorch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("compiling the CPU selective scan failed, using the PyTorch path: %s", str(detail)[-500:])
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    common = [ptr] * 8 + [i64] * 5 + [i32]
    for suffix in ("f32", "f64"):
        getattr(lib, f"scan_fwd_{suffix}").argtypes = common + [ptr, ptr, i64, i64]
        getattr(lib, f"scan_bwd_{suffix}").argtypes = common + [ptr] * 9 + [i64, i64, i64]
    return lib
