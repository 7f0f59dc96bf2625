"""Weights shipped inside the package: the embedded default's frozen parts.

The real OneDC loads a pretrained VAE and tokenizer; the embedded default (``model=tiny``,
``tokenizer=vq_tiny``) does the same with two small files made offline by
``python -m onedc.assets.make`` (:mod:`onedc.assets.make`) and shipped as package data:

    tiny_vae.safetensors          the AutoencoderKL of configs/model/tiny.yaml
    vq_tiny_teacher.safetensors   the VQModel of configs/tokenizer/vq_tiny.yaml

A config names one as ``pretrained: asset:NAME``; :func:`resolve_pretrained` turns that into the
file's path, and the part is then loaded by the same code as a user's ``pretrained=/path/file``
(a state-dict file of the config's architecture). Loading never trains. Each file carries its
identity in its safetensors metadata (:func:`asset_metadata`: what it is, the architecture, the
recipe and seed it was trained with, the sha256 of its tensors and the onedc version).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onedc.errors import WeightsError

__all__ = ["ASSET_NAMES", "ASSET_PREFIX", "asset_metadata", "asset_path", "resolve_pretrained"]

ASSET_PREFIX = "asset:"
ASSET_NAMES: tuple[str, ...] = ("tiny_vae", "vq_tiny_teacher")
_HERE = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    """The packaged file of asset ``name`` (one of :data:`ASSET_NAMES`); WeightsError if unknown or missing."""
    if name not in ASSET_NAMES:
        raise WeightsError(f"unknown packaged weights {ASSET_PREFIX}{name}; known: "
                           f"{', '.join(ASSET_PREFIX + n for n in ASSET_NAMES)}")
    path = _HERE / f"{name}.safetensors"
    if not path.is_file():
        raise WeightsError(f"packaged weights {ASSET_PREFIX}{name} are missing ({path.name} is not in the "
                           "installed onedc package): reinstall onedc, or remake them with "
                           "`python -m onedc.assets.make`")
    return path


def resolve_pretrained(value: str | None) -> str | None:
    """``asset:NAME`` -> the packaged file's path; any other value (a path, None) unchanged."""
    if value is None:
        return None
    text = str(value)
    return str(asset_path(text[len(ASSET_PREFIX):])) if text.startswith(ASSET_PREFIX) else text


def asset_metadata(path: str | Path) -> dict[str, Any]:
    """The identity recorded in a shipped weights file: its safetensors metadata, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
