"""Decode-time speed levers for the generator and the VAE decoder: pure torch, no coding decisions touched.

::

    generator.unet ── merge_lora_layers (float64, exact)  ── channels_last ── bf16 weights ── torch.compile (opt-in)
    vae decoder    ── (SDPA attention: diffusers' AttnProcessor2_0, already inside the 16×16 windows)
                   ── channels_last ── bf16 weights ── tiled decode (diffusers' tiled_decode, 16-aligned tiles)

Everything here changes *how* the two big networks compute, never *what the file says*: the
integer coding decisions of ŷ run in their own float64 path (:mod:`onedc.modules.decisions`),
so a file decodes to the same ŷ whatever is chosen here. Only the picture moves, by the
amounts ``benchmarks/decode.py`` measures.

Native bf16: a CPU runs bf16 convolutions/matmuls natively when it has AVX-512-BF16 or AMX
(oneDNN then uses ``avx512_core_bf16`` / ``avx512_core_amx`` kernels); elsewhere bf16 is
emulated and slower than fp32, so ``precision="auto"`` keeps fp32 there. A GPU with bf16
support (Ampere and later) always takes it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "auto")
# Latent pixels the tiles of the tiled VAE decode overlap by (128 image pixels) and the grid the
# tile starts keep: 16, the VAE mid-block attention window, so every window of a tile is a window
# of the whole map (the windowed attention stays the reference's except where a tile cuts it).
TILE_OVERLAP = 16
TILE_GRID = 16
GIB = 2**30


@dataclass(frozen=True)
class BF16Support:
    """Whether ``device`` computes bf16 natively, and the evidence (one line for logs and benchmarks)."""

    native: bool
    reason: str


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=None)
def bf16_support(device_type: str = "cpu") -> BF16Support:
    """Native bf16 on ``device_type`` ("cpu" or "cuda"): CPU flags avx512_bf16/amx_bf16 + oneDNN's own check.

    On a CPU both must agree: the kernel flags (``/proc/cpuinfo``) say the instructions exist,
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` that the oneDNN build uses them, and
    ``torch.backends.cpu.get_cpu_capability`` names the ATen kernel set (for the message).
    """
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return BF16Support(bool(ok), f"CUDA {name}: bf16 {'supported' if ok else 'not supported'}")
    if device_type != "cpu":
        return BF16Support(False, f"device type {device_type}: bf16 not assumed native")
    flags = _cpu_flags() & {"avx512_bf16", "amx_bf16"}
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    capability = torch.backends.cpu.get_cpu_capability()
    native = bool(flags) and onednn
    found = ", ".join(sorted(flags)) or "no avx512_bf16/amx_bf16 flag"
    return BF16Support(native, f"CPU {capability} kernels, {found}, oneDNN bf16 {'on' if onednn else 'off'}")


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """``fp32`` | ``bf16`` | ``auto`` -> the dtype the generator and VAE decoder run in on ``device``.

    ``auto`` is bf16 where :func:`bf16_support` says the hardware computes it natively, fp32
    elsewhere (emulated bf16 is slower than fp32 and still loses precision).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if precision == "auto":
        return torch.bfloat16 if bf16_support(torch.device(device).type).native else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


# --------------------------------------------------------------------------- LoRA
def _lora_delta64(layer: nn.Module, adapter: str) -> torch.Tensor:
    """scale·B·A of one peft LoRA layer in float64, shaped like its base weight (Linear or Conv2d, 1x1 B)."""
    weight = layer.base_layer.weight
    down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    delta = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    return float(layer.scaling[adapter]) * delta.reshape(weight.shape)


@torch.no_grad()
def merge_lora_layers(model: nn.Module) -> int:
    """Fold every active peft LoRA adapter of ``model`` into its base layer, exactly, and unwrap it (in place).

    W' = W + scale·B·A is computed in float64 and rounded once to W's dtype, the same arithmetic
    as ``onedc.families.reference.released.merge_lora_state_dict`` (so both give the same
    tensors); each wrapper is then replaced by its base ``nn.Linear`` / ``nn.Conv2d``, so the
    278 adapters of the published UNet cost nothing per step. Hand-written rather than peft's
    ``merge_and_unload`` because peft merges in the weight dtype (one extra rounding of B·A in
    fp32) and works on a ``PeftModel``, while diffusers attaches adapters to the bare UNet.
    Returns the number of layers merged; raises ``ValueError`` on adapters it cannot fold
    exactly (DoRA, several active adapters, a conv B that is not 1x1).
    """
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(adapters) > 1 or any(layer.use_dora.get(a, False) for a in adapters):
            raise ValueError(f"{name}: only one plain LoRA adapter can be merged exactly (got {adapters})")
        base = layer.base_layer
        if adapters and not getattr(layer, "merged", False) and not getattr(layer, "disable_adapters", False):
            up = layer.lora_B[adapters[0]].weight
            if up.ndim == 4 and up.shape[-2:] != (1, 1):
                raise ValueError(f"{name}: LoRA B is a {tuple(up.shape[-2:])} conv, not 1x1: cannot merge exactly")
            merged = base.weight.double() + _lora_delta64(layer, adapters[0])
            base.weight.copy_(merged.to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if layers and hasattr(model, "peft_config"):
        # diffusers' adapter bookkeeping: the model no longer holds adapters
        model.peft_config = {}
        model._hf_peft_config_loaded = False
    return len(layers)


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` still holds peft LoRA wrappers."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


# --------------------------------------------------------------------------- layout, dtype, attention
def to_channels_last(module: nn.Module) -> nn.Module:
    """Store ``module``'s 4-D weights channels-last (NHWC), in place: oneDNN and cuDNN then skip reorders."""
    return module.to(memory_format=torch.channels_last)


