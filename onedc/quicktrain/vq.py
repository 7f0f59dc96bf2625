"""The tiny VQ teacher's recipe: a random tiny ``VQModel`` trained briefly on the bundled photos.

A random tokenizer's codes are noise no student can learn; :func:`quick_train_vq` trains one so
its codes describe image content (:class:`QuickTrainRecipe` says how). It runs offline, in
``python -m onedc.assets.make``, which ships the result as ``onedc/assets/vq_tiny_teacher.safetensors``;
building ``tokenizer=vq_tiny`` only loads that file.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError
from onedc.modules.teachers.base import _LEGACY_RANGE, _LEGACY_RESIZE, _check_range
from onedc.modules.teachers.codebook import _kmeans
from onedc.modules.teachers.vq import _vq_stride
from onedc.quicktrain.common import QUICK_TRAIN_IMAGES, quick_train_images, random_crops

__all__ = ["QuickTrainRecipe", "quick_train_vq"]

# Bump when the training procedure changes: it is recorded in the shipped file's metadata.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class QuickTrainRecipe:
    """How :func:`quick_train_vq` trains a random tiny VQ tokenizer.

    A random tokenizer's codes are noise to a student: they follow texture and whole-crop
    statistics, so nothing learnt on training crops carries over to held-out images. A real
    tokenizer's codes describe what its patch looks like because it was trained to reconstruct
    it; this recipe does that briefly. The encoder (+ ``quant_conv``) is trained with a linear
    per-token decoder to reconstruct each token's patch average-pooled to ``readout`` x
    ``readout`` colours (MSE, quantizer bypassed), on random crops of ``images`` at the
    teacher's ``input_scale``; the codebook is then fitted by k-means to the trained latents
    (training through the quantizer collapses a 16-code book onto a few codes in so few
    steps). The VQModel's own decoder is left untrained: a teacher only encodes, and that
    GroupNorm-heavy decoder learns far too slowly to reconstruct colour in seconds.
    Everything is seeded; training runs on one CPU thread, so the weights depend neither on the
    caller's device nor on its thread count.
    """

    steps: int = 300
    """Adam steps (linear warm-up, then cosine decay)."""
    batch_size: int = 128
    crop: int | None = None
    """Training crop side in pixels at the tokenizer input; None = the teacher's tile_size
    (one tile per crop, exactly what the tiled teacher encodes), or 64 px for untiled teachers."""
    lr: float = 5e-3
    readout: int = 4
    """Side of the pooled colour grid each token's latent must reconstruct linearly."""
    kmeans_crops: int = 4096
    """Crops whose latents the k-means codebook is fitted to."""
    images: tuple[str, ...] = QUICK_TRAIN_IMAGES
    """Image files: names inside scikit-image's data folder, or paths."""


def quick_train_vq(model: nn.Module, recipe: QuickTrainRecipe, *, seed: int, input_scale: float,
                   tile_size: int | None = None, input_range: Sequence[float] | None = None,
                   resize: str = _LEGACY_RESIZE) -> None:
    """Train a diffusers ``VQModel`` in place with ``recipe`` (see :class:`QuickTrainRecipe`).

    The training crops follow the teacher's input protocol (``input_range``, None = [-1, 1],
    and ``resize``), so the trained encoder sees what the teacher will feed it.

    Deterministic from ``seed``; the caller's RNG, thread count and grad mode are left as they
    were. The model ends frozen in eval mode.
    """
    stride = _vq_stride(model)
    crop = recipe.crop or tile_size or 64
    if crop % stride or recipe.readout < 1 or stride % recipe.readout:
        raise ConfigError(f"quick_train crop {crop} must be a multiple of the tokenizer's stride "
                          f"{stride}, and readout {recipe.readout} must divide it")
    value_range = _LEGACY_RANGE["vq"] if input_range is None else _check_range(input_range)
    images = quick_train_images(recipe.images, input_scale, crop, value_range, resize)
    channels = model.quantize.vq_embed_dim
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            # Linear per-token decoder: latent -> readout x readout colours of the token's patch.
            readout = nn.Sequential(nn.Conv2d(channels, 3 * recipe.readout ** 2, 1),
                                    nn.PixelShuffle(recipe.readout))
            params = [*model.encoder.parameters(), *model.quant_conv.parameters(), *readout.parameters()]
            optimizer = torch.optim.Adam(params, lr=recipe.lr)
            warmup = max(1, min(20, recipe.steps // 10))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
                1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / recipe.steps)))
            model.train()
            for _ in range(recipe.steps):
                x = random_crops(images, recipe.batch_size, crop, generator)
                target = F.avg_pool2d(x, stride // recipe.readout)
                loss = F.mse_loss(readout(model.encode(x).latents), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            model.eval()
            with torch.no_grad():
                x = random_crops(images, recipe.kmeans_crops, crop, generator)
                latents = torch.cat([model.encode(chunk).latents for chunk in x.split(512)])
                points = latents.permute(0, 2, 3, 1).reshape(-1, channels).float()
                weight = model.quantize.embedding.weight
                weight.copy_(_kmeans(points, model.quantize.n_e, iterations=20).to(weight.dtype))
    finally:
        torch.set_num_threads(threads)
    model.requires_grad_(False)
