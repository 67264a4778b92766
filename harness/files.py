"""Reading and writing files that users, plugins and shared folders hand us, without hanging or
leaving half a file behind.

- :func:`open_regular` opens a path only when it is a regular file. Opening a FIFO for reading
  blocks until a writer appears, and a device (``/dev/zero``) never ends, so the kind of file is
  checked on the open descriptor (opened non-blocking), not on the name beforehand.
- :func:`atomic_write` / :func:`atomic_path` write through a temporary file in the target's
  folder and an atomic rename: a reader, or a rerun after a crash, sees the old file or the new
  one, never part of one. A full disk (``ENOSPC``) or quota (``EDQUOT``) on the way is one
  :class:`~harness.errors.UserError` naming the folder and the space the write needed
  (:func:`space_error`), and the temporary file is removed.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from .errors import UserError

# Errors that mean "no room": a full file system, or the user's quota on it.
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class FileRefused(UserError):
    """A path that cannot be read as a regular file; ``reason`` is the message without the path."""

    def __init__(self, what: str, path: str | Path, reason: str):
        super().__init__(f"{what} {str(path)!r}{reason}")
        self.path, self.reason = str(path), reason.lstrip(" :")


def kind_of(mode: int) -> str:
    """What a file is, in words, for messages ("a FIFO", "a directory"...)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path, what: str) -> os.stat_result:
    """``path``'s stat when it is a regular file (symlinks followed); else a UserError naming
    ``what``, the path and what it is. For code that must hand a path to a library."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileRefused(what, path, ": file not found") from None
    except OSError as exc:
        raise FileRefused(what, path, f": cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(what, path, f" is {kind_of(st.st_mode)}; expected a regular file")
    return st


def open_regular(path: str | Path, what: str) -> BinaryIO:
    """``path`` opened for binary reading, refused (UserError) unless it is a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
    descriptor's own stat then decides, so nothing can swap the file between check and open."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise FileRefused(what, path, ": file not found") from None
    except IsADirectoryError:
        raise FileRefused(what, path, " is a directory; expected a regular file") from None
    except OSError as exc:
        raise FileRefused(what, path, f": cannot read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(what, path, f" is {kind_of(mode)}; expected a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, what: str) -> bytes:
    with open_regular(path, what) as fh:
        return fh.read()


def _size(n: Optional[int]) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # not reached


def space_error(exc: OSError, folder: str | Path, needed: Optional[int], what: str) -> UserError | None:
    """The one-line UserError for ``exc`` when it means the disk or quota is full, else None."""
    if exc.errno not in NO_SPACE:
        return None
    reason = "quota exceeded" if exc.errno != errno.ENOSPC else "no space left on device"
    return UserError(f"{folder}: {reason} while writing {what}; it needs {_size(needed)} free there. "
                     f"Free some space and run the command again: what was finished is kept")


def _temporary(path: Path) -> Path:
    # Hidden, and unique per process and call: two writers of one file never share a temporary.
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextmanager
def atomic_path(path: str | Path, *, what: str, needed: Optional[int] = None,
                mode: int = 0o666) -> Iterator[Path]:
    """A temporary path for a library that writes by name (``save_file``, ``Image.save``):
    renamed onto ``path`` when the block ends, removed if it raises. ENOSPC/EDQUOT on the way
    is the one-line :func:`space_error`; ``needed`` is the size being written, when known."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise space_error(exc, path.parent, needed, what) or exc
    tmp = _temporary(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # durable before the rename makes it visible
            os.fsync(fh.fileno())
        if mode != 0o666:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = space_error(exc, path.parent, needed if needed is not None else _written(tmp), what)
        if full is not None:
            raise full from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _written(tmp: Path) -> Optional[int]:
    try:
        return tmp.stat().st_size or None
    except OSError:
        return None


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], None], *, what: str,
                 needed: Optional[int] = None) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    The file gets the permissions of any new file (0666 less the umask): mkstemp's 0600 would
    hide it from the other users of a shared folder."""
    path = Path(path)
    if isinstance(data, (bytes, bytearray, memoryview)):
        needed = len(data) if needed is None else needed
    with atomic_path(path, what=what, needed=needed) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
