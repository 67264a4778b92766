"""The one way a component reads tensors a user names: a file or an http(s) URL.

Nothing loaded here may run code. ``.safetensors`` files hold tensors only; any other file is
read with ``torch.load(weights_only=True)``, whose unpickler rebuilds tensors and plain
containers and refuses every other global, so a crafted ``.pth`` whose ``__reduce__`` calls
``os.system`` is a :class:`~harness.errors.UserError` instead of a shell. The one class
allowed besides is ``argparse.Namespace``: facebookresearch/DiT's ``train.py`` saves
``{"model", "ema", "opt", "args"}`` with its parsed arguments in ``args``. Training scripts
of the VMamba family (LaMamba-Diff's ``train.py`` among them) also save their yacs config
under ``config``; a ``yacs.config.CfgNode`` is read as a plain ``OrderedDict`` of its entries
(see :class:`_ConfigAsDict`), so neither yacs nor anything else is imported or run to read it.

URLs are downloaded once into torch.hub's checkpoint folder (where
``torch.hub.load_state_dict_from_url`` would put them, so an earlier download is reused) and
then read from there the same safe way; ``load_state_dict_from_url`` itself is never used.
A download never waits forever: connecting, each read and the size are bounded (see
:func:`fetch`; ``HARNESS_CONNECT_TIMEOUT``, ``HARNESS_READ_TIMEOUT``,
``HARNESS_DOWNLOAD_MAX_BYTES``), and a path that is not a regular file is refused unopened.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import shutil
import socket
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch

from .errors import UserError, suggest
from .files import atomic_path, open_regular, space_error

# The entry of a training checkpoint taken when none is named: DiT's train.py keeps the EMA
# weights it samples with under "ema", the raw ones under "model".
DEFAULT_KEY = "ema"


class _ConfigAsDict:
    """Stands for ``yacs.config.CfgNode`` when reading: a pickled CfgNode (a dict subclass) is
    rebuilt as ``cls.__new__(cls)``, then its entries set; this gives a plain OrderedDict
    instead, the one dict type torch's safe unpickler both fills and lets take attributes."""

    def __new__(cls, *args):
        return OrderedDict()


# Allowed when reading: the globals a training checkpoint may hold besides tensors, each as
# the class itself or (what stands for it, the name the pickle uses).
_SAFE_GLOBALS = [argparse.Namespace, (_ConfigAsDict, "yacs.config.CfgNode")]


def is_url(source: str) -> bool:
    return str(source).startswith(("http://", "https://"))


# Network limits, each overridable by an environment variable (seconds; bytes).
CONNECT_TIMEOUT_S = 10.0   # HARNESS_CONNECT_TIMEOUT: to open the connection
READ_TIMEOUT_S = 60.0      # HARNESS_READ_TIMEOUT: the longest wait for the next bytes
MAX_DOWNLOAD_BYTES = 64 << 30  # HARNESS_DOWNLOAD_MAX_BYTES: the largest download, announced or not


def _env_number(name: str, default: float, kind: type = float):
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value != value:
        raise UserError(f"{name}={text!r}: expected a positive {'number' if kind is float else 'integer'}")
    return value


def net_timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds, from the environment or the defaults."""
    return (_env_number("HARNESS_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S),
            _env_number("HARNESS_READ_TIMEOUT", READ_TIMEOUT_S))


@contextmanager
def network_timeout():
    """For libraries that read the network without a timeout of their own (torch.hub's
    ``urlopen``): sockets created meanwhile wait at most the read timeout for any step."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(max(net_timeouts()))
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download(url: str, *, what: str = "weights") -> Path:
    """``url`` in torch.hub's checkpoint folder, downloaded there first if missing."""
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise UserError(f"{what} URL {url!r} does not end in a file name")
    dest = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not dest.is_file():
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{what}: cannot create {dest.parent} for {url} ({exc.strerror or exc})") from None
        fetch(url, dest, what=what)
    return dest


