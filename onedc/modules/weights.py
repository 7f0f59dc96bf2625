"""Where diffusers weights live: one lookup shared by the VAE and the generator builders."""
from __future__ import annotations

from pathlib import Path

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
