"""What both codec families share to code an image: padding, the fixed-length z stream, the decoded latents.

::

    image (B,3,H,W) ─pad_to_multiple(64)─> padded           (replicate, bottom/right)
    z indices (B, h, w) ─pack_indices(bits)─> z stream      (fixed length: bits per index, MSB first)
    z stream ─unpack_indices─> indices ─FSQ─> ẑ ─> DecodedLatents (ŷ, ẑ, S, tokens, F, light v̂)

A shared block (docs/architecture.md): the light codec (``onedc.modules.light``) and the
published codec (``onedc.modules.reference``) both import it, neither imports the other.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor


class _IndexCode(Protocol):
    bits_per_index: int


class DecodedLatents(NamedTuple):
    """What the decoder side computes from (ŷ, ẑ): exactly what a codec's ``decompress`` returns.

    ``latent_hat`` is the light codec's stage-1 reconstruction of the VAE latent; codecs without
    one (the published model: the generator always decodes) leave it None.
    """

    y_hat: Tensor
    z_hat: Tensor
    semantic: Tensor
    tokens: Tensor
    features: Tensor
    latent_hat: Tensor | None


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Bit-pack non-negative integers, ``bits`` each, MSB first (fixed-length code)."""
    flat = indices.astype(np.uint64).reshape(-1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    bit_array = ((flat[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bit_array.reshape(-1)).tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`; raises ValueError if ``data`` is too short."""
    needed = (count * bits + 7) // 8
    if len(data) < needed:
        raise ValueError(f"z stream has {len(data)} bytes, {needed} needed")
    bit_array = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=needed))[: count * bits]
    weights = (np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64))
    return (bit_array.reshape(count, bits).astype(np.uint64) * weights).sum(axis=1).astype(np.int64)


def z_stream_bits(fsq: _IndexCode, z_shape: Sequence[int]) -> int:
    """Bits of the fixed-length z stream of a z grid of ``z_shape`` (before byte padding)."""
    return int(fsq.bits_per_index) * int(z_shape[0]) * int(z_shape[1])


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Replicate-pad (B,3,H,W) on the bottom/right to a multiple; return it and the original (H, W)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x, (h, w)
