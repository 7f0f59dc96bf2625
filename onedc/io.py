"""Atomic file writes: every output onedc creates (checkpoints, configs, markers, .onedc files,
images, exports) goes through a temp file in the same folder and ``os.replace``, so a kill or a
full disk never leaves a partial file where a complete one is expected.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from onedc.errors import OneDCError


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Create ``path`` through a temp file in the same folder + ``os.replace``: never a partial file.

    ``write`` receives the open binary temp file. On any failure (including Ctrl-C) the temp file
    is removed and ``path`` is left as it was; ``OSError`` is raised as a one-line ``OneDCError``.
    """
    path = Path(path)
    # Same folder (os.replace is atomic only within a file system); a unique hidden name; mode
    # 0o666 so the umask applies as for any new file (mkstemp's 0o600 would leak into outputs).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # see TEMP_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise OneDCError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise OneDCError(f"cannot write {path}: {err.strerror or err}") from err
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


#: The name of :func:`atomic_write`'s temp files: ``.<name>.<pid>.<8 hex>.tmp``.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 sends nothing, only checks)."""
    if pid <= 0:
        return True  # not a real writer's pid: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or unknown: keep
    return True


def remove_stale_temp_files(folder: str | Path, min_age_s: float = 60.0) -> list[Path]:
    """Delete the temp files that a killed onedc run left in ``folder``; return what was removed.

    Only files named like :func:`atomic_write`'s temp files (:data:`TEMP_NAME`) are touched, and
    only when the process that wrote them no longer exists *and* they were last modified more than
    ``min_age_s`` seconds ago: a live writer keeps its file's mtime fresh, so the age guard also
    protects a writer on another machine sharing the folder (where the pid means nothing). Not
    recursive; a missing folder or a file that cannot be removed is silently left as it is.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s or _pid_alive(int(match["pid"])):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed
