"""The reference key lists (tests/data/reference/*.txt, copied from REFERENCE.md's data files) for the tests."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "reference"


def read_key_list(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of one reference key list, e.g. ``feedforward.txt`` (1252 keys)."""
    out = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out
