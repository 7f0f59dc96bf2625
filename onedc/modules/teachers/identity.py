"""Teacher identities: a content hash of the weights, or architecture + seed for random ones.

A stage records the identity so it can refuse to resume a predictor head trained against
another teacher. Hashing content, not location, keeps the identity when weights move.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Files whose content defines a saved model directory; hashed into the teacher identity.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _sha256_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _weights_identity(cls: type, path: Path, input_scale: float) -> str:
    """Identity from weights content, not location: moving the weights keeps the identity."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    else:
        files = [path]
    return f"{cls.__name__}:sha256={_sha256_files(files)}:scale={input_scale:g}"


def _random_identity(cls: type, spec: dict[str, Any], seed: int, input_scale: float) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return (f"{cls.__name__}:random:cfg={hashlib.sha256(blob).hexdigest()[:12]}:seed={seed}"
            f":scale={input_scale:g}")
