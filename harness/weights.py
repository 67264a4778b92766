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
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch

from .errors import UserError, suggest

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


def download(url: str, *, what: str = "weights") -> Path:
    """``url`` in torch.hub's checkpoint folder, downloaded there first if missing."""
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise UserError(f"{what} URL {url!r} does not end in a file name")
    dest = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temporary file and renames it: an interrupted download leaves nothing
            torch.hub.download_url_to_file(url, str(dest), progress=False)
        except Exception as exc:  # URLError, HTTPError, timeouts: all the user's to fix
            raise UserError(f"{what}: cannot download {url} ({type(exc).__name__}: {exc})") from None
    return dest


def read_tensors(path: str | Path, *, what: str = "weights"):
    """The object stored in ``path``, read without running any code it might carry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{what} {str(path)!r} is not a readable .safetensors file ({exc})") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # An old pickle protocol is refused below anyway; its warning would be a second line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
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
    """``load_state_dict`` into ``model`` strictly; a mismatch is one line naming the first keys."""
    load_state_into(model, load_state_dict(source, key=key, what=what, key_option=key_option), source, what=what)


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
