"""Folder listings for the command line: the files of a tree with given suffixes, and what was left out.

Pure ``pathlib`` (no torch, no Pillow), so ``onedc info`` and ``onedc decompress`` can list a
folder of ``.onedc`` files, and refuse what they must, before any heavy library loads. Image
folders use it through :func:`onedc.coding.images.scan_images` (which knows the image suffixes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from onedc.errors import OneDCError

__all__ = ["Listing", "scan_folder"]


@dataclass
class Listing:
    """What :func:`scan_folder` found under a folder: the files it took, and those it left out, by reason."""

    files: list[Path]
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # reason -> files

    def describe_skipped(self, limit: int = 3) -> str:
        """One line saying what was skipped and why ("" when nothing was), naming a few files of each kind."""
        parts = []
        for reason, paths in self.skipped.items():
            names = ", ".join(p.name for p in paths[:limit]) + (", ..." if len(paths) > limit else "")
            parts.append(f"{len(paths)} {reason} ({names})")
        return "; ".join(parts)


def scan_folder(root: str | Path, suffixes: frozenset[str], kind: str = "a format onedc lists") -> Listing:
    """List the files under ``root`` whose suffix is in ``suffixes``, recursively, sorted by relative path.

    Suffixes compare case-insensitively. Hidden files and folders (names starting with ".") are
    left out, because they are editor or OS debris such as macOS ``._photo.jpg`` resource forks
    (and onedc's own temp files); other files are left out for their suffix. Both are reported in
    :attr:`Listing.skipped` (hidden files under "hidden file(s)", the rest by suffix, saying they
    are not ``kind``), so a caller can say what it did not take. Raises
    :class:`~onedc.errors.OneDCError` naming ``root`` when it is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise OneDCError(f"folder {root} does not exist or is not a folder. Check the path.")
    files: list[Path] = []
    skipped: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if not path.is_file():
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            skipped.setdefault("hidden file(s)", []).append(path)
        elif path.suffix.lower() in suffixes:
            files.append(path)
        else:
            skipped.setdefault(f"{path.suffix.lower() or 'suffix-less'} file(s), not {kind}", []).append(path)
    return Listing(files, skipped)
