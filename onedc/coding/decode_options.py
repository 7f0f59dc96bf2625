"""How the inference bundle runs its generator and VAE decoder: precision, LoRA merge, layout, compile, tiles, batches.

::

    DecodeOptions ─ prepare_decoder(bundle) ── generator.unet: merge LoRA (float64) · SDPA · channels_last · dtype · compile
                                           └── vae decoder:    SDPA (in the 16×16 windows) · channels_last · dtype · compile
                  ─ vae_plan(latent, batch) ── untiled when the estimated activations fit ``max_memory_gb``, else
                                               16-aligned overlapping tiles (diffusers' tiled_decode) that do
                  ─ batch_size(pixels)      ── how many same-size files one VAE call may decode

The coding decisions never pass through here: ŷ is rebuilt in float64 by the codec
(:mod:`onedc.modules.decisions`), so every option keeps files bit-compatible and changes only
the picture, by the amounts ``benchmarks/decode.py`` measures. The VAE *encoder* is left as it
is (fp32): compressing is not affected. :meth:`DecodeOptions.reference` is the fp32 path that
mirrors the authors' code (unmerged LoRA, fp32, no compile, untiled).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from onedc.errors import OneDCError
from onedc.modules import decode_speed as speed

__all__ = ["DecodeOptions", "VaePlan", "prepare_decoder"]

# Default bound on the VAE decoder's activations: 4 GiB, so a full-size decode (weights 5.6 GB in
# fp32, 3.6 GB with a bf16 generator) stays under ~10 GB on a 24 GB machine at any image size.
DEFAULT_MAX_MEMORY_GB = 4.0
# Most files one batched VAE call decodes, even when memory would allow more.
MAX_BATCH = 8


@dataclass(frozen=True)
class DecodeOptions:
    """Speed settings of :class:`~onedc.coding.bundle.OneDCCodec`'s decoder (none changes ŷ).

    Args:
        precision: ``fp32``, ``bf16`` or ``auto`` (bf16 where the hardware computes it natively:
            AVX-512-BF16/AMX CPUs, bf16 GPUs; see :func:`onedc.modules.decode_speed.bf16_support`)
            for the generator's UNet and the VAE decoder.
        merge_lora: fold the LoRA into the UNet weights at load, exactly (float64).
        sdpa: route every attention through ``scaled_dot_product_attention`` (diffusers'
            default on torch 2 already; the reference VAE's windows keep their windowing).
        channels_last: NHWC weights and activations for the convolutions.
        compile: ``torch.compile`` the UNet and the VAE decoder (opt-in: minutes of compiling
            on the first decode of each size).
        tile_size: VAE tiles of this many image pixels (multiple of 128, > 128); None: chosen from
            ``max_memory_gb`` (untiled when the whole image fits).
        max_memory_gb: bound on the VAE decoder's activations (GiB), which tiles and batches are
            sized to; None: no bound (never tile, batch up to ``batch``).
        batch: most same-size files decoded in one generator/VAE call by ``decompress_many``.
    """

    precision: str = "fp32"
    merge_lora: bool = True
    sdpa: bool = True
    channels_last: bool = True
    compile: bool = False
    tile_size: int | None = None
    max_memory_gb: float | None = DEFAULT_MAX_MEMORY_GB
    batch: int = MAX_BATCH

    def __post_init__(self) -> None:
        if self.precision not in speed.PRECISIONS:
            raise OneDCError(f"precision must be one of {', '.join(speed.PRECISIONS)}, got '{self.precision}'")
        if self.tile_size is not None:
            latent = self.tile_size / 8
            if self.tile_size % 8 or latent <= speed.TILE_OVERLAP or (latent - speed.TILE_OVERLAP) % speed.TILE_GRID:
                raise OneDCError(f"tile size {self.tile_size} px: use a multiple of 128 above 128 "
                                 "(tiles overlap by 128 px and start on the 16-latent-pixel attention grid)")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise OneDCError(f"max memory must be > 0 GiB, got {self.max_memory_gb}")
        if self.batch < 1:
            raise OneDCError(f"batch must be >= 1, got {self.batch}")

    @classmethod
    def reference(cls) -> "DecodeOptions":
        """The fp32 path that mirrors the authors' code: unmerged LoRA, fp32, contiguous, no compile, untiled."""
        return cls(precision="fp32", merge_lora=False, sdpa=False, channels_last=False, compile=False,
                   tile_size=None, max_memory_gb=None, batch=1)

    @classmethod
    def fast(cls, **changes: Any) -> "DecodeOptions":
        """The fastest default path: :class:`DecodeOptions` with ``precision="auto"`` (what ``onedc decompress`` uses)."""
        return cls(**{"precision": "auto", **changes})


@dataclass
class VaePlan:
    """How one VAE call decodes a latent batch: ``tile`` latent pixels (None: untiled) and the estimate behind it."""

    tile: int | None
    estimated_bytes: float
    notes: list[str] = field(default_factory=list)


def _vae_parts(vae: nn.Module) -> list[nn.Module]:
    auto = vae.autoencoder
    return [auto.decoder] + ([auto.post_quant_conv] if getattr(auto, "post_quant_conv", None) is not None else [])


def prepare_decoder(generator: nn.Module | None, vae: nn.Module, options: DecodeOptions,
                    device: torch.device) -> dict[str, Any]:
    """Apply ``options`` to the generator and the VAE decoder in place; what was done, for logs and benchmarks.

    Call it after the model id was computed: merging the LoRA renames state-dict keys, and a
    cast changes dtypes, while the files name the weights as stored.
    """
    dtype = speed.resolve_precision(options.precision, device)
    done: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "bf16": speed.bf16_support(device.type).reason}
    if generator is not None:
        unet = generator.unet
        if options.merge_lora:
            done["lora_layers_merged"] = speed.merge_lora_layers(unet)
        if options.sdpa:
            done["attention_set_to_sdpa"] = speed.use_sdpa_attention(unet)
        if options.channels_last:
            speed.to_channels_last(unet)
        speed.cast_weights(unet, dtype)
        if options.compile:
            unet.compile(dynamic=False)
    auto = vae.autoencoder
    if options.sdpa:
        done["attention_set_to_sdpa"] = done.get("attention_set_to_sdpa", 0) + speed.use_sdpa_attention(auto.decoder)
    for part in _vae_parts(vae):
        if options.channels_last:
            speed.to_channels_last(part)
        speed.cast_weights(part, dtype)
    if options.compile:
        auto.decoder.compile(dynamic=False)
    return done


