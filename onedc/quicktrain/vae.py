"""The tiny VAE's recipe: a random ``AutoencoderKL`` trained on the bundled photos.

A random ``AutoencoderKL`` decodes noise (about 10 dB PSNR), so nothing a person can judge comes
out of a tiny-preset run. :func:`quick_train_vae` trains one on photos bundled with scikit-image
(never the sample-photo validation images). It runs offline, in ``python -m onedc.assets.make``,
which ships the result as ``onedc/assets/tiny_vae.safetensors``; ``model=tiny`` only loads it::

    8x8 patches of the photos ─ PCA ─> latent_channels whitened components  (closed form)
    guided:  L1(D(pca(x)), x) + MSE(E(x), pca(x))     decoder and encoder learn apart, each
                                                      against a fixed target: converges fast
    joint:   L1(D(E(x)), x) + anchor·MSE(E(x), pca(x)) the real autoencoder, kept near PCA

The PCA anchor gives latents with unit variance per channel and the smooth, image-like layout
the codec's analysis transform expects. Everything is seeded and runs on one CPU thread, so the
weights depend neither on the caller's device nor on its thread count; ``E`` is the posterior
mean (the codec encodes deterministically), so no KL term is trained.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError
from onedc.coding.images import load_image
from onedc.quicktrain.common import HELD_OUT_IMAGES, QUICK_TRAIN_IMAGES, quick_train_images, random_crops

__all__ = ["VAEQuickTrainRecipe", "held_out_figures", "latent_std", "pca_encoder", "quick_train_vae", "reconstruct"]

# Bump when the training procedure changes: it is recorded in the shipped file's metadata.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class VAEQuickTrainRecipe:
    """How :func:`quick_train_vae` trains a random ``AutoencoderKL``.

    ``guided_steps`` Adam steps train encoder and decoder apart against the PCA latents, then
    ``joint_steps`` train the autoencoder end to end (one cosine schedule over both, linear
    warm-up). Small crops in large batches learn faster per step than few large crops; the joint
    phase may use larger ones (``joint_crop``): every GroupNorm normalises over the whole input,
    so a decoder trained on 48 px crops only sees whole-photo statistics at evaluation.
    """

    guided_steps: int = 200
    joint_steps: int = 200
    batch_size: int = 16
    crop: int = 48
    lr: float = 5e-3
    anchor: float = 0.1
    """Weight of MSE(E(x), pca(x)) in the joint phase: keeps the latents PCA-like."""
    joint_crop: int | None = None
    """Crop side of the joint phase (None = ``crop``)."""
    joint_batch_size: int | None = None
    """Batch of the joint phase (None = ``batch_size``)."""
    images: tuple[str, ...] = QUICK_TRAIN_IMAGES
    """Image files: names inside scikit-image's data folder, or paths."""


def _downsample(model: nn.Module) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


def pca_encoder(images: list[torch.Tensor], channels: int, patch: int) -> nn.Conv2d:
    """A strided conv giving the ``channels`` leading whitened PCA components of ``patch`` px patches.

    Fitted in closed form on the non-overlapping patches of ``images``; each output channel has
    zero mean and unit variance over them.
    """
    rows = [F.unfold(im[None, :, : im.shape[-2] // patch * patch, : im.shape[-1] // patch * patch],
                     patch, stride=patch)[0].T for im in images]
    points = torch.cat(rows).double()
    mean = points.mean(0)
    _, singular, basis = torch.linalg.svd(points - mean, full_matrices=False)
    std = singular[:channels] / math.sqrt(points.shape[0] - 1)
    weight = basis[:channels] / std[:, None]
    conv = nn.Conv2d(3, channels, patch, stride=patch)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(channels, 3, patch, patch).float())
        conv.bias.copy_((-(weight @ mean)).float())
    return conv.requires_grad_(False)


