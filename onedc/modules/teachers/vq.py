"""A diffusers ``VQModel`` tokenizer (MaskGIT-VQGAN style) as a teacher: code indices + codebook rows."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError
from onedc.modules.teachers.base import _LEGACY_RESIZE, Teacher, TeacherTargets, _scaled_size


class VQTeacher(Teacher):
    """A diffusers ``VQModel`` tokenizer (MaskGIT-VQGAN style) as a distillation teacher.

    ``encode`` (encoder + quant_conv) gives the pre-quantisation latent; the model's own
    ``VectorQuantizer`` picks the nearest code. The returned latent is the codebook row of each
    index, exactly: the quantizer's straight-through output ``z + (z_q - z)`` differs from the
    codebook entry by rounding, and the MSE target must be the codebook geometry itself.

    ``tile_size`` (pixels at the tokenizer input, a multiple of its stride) encodes the image
    as independent non-overlapping tiles, the way tiled VAE encoding applies a model trained on
    small images to large ones. Every GroupNorm of a diffusers encoder normalises over the whole
    input, so without tiling a token's code also depends on what else is in the crop: a 128 px
    training crop and a 256 px validation crop give the same patch different codes. With
    tiles, codes are a function of the tile alone. The image is padded (edge replication) to
    whole tiles and the token grid cropped back to what the untiled encoder would give.
    """

    def __init__(self, model: nn.Module, *, identity: str, input_scale: float = 0.5,
                 tile_size: int | None = None, input_range: Sequence[float] | None = None,
                 resize: str = _LEGACY_RESIZE) -> None:
        quantize = model.quantize
        super().__init__(kind="vq", target_dim=quantize.vq_embed_dim, num_codes=quantize.n_e,
                         identity=identity, input_scale=input_scale, input_range=input_range,
                         resize=resize)
        self.model = model
        self.stride = _vq_stride(model)
        if tile_size is not None and (tile_size < self.stride or tile_size % self.stride):
            raise ConfigError(f"teacher tile_size={tile_size} must be a positive multiple of the "
                              f"tokenizer's stride {self.stride}")
        self.tile_size = tile_size
        self._freeze()

    def codebook(self) -> torch.Tensor:
        """The (K, C) code embedding matrix (detached; the teacher is frozen)."""
        return self.model.quantize.embedding.weight.detach()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        tile = self.tile_size
        if tile is None:
            return self.model.encode(x).latents
        batch, _, height, width = x.shape
        x = F.pad(x, (0, -width % tile, 0, -height % tile), mode="replicate")
        rows, cols = x.shape[-2] // tile, x.shape[-1] // tile
        tiles = (x.unfold(2, tile, tile).unfold(3, tile, tile)  # (B, 3, rows, cols, tile, tile)
                 .permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], tile, tile))
        latents = torch.cat([self.model.encode(chunk).latents for chunk in tiles.split(1024)])
        channels, side = latents.shape[1], latents.shape[-1]
        latents = (latents.reshape(batch, rows, cols, channels, side, side)
                   .permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, rows * side, cols * side))
        return latents[:, :, :max(1, height // self.stride), :max(1, width // self.stride)]

    def _targets(self, x: torch.Tensor) -> TeacherTargets:
        x = self._prepare(x, _scaled_size(x.shape[-2], x.shape[-1], self.input_scale))
        h = self._encode(x)
        batch, _, height, width = h.shape
        _, _, (_, _, indices) = self.model.quantize(h)
        indices = indices.reshape(batch, height, width).long()
        latents = self.model.quantize.embedding(indices).permute(0, 3, 1, 2).contiguous()
        return TeacherTargets(indices, latents)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tile_size={self.tile_size}"


def _vq_stride(model: nn.Module) -> int:
    """Pixels per token of a diffusers VQModel: each encoder down block but the last halves."""
    return 2 ** (len(model.config.block_out_channels) - 1)
