"""Atomic file writes: every output onedc creates (checkpoints, configs, markers, .onedc files,
images, exports) goes through a temp file in the same folder and ``os.replace``, so a kill or a
full disk never leaves a partial file where a complete one is expected.
"""
from __future__ import annotations

import os
import secrets
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
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
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
