"""Fixed 2-D sine-cosine position codes: the one home of both flavours onedc uses.

Both lay out ``(H·W, dim)`` row-major as ``[sin(y·f), cos(y·f), sin(x·f), cos(x·f)]`` with
``dim / 4`` frequencies ``f``; they differ in what a position is:

- ``"unit"`` (the codec's semantic tokens): the centre of each cell on a unit grid,
  ``(i + 0.5) / n``, with octave frequencies ``2^k·π``. The code describes *where in the
  image* a token sits, whatever the grid size, which is what the decoder's cross-attention
  needs on images of any size.
- ``"index"`` (the distillation head, MAE / ViT style): the integer cell index with
  frequencies ``10000^(-k / (dim/4))``. Neighbouring tokens stay equally far apart at every
  grid size, which suits a head that runs on crops and on whole images alike.

The two are kept exactly as they were trained (the codec's is part of the decoder, so of every
file's model identity).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from onedc.errors import ConfigError

PositionScale = Literal["unit", "index"]


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None, *,
              scale: PositionScale = "unit", dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2-D sin-cos position code of shape (height·width, dim), row-major (see the module docstring).

    ``dim`` must be a multiple of 4 (ConfigError otherwise: it comes from model.codec.token_dim or the head width).
    """
    if dim % 4:
        raise ConfigError(f"2D sin-cos positions need a width that is a multiple of 4, got {dim}")
    quarter = dim // 4
    if scale == "unit":
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        freqs = 2.0 ** torch.arange(quarter, device=device, dtype=torch.float32) * math.pi
    elif scale == "index":
        ys = torch.arange(height, device=device, dtype=torch.float32)
        xs = torch.arange(width, device=device, dtype=torch.float32)
        freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    else:
        raise ValueError(f"scale must be 'unit' or 'index', got {scale!r}")
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    parts = []
    for coord in (grid_y.reshape(-1, 1), grid_x.reshape(-1, 1)):
        angles = coord * freqs[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).to(dtype)