def cast_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``module``'s floating parameters and buffers to ``dtype``, in place (memory format kept).

    ``nn.Module.to`` itself: diffusers' ``ModelMixin.to`` only adds a warning about modules to
    keep in float32, of which the SD UNet and VAE have none.
    """
    return nn.Module.to(module, dtype=dtype)


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def uses_sdpa(processor: Any) -> bool:
    """Whether a diffusers attention processor (or onedc's windowed wrapper around one) calls SDPA."""
    inner = getattr(processor, "inner", processor)
    return type(inner).__name__ in ("AttnProcessor2_0", "FusedAttnProcessor2_0")


def use_sdpa_attention(model: nn.Module) -> int:
    """Route every diffusers ``Attention`` of ``model`` through ``scaled_dot_product_attention`` (in place).

    A processor that already calls SDPA is kept; a wrapper with an ``inner`` processor (the
    reference VAE's 16×16 windows) keeps its windowing and gets an SDPA inner processor.
    Returns the number of processors changed (0 when diffusers already chose SDPA everywhere,
    its default on torch 2).
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    changed = 0
    for module in model.modules():
        if not isinstance(module, Attention) or uses_sdpa(module.processor):
            continue
        if hasattr(module.processor, "inner"):
            module.processor.inner = AttnProcessor2_0()
        else:
            module.set_processor(AttnProcessor2_0())
        changed += 1
    return changed


def use_classic_attention(model: nn.Module) -> int:
    """The opposite of :func:`use_sdpa_attention`: diffusers' explicit softmax ``AttnProcessor`` (benchmarks)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    changed = 0
    for module in model.modules():
        if isinstance(module, Attention):
            if hasattr(module.processor, "inner"):
                module.processor.inner = AttnProcessor()
            else:
                module.set_processor(AttnProcessor())
            changed += 1
    return changed


# --------------------------------------------------------------------------- tiled VAE decode
def set_vae_tiling(autoencoder: nn.Module, tile_latent: int | None, overlap: int = TILE_OVERLAP) -> None:
    """Decode latents larger than ``tile_latent``² in overlapping tiles (diffusers' ``tiled_decode``); None: never.

    diffusers' ``AutoencoderKL.tiled_decode`` decodes tiles of ``tile_latent_min_size`` latent
    pixels that start every ``tile_latent·(1 − overlap_factor)`` pixels and cross-fades the
    overlaps linearly. It fits the reference VAE's windowed mid attention when the tile starts
    lie on the 16-pixel window grid: then each tile's windows are windows of the whole map.
    Here the overlap is ``overlap`` latent pixels and ``tile_latent − overlap`` a multiple of 16,
    so the starts are. What tiling still changes are the decoder's GroupNorm statistics (taken
    per tile, not per image) and the convolutions' context at tile borders; the blending hides
    the seams (the error is measured by ``benchmarks/decode_memory.py`` and the tests).
    """
    if tile_latent is None:
        autoencoder.use_tiling = False
        return
    tile_latent, overlap = int(tile_latent), int(overlap)
    if tile_latent <= overlap or (tile_latent - overlap) % TILE_GRID:
        raise ValueError(f"tile of {tile_latent} latent pixels with overlap {overlap}: the stride "
                         f"{tile_latent - overlap} must be a positive multiple of {TILE_GRID}")
    scale = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    autoencoder.use_tiling = True
    autoencoder.tile_latent_min_size = tile_latent
    autoencoder.tile_sample_min_size = tile_latent * scale
    autoencoder.tile_overlap_factor = overlap / tile_latent


# Peak resident bytes of one VAE decode per output pixel and batch image: the SD-2.1 decoder
# (128-256-512-512, full width) at 512x512 on a CPU, channels-last, in a fresh process (peak RSS
# minus the RSS before the decode): 3431 B (fp32) and 1690 B (bf16), rounded up.
# benchmarks/decode_memory.py re-measures them.
VAE_DECODE_BYTES_PER_PIXEL = {torch.float32: 3500.0, torch.bfloat16: 1750.0}


def vae_decode_bytes(pixels: int, dtype: torch.dtype = torch.float32, batch: int = 1,
                     bytes_per_pixel: float | None = None) -> float:
    """Estimated peak activation bytes of decoding ``batch`` images of ``pixels`` output pixels untiled."""
    per_pixel = bytes_per_pixel if bytes_per_pixel is not None else VAE_DECODE_BYTES_PER_PIXEL.get(
        dtype, VAE_DECODE_BYTES_PER_PIXEL[torch.float32])
    return per_pixel * pixels * batch


def tile_for_memory(max_bytes: float, dtype: torch.dtype = torch.float32, scale: int = 8,
                    overlap: int = TILE_OVERLAP, bytes_per_pixel: float | None = None) -> int:
    """The largest tile (latent pixels, stride on the 16 grid) whose decode fits ``max_bytes`` of activations.

    Raises ``ValueError`` when not even the smallest tile (overlap + 16) fits.
    """
    tile = overlap + TILE_GRID
    if vae_decode_bytes((tile * scale) ** 2, dtype, bytes_per_pixel=bytes_per_pixel) > max_bytes:
        raise ValueError(f"{max_bytes / GIB:.2f} GiB cannot hold even a {tile * scale}-pixel VAE tile")
    while vae_decode_bytes(((tile + TILE_GRID) * scale) ** 2, dtype, bytes_per_pixel=bytes_per_pixel) <= max_bytes:
        tile += TILE_GRID
    return tile