def fetch(url: str, dest: Path, *, what: str = "weights") -> None:
    """Download ``url`` to ``dest`` atomically (an interrupted download leaves nothing).

    Every step is bounded: connecting by the connect timeout, each wait for bytes by the read
    timeout, the size by the server's Content-Length (no more, no fewer bytes accepted) or,
    when it gives none, by HARNESS_DOWNLOAD_MAX_BYTES. A failure is one UserError line with
    the URL, the limit that tripped and what to do."""
    import requests

    connect, read = net_timeouts()
    limit = _env_number("HARNESS_DOWNLOAD_MAX_BYTES", MAX_DOWNLOAD_BYTES, int)
    offline = "or download it yourself and give its path instead of the URL"
    try:
        # identity: the byte counts below are the file's, not a compressed stream's
        with requests.get(url, stream=True, timeout=(connect, read),
                          headers={"Accept-Encoding": "identity", "User-Agent": "diffusion-harness"}) as resp:
            resp.raise_for_status()
            size = _content_length(resp.headers.get("Content-Length"))
            if size is not None and size > limit:
                raise UserError(f"{what}: {url} is {size} bytes, over HARNESS_DOWNLOAD_MAX_BYTES={limit}; "
                                f"raise that limit if the file is right")
            _check_free(dest.parent, size, what=f"the download of {url}")
            cap = limit if size is None else size
            with atomic_path(dest, what=f"the download of {url}", needed=size) as tmp, open(tmp, "wb") as fh:
                got = 0
                for block in resp.iter_content(1 << 20):
                    got += len(block)
                    if got > cap:
                        raise UserError(f"{what}: {url} sent more than "
                                        + (f"the {size} bytes it announced" if size is not None else
                                           f"HARNESS_DOWNLOAD_MAX_BYTES={limit} bytes") + "; nothing was kept")
                    fh.write(block)
                if size is not None and got != size:
                    raise UserError(f"{what}: {url} ended after {got} of the {size} bytes it announced; "
                                    f"nothing was kept; try again {offline}")
    except requests.Timeout as exc:
        which, limit_s = (("connect", connect) if isinstance(exc, requests.ConnectTimeout) else ("read", read))
        raise UserError(_timed_out(what, url, which, limit_s, offline)) from None
    except requests.RequestException as exc:
        if "timed out" in str(exc).lower():  # a read timeout mid-body arrives as a ConnectionError
            raise UserError(_timed_out(what, url, "read", read, offline)) from None
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 160 else reason[:160] + "..."
        raise UserError(f"{what}: cannot download {url} ({type(exc).__name__}: {reason}); {offline}") from None


def _timed_out(what: str, url: str, which: str, seconds: float, offline: str) -> str:
    var = "HARNESS_CONNECT_TIMEOUT" if which == "connect" else "HARNESS_READ_TIMEOUT"
    return (f"{what}: {url} did not answer within the {which} timeout of {seconds:g} s; check the URL and "
            f"the network, raise {var}, {offline}")


