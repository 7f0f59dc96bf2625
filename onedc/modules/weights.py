"""Where local weights live: diffusers model dirs (VAE, generator, critic) and backbone files (LPIPS, eval)."""
from __future__ import annotations

from pathlib import Path

import torch

from onedc.errors import WeightsError


def diffusers_model_dir(pretrained: str, subfolder: str, expected: str, option: str) -> Path:
    """The diffusers model directory at ``pretrained``, or its ``subfolder`` in a full SD dir.

    Raises :class:`WeightsError` naming the path, the ``expected`` layout and the config
    ``option`` to set when neither holds a ``config.json``.
    """
    path = Path(pretrained).expanduser()
    if (path / subfolder / "config.json").is_file():  # a full SD pipeline directory
        path = path / subfolder
    if not (path / "config.json").is_file():
        raise WeightsError(
            f"weights not found at {path}: expected {expected} (config.json + diffusion_pytorch_model.safetensors) "
            f"or an SD model dir with {subfolder}/. Set {option}=DIR, or {option}=null for random weights."
        )
    return path


def weight_file_candidates(name: str, location: str | Path | None = None) -> list[Path]:
    """Where a backbone weights file ``name`` (a torchvision/torch hub ``.pth``) is looked for.

    ``location=None``: torch hub's cache, ``$TORCH_HOME/hub/checkpoints/name``, where torchvision
    would have downloaded it. A ``.pth``/``.pt`` path: that file. A directory: ``DIR/name``,
    ``DIR/checkpoints/name`` and ``DIR/hub/checkpoints/name`` (a torch hub or TORCH_HOME dir).
    The first candidate is where a user should put a missing file.
    """
    if location is None:
        return [Path(torch.hub.get_dir()) / "checkpoints" / name]
    path = Path(location).expanduser()
    if path.suffix in (".pth", ".pt"):
        return [path]
    return [path / name, path / "checkpoints" / name, path / "hub" / "checkpoints" / name]


def find_weight_file(name: str, location: str | Path | None = None) -> Path | None:
    """The first existing file of :func:`weight_file_candidates`, or None."""
    return next((c for c in weight_file_candidates(name, location) if c.is_file()), None)
