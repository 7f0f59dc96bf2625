"""Codebook initialisation of tiny random VQ teachers: k-means over latents of structured pseudo-images."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pseudo_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed batch of structured images in [-1, 1]: smooth colour fields, ramps and stripes.

    Used only to give a randomly initialised VQ tokenizer a codebook that covers the latents
    real images produce; pure noise would not, because its encoder latents all look alike.
    """
    images = []
    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    for i in range(count):
        res = (2, 4, 8)[i % 3]
        field = torch.rand(1, 3, res, res, generator=generator) * 2 - 1
        img = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=False)[0]
        angle = torch.rand((), generator=generator) * math.pi
        freq = 1.0 + 6.0 * torch.rand((), generator=generator)
        wave = torch.sin(freq * math.pi * (xx * torch.cos(angle) + yy * torch.sin(angle)))
        colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        img = img + 0.5 * (i % 2) * wave * colour
        images.append(img.clamp(-1.0, 1.0))
    return torch.stack(images)


@torch.no_grad()
def _init_codebook_from_data(model: nn.Module, seed: int, iterations: int = 10) -> None:
    """Spread a random VQModel's codebook over the latents of a fixed pseudo-image batch.

    Tiny random teachers only (``pretrained=None``; real teachers bring trained codebooks).
    diffusers initialises codes uniformly in ``±1/K`` around the origin while a random
    encoder's latents sit far from it, so the nearest code is decided by a few directions and
    mostly by token position: the tiny test teacher used 7 of 16 codes and ~3 codes per token
    position across varied images. A few k-means iterations (farthest-point seeded, all
    deterministic from ``seed``) place the codes where latents fall: all 16 codes, ~8 per
    position. It runs on CPU before any device move, so a random teacher is bit-identical on
    every device; for a full-size random preset (1024 codes) that is about a minute of CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    # The encoder is convolutional: small images keep the init cheap for full-size presets.
    size = min(int(model.config.sample_size), 64)
    dim, num_codes = model.quantize.vq_embed_dim, model.quantize.n_e
    chunks, count = [], 0
    while count < max(768, 2 * num_codes):
        latent = model.encode(_pseudo_images(16, size, generator)).latents
        chunks.append(latent.permute(0, 2, 3, 1).reshape(-1, dim).float())
        count += chunks[-1].shape[0]
    weight = model.quantize.embedding.weight
    weight.copy_(_kmeans(torch.cat(chunks), num_codes, iterations).to(weight.dtype))


def _kmeans(points: torch.Tensor, num_codes: int, iterations: int) -> torch.Tensor:
    """(K, C) k-means centres of ``points`` (N, C), farthest-point seeded: no randomness at all.

    The seeding starts at the point nearest the mean and adds the point farthest from all centres
    so far, so it covers the extremes of the cloud; an emptied cluster keeps its centre.
    """
    chosen = [int(torch.argmin(torch.cdist(points.mean(0, keepdim=True), points)))]
    dist = torch.cdist(points[chosen[0]][None], points)[0]
    while len(chosen) < num_codes:
        chosen.append(int(torch.argmax(dist)))
        dist = torch.minimum(dist, torch.cdist(points[chosen[-1]][None], points)[0])
    codes = points[chosen].clone()
    for _ in range(iterations):
        assign = torch.argmin(torch.cdist(points, codes), dim=1)
        sums = torch.zeros_like(codes).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=num_codes).to(codes.dtype)[:, None]
        codes = torch.where(counts > 0, sums / counts.clamp_min(1), codes)
    return codes
