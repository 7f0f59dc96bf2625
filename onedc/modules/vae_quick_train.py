"""Quick training of the tiny preset's random VAE, cached on disk.

A random ``AutoencoderKL`` decodes noise (about 10 dB PSNR), so nothing a person can judge comes
out of a tiny-preset run. :func:`quick_trained_vae_dir` trains one briefly on photos bundled with
scikit-image (never the sample-photo validation images) and caches the diffusers directory, the
way :mod:`onedc.modules.teachers` caches the quick-trained tiny teacher::

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

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError
from onedc.modules.teachers import QUICK_TRAIN_IMAGES, _quick_train_images, _random_crops, teacher_cache_dir
from onedc.modules.teachers.quick_train import recipe_from_options, save_quick_trained

__all__ = ["VAEQuickTrainRecipe", "pca_encoder", "quick_train_vae", "quick_trained_vae_dir", "vae_cache_dir"]

# Bump when the training procedure changes: it is part of the cache key.
_VERSION = 1


@dataclass(frozen=True)
class VAEQuickTrainRecipe:
    """How :func:`quick_train_vae` trains a random ``AutoencoderKL`` (``model.vae.quick_train``).

    ``guided_steps`` Adam steps train encoder and decoder apart against the PCA latents, then
    ``joint_steps`` train the autoencoder end to end (one cosine schedule over both, linear
    warm-up). Small crops in large batches learn faster per second than few large crops.
    """

    guided_steps: int = 200
    joint_steps: int = 200
    batch_size: int = 16
    crop: int = 48
    lr: float = 5e-3
    anchor: float = 0.1
    """Weight of MSE(E(x), pca(x)) in the joint phase: keeps the latents PCA-like."""
    images: tuple[str, ...] = QUICK_TRAIN_IMAGES
    """Image files: names inside scikit-image's data folder, or paths."""

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> VAEQuickTrainRecipe:
        """The recipe of a ``quick_train`` config mapping; unknown keys or bad values raise."""
        recipe = recipe_from_options(cls, options, "model.vae.quick_train")
        for name in ("guided_steps", "joint_steps", "batch_size", "crop"):
            value = getattr(recipe, name)
            if not isinstance(value, int) or value < (0 if name.endswith("steps") else 1):
                raise ConfigError(f"model.vae.quick_train.{name} must be a non-negative integer, got {value!r}")
        if not (isinstance(recipe.lr, (int, float)) and recipe.lr > 0) or recipe.anchor < 0:
            raise ConfigError(f"model.vae.quick_train needs lr > 0 and anchor >= 0, "
                              f"got lr={recipe.lr!r}, anchor={recipe.anchor!r}")
        if not recipe.images:
            raise ConfigError("model.vae.quick_train.images is empty: give at least one image file")
        return recipe


def vae_cache_dir() -> Path:
    """Where quick-trained VAEs are cached: beside the teachers, ``$ONEDC_CACHE/vae`` (else
    ``~/.cache/onedc/vae``)."""
    return teacher_cache_dir().parent / "vae"


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
    if recipe.crop % stride:
        raise ConfigError(f"model.vae.quick_train.crop={recipe.crop} must be a multiple of the VAE's "
                          f"downsampling factor {stride}")
    # The teacher's loader at scale 1 in [-1, 1]: the photos exactly as the VAE sees them.
    images = _quick_train_images(recipe.images, 1.0, recipe.crop, input_range=(-1.0, 1.0), resize="bilinear")
    target = pca_encoder(images, int(model.config.latent_channels), stride)
    total = recipe.guided_steps + recipe.joint_steps
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model.requires_grad_(True)
            optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
            warmup = max(1, min(20, total // 10))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
                1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total))))
            model.train()
            for step in range(total):
                x = _random_crops(images, recipe.batch_size, recipe.crop, generator)
                pca = target(x)
                latent = model.encode(x).latent_dist.mean
                if step < recipe.guided_steps:
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


def quick_trained_vae_dir(config: dict, seed: int, recipe: VAEQuickTrainRecipe) -> Path:
    """The cached diffusers directory of a quick-trained ``AutoencoderKL``; trains it on a cache miss.

    The cache key hashes everything the weights depend on (AutoencoderKL kwargs, seed, recipe,
    recipe version). A fresh model is written to a temporary directory and renamed into place,
    so readers never see half a model, and concurrent builders (DDP ranks on a cold cache) all
    end up loading the one directory that won the rename.
    """
    from diffusers import AutoencoderKL

    spec = {"version": _VERSION, "config": config, "seed": seed, "recipe": asdict(recipe)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = vae_cache_dir()
    final = root / f"vae-{key}"
    if (final / "config.json").is_file():
        return final
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(**config)
    quick_train_vae(model, recipe, seed=seed)
    return save_quick_trained(model, spec, final, "VAE")
