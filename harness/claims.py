"""Claims: a cell runs at most once at a time, however many runs share its results folder.

Before a run starts a cell it creates ``<cell>.claim`` beside the record with
``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+), holding the host, pid
and start time of the claiming process; it removes the file when the cell's record is
written. A second run that finds the file skips the cell ("running elsewhere"). A claim
left by a process that died (SIGKILL, a crashed node) is stale: on the same host a dead
pid proves it and the claim is taken over; a claim from another host is never judged,
since its pid means nothing here (delete the file by hand if that run is gone).
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# A claim file with no JSON yet is one being written, unless it is older than this: its
# writer died between creating and filling it.
EMPTY_GRACE_S = 60.0


def claim_path(record_path: Path) -> Path:
    return record_path.with_suffix(".claim")


@dataclass
class Claim:
    """A claim this process holds; ``release`` removes the file if it is still ours."""

    path: Path
    token: str

    def release(self) -> None:
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(path: Path) -> dict | None:
    """The claim's content; {} for one not (yet) JSON; None when there is no file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_stale(holder: dict, path: Path) -> bool:
    if not holder:
        try:
            return time.time() - path.stat().st_mtime > EMPTY_GRACE_S
        except FileNotFoundError:
            return False
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def describe(holder: dict) -> str:
    if not holder:
        return "claimed by a run that is starting"
    return f"claimed by {holder.get('host')} pid {holder.get('pid')} since {holder.get('started')}"


def _bury(path: Path, holder: dict) -> None:
    """Remove the stale claim ``holder`` at ``path``, and nothing else.

    Renaming is atomic, so of several runs taking over the same stale claim one moves it
    away; if what was moved turns out to be a fresh claim another run made meanwhile, it
    is put back (link fails rather than overwrite a third run's claim)."""
    grave = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    if _read(grave) != holder:
        try:
            os.link(grave, path)
        except FileExistsError:
            pass
    grave.unlink(missing_ok=True)


def claim(record_path: Path) -> Claim | dict:
    """Claim the cell whose record is ``record_path``: a :class:`Claim`, or the content of
    the live claim that holds it (a dict, maybe empty), in which case run nothing."""
    path = claim_path(record_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    holder: dict = {}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # released meanwhile
                continue
            if not is_stale(holder, path):
                return holder
            _bury(path, holder)
            continue
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": token}, fh)
        except BaseException:  # interrupted half-way: leave no empty claim behind
            path.unlink(missing_ok=True)
            raise
        return Claim(path, token)
    return holder or {}
