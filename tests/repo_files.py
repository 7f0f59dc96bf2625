"""The repo's own files, for the tests that check the repo itself (paths, doc citations)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Never text, or not ours: skipped without reading.
_BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".pdf", ".pt", ".pth", ".ckpt", ".bin",
                    ".safetensors", ".npz", ".npy", ".onedc", ".gz", ".zip", ".tar", ".whl"}
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "runs", "build", "dist", ".eggs"}


def repo_files(root: Path = ROOT) -> list[Path]:
    """The repo's tracked files (``git ls-files``), or every file under ``root`` outside build and
    cache folders when ``root`` is not a git checkout (a source archive) or git is missing."""
    if (root / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return [root / name for name in out.decode().split("\0") if name]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(dirpath) / name for name in filenames]
    return files


def read_text(path: Path) -> str | None:
    """The file's text, or None for binary, unreadable or non-UTF-8 files."""
    if path.suffix.lower() in _BINARY_SUFFIXES or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
