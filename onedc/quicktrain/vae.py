"""The tiny VAE's recipe: a random ``AutoencoderKL`` trained on the bundled photos.

A random ``AutoencoderKL`` decodes noise (about 10 dB PSNR), so nothing a person can judge comes
out of a tiny-preset run. :func:`quick_train_vae` trains one on photos bundled with scikit-image
(never the sample-photo validation images). It runs offline, in ``python -m onedc.assets.make``,
which ships the result as ``onedc/assets/tiny_vae.safetensors``; ``model=tiny`` only loads it::

    8x8 patches of the photos ─ PCA ─> latent_channels whitened components  (closed form)
    guided:  L1(D(pca(x)), x) + MSE(E(x), pca(x))     decoder and encoder learn apart, each
                                                      against a fixed target: converges fast
    joint:   L1(D(E(x)), x) + anchor·MSE(E(x), pca(x)) the real autoencoder, kept near PCA
    (+ mse_weight·MSE(D(.), x) in both phases)

The PCA anchor gives latents with unit variance per channel and the smooth, image-like layout
the codec's analysis transform expects. What the shipped recipe (onedc.assets.make) adds, each
against a measured fault of the earlier one: a hue-symmetric PCA target (the plain PCA of these
warm photos spends its one chroma channel on red - blue, so green - magenta is the decoder's
guess: a cast); a joint phase on 128 px crops (every GroupNorm normalises over the whole input,
and a decoder trained on 48 px crops only decodes 48 px well: the earlier VAE gave a grey
training photo 37 dB in 48 px tiles and 24.7 dB, with a blue cast, whole); an MSE term (PSNR is
MSE; L1 alone leaves mean biases); scikit-image's colour wheel beside the photos (they hold little
saturated blue, and a decoder that never saw it darkened navy by 13 levels even in small tiles).
Everything is seeded and runs on one CPU thread, so the weights depend neither on the caller's
device nor on its thread count; ``E`` is the posterior mean (the codec encodes deterministically),
so no KL term is trained.
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
RECIPE_VERSION = 3


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
    pca_symmetric: bool = False
    """A PCA target with no hue preferred (:func:`pca_encoder` ``symmetric``): it says both chroma
    axes, where the plain PCA of these warm photos keeps one and the decoder guesses the other."""
    mse_weight: float = 0.0
    """Weight of an MSE term added to the L1 reconstruction loss: L1 alone fits the median, which
    leaves a mean bias where the errors are skewed (a colour cast, dulled highlights); PSNR is MSE."""


def _downsample(model: nn.Module) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


# An orthonormal colour basis: the grey axis, then two opponent (chroma) axes.
_OPPONENT = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]], dtype=torch.float64)
_OPPONENT = _OPPONENT / _OPPONENT.norm(dim=1, keepdim=True)


def pca_encoder(images: list[torch.Tensor], channels: int, patch: int, symmetric: bool = False) -> nn.Conv2d:
    """A strided conv giving the ``channels`` leading whitened PCA components of ``patch`` px patches.

    Fitted in closed form on the non-overlapping patches of ``images``; each output channel has
    zero mean and unit variance over them. ``symmetric``: the PCA of the photos with every hue
    equally likely (their covariance averaged over all rotations of the chroma plane). It splits
    into a spatial PCA of the grey (luma) component and one of the chroma, each chroma component
    once per opponent axis with the same variance: on photos whose luma gradients vary less than
    their mean colour, the leading four are luma mean, both chroma means and one luma gradient,
    where the plain PCA keeps one chroma axis and drops the other (a colour the latent cannot say).
    """
    rows = [F.unfold(im[None, :, : im.shape[-2] // patch * patch, : im.shape[-1] // patch * patch],
                     patch, stride=patch)[0].T for im in images]
    points = torch.cat(rows).double()
    if not symmetric:
        mean = points.mean(0)
        _, singular, basis = torch.linalg.svd(points - mean, full_matrices=False)
        std = singular[:channels] / math.sqrt(points.shape[0] - 1)
        weight = basis[:channels] / std[:, None]
    else:
        # (N, 3, p*p) in the opponent basis: luma plane and two chroma planes.
        planes = torch.einsum("ck,nkp->ncp", _OPPONENT, points.reshape(len(points), 3, -1))
        luma, chroma = planes[:, 0], planes[:, 1:].reshape(-1, planes.shape[-1])
        # Averaged over hue rotations the chroma mean is 0 and both axes share one covariance.
        luma_mean = luma.mean(0)
        luma_var, luma_vec = torch.linalg.eigh(torch.cov((luma - luma_mean).T, correction=1))
        chroma_var, chroma_vec = torch.linalg.eigh(chroma.T @ chroma / (len(chroma) - 1))
        candidates = [(float(v), 0, vec) for v, vec in zip(luma_var, luma_vec.T)]
        candidates += [(float(v), axis, vec) for v, vec in zip(chroma_var, chroma_vec.T) for axis in (1, 2)]
        candidates.sort(key=lambda c: (-c[0], c[1]))
        rows = []
        for var, axis, vec in candidates[:channels]:
            vec = vec if vec.sum() >= 0 else -vec  # a fixed sign: positive mean weight
            rows.append(torch.outer(_OPPONENT[axis], vec).flatten() / math.sqrt(var))
        weight = torch.stack(rows)
        mean = torch.einsum("c,p->cp", _OPPONENT[0], luma_mean).flatten()  # grey: the chroma mean is 0
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
            target = pca_encoder(images, int(model.config.latent_channels), stride, symmetric=recipe.pca_symmetric)
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
                decoded = model.decode(pca if guided else latent).sample
                loss = (decoded - x).abs().mean() + (1.0 if guided else recipe.anchor) * F.mse_loss(latent, pca)
                if recipe.mse_weight:
                    loss = loss + recipe.mse_weight * F.mse_loss(decoded, x)
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