def vae_plan(options: DecodeOptions, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype,
             scale: int = 8) -> VaePlan:
    """Untiled if ``batch`` images of ``latent_hw`` fit ``max_memory_gb`` (estimate), else the largest tile that does."""
    pixels = latent_hw[0] * latent_hw[1] * scale * scale
    whole = speed.vae_decode_bytes(pixels, dtype, batch)
    if options.tile_size is not None:
        tile = options.tile_size // scale
        return VaePlan(None if max(latent_hw) <= tile else tile, whole)
    if options.max_memory_gb is None:
        return VaePlan(None, whole)
    budget = options.max_memory_gb * speed.GIB
    if whole <= budget:
        return VaePlan(None, whole)
    try:
        tile = speed.tile_for_memory(budget / batch, dtype, scale)
    except ValueError as err:
        raise OneDCError(f"--max-memory {options.max_memory_gb} GiB: {err}; allow more memory") from err
    return VaePlan(tile, speed.vae_decode_bytes((tile * scale) ** 2, dtype, batch))


def batch_size(options: DecodeOptions, padded_hw: tuple[int, int], dtype: torch.dtype) -> int:
    """How many same-size images of ``padded_hw`` (image pixels) one untiled VAE call may decode within the bound."""
    if options.max_memory_gb is None:
        return options.batch
    per_image = speed.vae_decode_bytes(padded_hw[0] * padded_hw[1], dtype)
    return max(1, min(options.batch, math.floor(options.max_memory_gb * speed.GIB / per_image)))
