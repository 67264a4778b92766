"""Claims: a cell runs at most once at a time, however many runs share its results folder.

Before a run starts a cell it creates ``<cell>.claim`` beside the record with
``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+), holding the host, pid
and start time of the claiming process; it removes the file when the cell's record is
written. A second run that finds the file skips the cell ("running elsewhere"). A claim
left by a process that died (SIGKILL, a crashed node) is stale: on the same host a dead
pid proves it and the claim is taken over; a claim from another host is never judged,
since its pid means nothing here (delete the file by hand if that run is gone).

A claim file no run could have written (junk, a pid that is not one) is taken over once it
is older than :data:`EMPTY_GRACE_S`; a directory, FIFO or device in its place is never opened
for reading nor removed: the cell is skipped with a line naming it. Nothing here raises for a
claim file's content.
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

from .files import FileRefused, read_regular, space_error

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
    """The claim's content; None when there is no file.

    What a run cannot have written is described under ``"problem"`` (with ``"kind"`` "junk"
    for content that is not a claim, "not-a-file" for a directory, FIFO or device, which is
    never waited on nor removed); ``{}`` is a claim being written (no JSON yet)."""
    try:
        raw = read_regular(path, "claim file")
    except FileRefused as exc:
        if exc.reason == "file not found":
            return None
        kind = "unreadable" if exc.reason.startswith("cannot") else "not-a-file"
        return {"problem": exc.reason, "kind": kind, "path": str(path)}
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        return {"problem": f"cannot be parsed ({_short(exc)})", "kind": "junk", "path": str(path)}
    bad = _malformed(data)
    if bad:
        return {"problem": bad, "kind": "junk", "path": str(path)}
    return data


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 80 else text[:80] + "..."


def _malformed(data) -> str | None:
    """Why ``data`` is not a claim this module wrote, or None."""
    if not isinstance(data, dict):
        return f"holds JSON {type(data).__name__}, not a claim"
    pid = data.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2 ** 31:
        return f"has no valid pid ({pid!r})"
    if not isinstance(data.get("host"), str):
        return f"has no valid host ({data.get('host')!r})"
    return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def is_stale(holder: dict, path: Path) -> bool:
    """Whether the claim's owner cannot be alive. An empty or unparsable claim is a writer's
    unfinished first write for at most EMPTY_GRACE_S (a claim is written in one call right
    after it is created); older, its writer died or no run wrote it, and it is taken over.
    A directory, FIFO or device is never stale: it is not ours to remove."""
    if not holder or holder.get("kind") in ("junk", "unreadable"):
        return holder.get("kind") != "unreadable" and _age(path) > EMPTY_GRACE_S
    if holder.get("kind") == "not-a-file":
        return False
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def describe(holder: dict) -> str:
    if not holder:
        return "claimed by a run that is starting"
    if "problem" in holder:
        what = ("remove it to run the cell" if holder.get("kind") != "junk"
                else f"taken over once {EMPTY_GRACE_S:g} s old, or remove it")
        return f"claim file {holder.get('path')} {holder['problem']}; {what}"
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
    moved = _read(grave)
    if moved is not None and "problem" in moved:  # judged by content: where it lies does not matter
        moved = {**moved, "path": holder.get("path")}
    if moved != holder:
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
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": token})
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        except BaseException as exc:  # interrupted half-way, or a full disk: leave no empty claim behind
            path.unlink(missing_ok=True)
            full = space_error(exc, path.parent, len(text), f"the claim {path.name}") \
                if isinstance(exc, OSError) else None
            if full is not None:
                raise full from None
            raise
        return Claim(path, token)
    return holder or {}