def _content_length(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None and int(text) >= 0 else None
    except ValueError:
        return None


def _check_free(folder: Path, size: Optional[int], what: str) -> None:
    """Refuse before the first byte when the announced size does not fit."""
    if size is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write itself will say
    if free < size:
        raise space_error(OSError(errno.ENOSPC, "no space"), folder, size, what)


def read_tensors(path: str | Path, *, what: str = "weights"):
    """The object stored in ``path``, read without running any code it might carry.

    ``path`` must be a regular file: a FIFO would block the read forever, a device never end."""
    path = Path(path)
    if not os.path.exists(path):
        raise UserError(f"{what} {str(path)!r} is not a file: nothing is there")
    with open_regular(path, what) as fh:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{what} {str(path)!r} is not a readable .safetensors file ({exc})") from None
        return _torch_load(fh, path, what)


def _torch_load(fh, path: Path, what: str):
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # An old pickle protocol is refused below anyway; its warning would be a second line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:
            raise UserError(f"{what} {str(path)!r} is refused: it holds a pickled {found.group(1)}, which "
                            f"loading would run; expected tensors only (torch.save of a state dict, or "
                            f".safetensors)") from None
        raise UserError(f"{what} {str(path)!r} is not a weights file: torch.load(weights_only=True) cannot read "
                        f"it; expected a state dict saved with torch.save, or .safetensors") from None
    except Exception as exc:  # junk fails in many ways (EOFError, struct.error, BadZipFile...): all mean the same
        raise UserError(f"{what} {str(path)!r} is not a weights file ({type(exc).__name__}); expected a "
                        f"state dict saved with torch.save, or .safetensors") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def load_state_dict(source: str | Path, *, key: Optional[str] = None, what: str = "weights",
                    key_option: Optional[str] = None) -> dict:
    """The state dict in a local file or at an http(s) URL.

    A plain state dict (names to tensors) is returned as it is. Where the caller has an option
    ``key_option`` that sets ``key``, a training checkpoint, a dict of such dicts, gives its
    ``key`` entry: ``"ema"`` unless ``key`` says otherwise (DiT's ``train.py`` also stores
    ``"model"``). Anything else is a UserError naming ``what``.
    """
    path = download(str(source), what=what) if is_url(str(source)) else Path(source)
    obj = read_tensors(path, what=what)
    if not isinstance(obj, Mapping):
        raise UserError(f"{what} {str(source)!r} holds a {type(obj).__name__}, not a state dict")
    if _is_state_dict(obj):
        if key is not None:
            raise UserError(f"{what} {str(source)!r} is a plain state dict, not a checkpoint with a {key!r} entry; "
                            f"leave {key_option} unset")
        return dict(obj)
    if key_option is None:
        raise UserError(f"{what} {str(source)!r} is not a state dict of tensors (its entries: "
                        f"{', '.join(map(str, list(obj)[:8])) or 'none'})")
    want = key or DEFAULT_KEY
    if want not in obj:
        raise UserError(f"{what} {str(source)!r} has no {want!r} entry{suggest(want, map(str, obj))} "
                        f"(choose one with {key_option})")
    state = obj[want]
    if not _is_state_dict(state):
        raise UserError(f"{what} {str(source)!r}: entry {want!r} is a {type(state).__name__}, not a state dict "
                        f"of tensors")
    return dict(state)


def load_into(model: torch.nn.Module, source: str | Path, *, key: Optional[str] = None,
              what: str = "pretrained", key_option: str = "checkpoint_key") -> None:
    """``load_state_dict`` into ``model`` strictly; a mismatch is one line naming the first keys.

    Inside :func:`structure_only` (``harness validate --costs``), a model built on the meta
    device is left as it is: nothing is read or downloaded, only a local file's presence is
    checked. Everywhere else the checkpoint is read and checked against the model, on meta
    too, so that a cell's parameter count is never of a model its checkpoint does not fit."""
    if structure_only() and _abstract(model):
        if not is_url(str(source)) and not os.path.isfile(source):
            raise UserError(f"{what} {str(source)!r} is not a file: nothing is there")
        return
    load_state_into(model, load_state_dict(source, key=key, what=what, key_option=key_option), source, what=what)


_STRUCTURE_ONLY = [False]


def structure_only() -> bool:
    """True while the harness builds models only to count them before anything runs (``harness
    validate --costs``): a factory may then build a ``pretrained`` model from its config alone,
    reading and downloading no weights (the ``unet`` backbone reads only ``config.json``)."""
    return _STRUCTURE_ONLY[0]


@contextmanager
def counting_structure():
    """Within: :func:`structure_only` is True (used by ``harness validate --costs``)."""
    before, _STRUCTURE_ONLY[0] = _STRUCTURE_ONLY[0], True
    try:
        yield
    finally:
        _STRUCTURE_ONLY[0] = before


def _abstract(model: torch.nn.Module) -> bool:
    params = list(model.parameters())
    return bool(params) and all(p.is_meta for p in params)


def load_state_into(model: torch.nn.Module, state: dict, source: str | Path, *, what: str = "pretrained") -> None:
    """``state`` (read from ``source``) into ``model`` strictly; a mismatch is one line naming the
    first keys. For components that translate another code base's names first."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(names):
            return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

        parts = [f"{len(missing)} missing ({few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
                 f"{len(shapes)} of another shape ({few(shapes)})" if shapes else ""]
        raise UserError(f"{what} {str(source)!r} does not fit {type(model).__name__}: "
                        + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


# -- caches ---------------------------------------------------------------------------------
# A cache entry is ours to recompute, so it is never trusted blindly: safetensors checks its
# header but not its data, so each file carries the SHA-256 of its tensors' bytes and one
# whose content no longer matches (a flipped bit, a torn copy) is treated as missing.
_DIGEST_KEY = "harness_sha256"


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_cache(path: str | Path, tensors: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``tensors`` as ``.safetensors`` at ``path``, atomically and with their digest; a full
    disk is one line naming the folder and the size (:func:`harness.files.space_error`)."""
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, what=what, needed=needed) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={_DIGEST_KEY: _digest(tensors)})
        except SafetensorError as exc:  # its writer is Rust: an I/O error arrives as text ("... (os error 28)")
            code = re.search(r"(?:os error|code:) (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), str(exc)) from None
        _check_written(tmp, needed)


def _check_written(path: Path, data_bytes: int) -> None:
    """A ``.safetensors`` file is 8 bytes of header length, the header, then the data: a file
    shorter than that lost a write its writer did not report (a buffer flushed on a full disk)."""
    with open(path, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
    size = os.stat(path).st_size
    if size < 8 + header + data_bytes:
        short = 8 + header + data_bytes - size
        free = shutil.disk_usage(path.parent).free
        raise OSError(errno.ENOSPC if free < short else errno.EIO,
                      f"{path.name}: {size} of {8 + header + data_bytes} bytes written")


def load_cache(path: str | Path, *, device: str = "cpu") -> Optional[dict]:
    """The tensors :func:`save_cache` wrote at ``path``; None when there is no entry or it is
    unreadable, truncated, or its content does not match its digest (a warning names it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        with open_regular(path, "cache entry"):
            pass
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = (f.metadata() or {}).get(_DIGEST_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, UserError, ValueError) as exc:
        _cache_warning(path, f"unreadable ({type(exc).__name__})")
        return None
    if stored != _digest(tensors):
        _cache_warning(path, "does not match its digest" if stored else "carries no digest")
        return None
    return {k: v.to(device) for k, v in tensors.items()} if device != "cpu" else tensors


def _cache_warning(path: Path, problem: str) -> None:
    import sys

    print(f"harness: warning: {path}: cache entry {problem}; not used", file=sys.stderr, flush=True)
