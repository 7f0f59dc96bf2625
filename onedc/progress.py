"""Progress bars and result lines for the command-line tools (one home for both).

Bars go to stderr and result lines to stdout through ``tqdm.write``, so a running bar is never
torn by a line and a pipe of stdout carries results only. Base layer (docs/architecture.md).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


def progress(items: list[Any], desc: str, unit: str = "file", enabled: bool | None = None) -> Iterable[Any]:
    """``items`` behind a tqdm bar on stderr; ``enabled=None`` shows it only for more than one item."""
    from tqdm import tqdm

    show = len(items) > 1 if enabled is None else enabled
    return tqdm(items, desc=desc, unit=unit, disable=not show, file=sys.stderr)


def say(message: str) -> None:
    """Print a result line on stdout without breaking a running progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