def quick_train_vae(model: nn.Module, recipe: VAEQuickTrainRecipe, *, seed: int) -> None:
    """Train a diffusers ``AutoencoderKL`` in place with ``recipe`` (see the module docstring).

    Deterministic from ``seed``; the caller's RNG, thread count and grad mode are left as they
    were. The model ends frozen in eval mode.
    """
    stride = _downsample(model)
    joint_crop = recipe.joint_crop or recipe.crop
    joint_batch = recipe.joint_batch_size or recipe.batch_size
    if recipe.crop % stride or joint_crop % stride:
        raise ConfigError(f"VAE recipe crops {recipe.crop} / {joint_crop} must be multiples of the VAE's "
                          f"downsampling factor {stride}")
    # The teacher's loader at scale 1 in [-1, 1]: the photos exactly as the VAE sees them.
    images = quick_train_images(recipe.images, 1.0, max(recipe.crop, joint_crop), input_range=(-1.0, 1.0),
                                resize="bilinear")
    total = recipe.guided_steps + recipe.joint_steps
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            # Inside the forked RNG: nn.Conv2d draws an initial weight (overwritten by the fit).
            target = pca_encoder(images, int(model.config.latent_channels), stride)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model.requires_grad_(True)
            optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
            warmup = max(1, min(20, total // 10))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
                1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total))))
            model.train()
            for step in range(total):
                guided = step < recipe.guided_steps
                x = random_crops(images, recipe.batch_size if guided else joint_batch,
                                 recipe.crop if guided else joint_crop, generator)
                pca = target(x)
                latent = model.encode(x).latent_dist.mean
                if guided:
                    loss = (model.decode(pca).sample - x).abs().mean() + F.mse_loss(latent, pca)
                else:
                    loss = (model.decode(latent).sample - x).abs().mean() + recipe.anchor * F.mse_loss(latent, pca)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.requires_grad_(False)


def reconstruct(autoencoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """``autoencoder``'s reconstruction of one (3, H, W) image in [-1, 1], clamped to [-1, 1].

    The whole photo at once (reflect-padded to a multiple of 64, cropped back), encoded to the
    posterior mean as the codec does: GroupNorm sees the whole image, as in a real run.
    """
    height, width = image.shape[-2:]
    padded = F.pad(image[None], (0, (-width) % 64, 0, (-height) % 64), mode="reflect")
    with torch.no_grad():
        decoded = autoencoder.decode(autoencoder.encode(padded).latent_dist.mean).sample
    return decoded[0, :, :height, :width].clamp(-1, 1)


def held_out_figures(autoencoder: nn.Module, names: Sequence[str] = HELD_OUT_IMAGES) -> dict[str, dict[str, Any]]:
    """VAE-alone figures on the held-out sample photos: ``{name: {"psnr": dB, "colour_error": [R, G, B]}}``.

    PSNR by :func:`onedc.eval.pixels.psnr` (8-bit, whole photo); ``colour_error`` is the mean of
    decoded - original per channel in 8-bit units (a colour cast shows as a non-zero mean).
    """
    from onedc.eval.pixels import psnr
    from onedc.coding.images import to_uint8
    from onedc.samples import sample_photo_paths

    paths = sample_photo_paths()
    figures = {}
    for name in names:
        image = load_image(paths[name])
        decoded = reconstruct(autoencoder, image)
        error = (to_uint8(decoded).double() - to_uint8(image).double()).mean(dim=(1, 2))
        figures[name] = {"psnr": float(psnr(decoded, image)), "colour_error": [float(v) for v in error]}
    return figures


def latent_std(autoencoder: nn.Module) -> float:
    """Std of the posterior-mean latents over all sample photos (1 / it is ``model.vae.scaling_factor``)."""
    from onedc.samples import sample_photo_paths

    latents = []
    for path in sample_photo_paths().values():
        image = load_image(path)
        height, width = image.shape[-2:]
        padded = F.pad(image[None], (0, (-width) % 64, 0, (-height) % 64), mode="reflect")
        with torch.no_grad():
            latents.append(autoencoder.encode(padded).latent_dist.mean.flatten())
    return float(torch.cat(latents).std())
