"""Pixel metrics of decoded images: PSNR and MS-SSIM, on the 8-bit images a viewer sees.

PSNR convention (the one home of it; ``val/psnr`` in training, ``rd/psnr`` of the RD callback
and the ``psnr`` column of ``onedc eval`` all come from :func:`psnr`): both images are rounded
to 8 bits as a PNG would store them (:func:`onedc.coding.images.to_uint8` for [-1, 1] floats; uint8
passes through), the MSE is taken over every value of one image (all three channels), the
peak is 255, and identical images give ``inf``. A set of images reports the mean of the
per-image PSNRs, as CompressAI and the Kodak tables do (not the PSNR of the pooled MSE).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from onedc.coding.images import to_uint8

__all__ = ["MS_SSIM_BETAS", "MS_SSIM_KERNEL", "ms_ssim_settings", "ms_ssim_uint8", "psnr", "psnr_uint8", "to_uint8"]

# Standard MS-SSIM weights (Wang, Simoncelli & Bovik 2003), finest scale first.
MS_SSIM_BETAS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11


def _eight_bit(image: Tensor) -> Tensor:
    """uint8 values as float64; [-1, 1] floats rounded to 8 bits first (on their own device)."""
    if image.dtype == torch.uint8:
        return image.double()
    return ((image.detach().double().nan_to_num() + 1.0) * 127.5).round().clamp(0, 255)


def psnr(decoded: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) or (3, H, W) images, by the module's convention.

    Inputs are uint8, or floats in [-1, 1] (rounded to 8 bits first). Returns (B,) float64, or
    a 0-d tensor for single images; ``inf`` where the two are identical.
    """
    single = decoded.ndim == 3
    diff = _eight_bit(decoded) - _eight_bit(reference)
    mse = (diff ** 2).reshape(1 if single else diff.shape[0], -1).mean(dim=1)
    values = 10.0 * torch.log10(255.0 ** 2 / mse)  # mse 0 -> inf, which is what identical images score
    return values[0] if single else values


def psnr_uint8(reference: Tensor, decoded: Tensor) -> float:
    """:func:`psnr` of one pair of (3, H, W) images as a Python float (``10·log10(255² / MSE)``)."""
    value = float(psnr(decoded, reference))
    return math.inf if value == math.inf else value


def ms_ssim_settings(height: int, width: int) -> tuple[int, float, tuple[float, ...]] | None:
    """(window size, Gaussian sigma, betas) of MS-SSIM for a ``height`` x ``width`` image; None under 3 px.

    The standard setting (11-px window, sigma 1.5, 5 scales) when torchmetrics accepts it;
    otherwise the most of the finest scales that fit — torchmetrics' size rule
    ``side // (n-1)² > k-1`` and the reflect padding ``(k-1)/2 < side / 2^(n-1)`` at the coarsest
    scale — with the standard betas renormalised; below 11 px one scale with a smaller odd
    window k. torchmetrics sizes a Gaussian window from sigma (``2·int(3.5σ+0.5)+1``), so a
    smaller window comes with sigma ``(k-1)/7``.
    """
    side = min(height, width)
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        div = max(1, scales - 1) ** 2
        if side // div > MS_SSIM_KERNEL - 1 and (MS_SSIM_KERNEL - 1) // 2 < side >> (scales - 1):
            if scales == len(MS_SSIM_BETAS):
                return MS_SSIM_KERNEL, 1.5, MS_SSIM_BETAS  # as published (they sum to 1.0001)
            betas = MS_SSIM_BETAS[:scales]
            return MS_SSIM_KERNEL, 1.5, tuple(b / sum(betas) for b in betas)
    kernel = side if side % 2 else side - 1
    return (kernel, (kernel - 1) / 7, (1.0,)) if kernel >= 3 else None


def ms_ssim_uint8(reference: Tensor, decoded: Tensor) -> tuple[float | None, int]:
    """(MS-SSIM, number of scales used) of two uint8 (3, H, W) images, data range 255.

    torchmetrics' ``MultiScaleStructuralSimilarityIndexMeasure`` with :func:`ms_ssim_settings`;
    (None, 0) for images under 3 px.
    """
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    settings = ms_ssim_settings(int(reference.shape[-2]), int(reference.shape[-1]))
    if settings is None:
        return None, 0
    kernel, sigma, betas = settings
    metric = MultiScaleStructuralSimilarityIndexMeasure(data_range=255.0, kernel_size=kernel, sigma=sigma,
                                                        betas=betas)
    metric.update(decoded[None].float(), reference[None].float())  # float64 convolutions are ~10x slower on CPUs
    value = metric.compute()
    return float(value), len(betas)
