"""Quick training of tiny random VQ tokenizers on bundled photos, cached on disk.

A random tokenizer's codes are noise no student can learn; :func:`quick_train_vq` trains one
for seconds so its codes describe image content (:class:`QuickTrainRecipe` says how), and
:func:`_quick_trained_vq_dir` caches the result under :func:`teacher_cache_dir`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError, OneDCError
from onedc.coding.images import load_image
from onedc.modules.teachers.base import (_LEGACY_RANGE, _LEGACY_RESIZE, _build_random, _check_range, _protocol_suffix,
                                         _resize, _scaled_size, _to_range)
from onedc.modules.teachers.codebook import _kmeans
from onedc.modules.teachers.vq import _vq_stride


# Photos that ship inside scikit-image, used to quick-train tiny VQ tokenizers. The default
# sample-photo validation images (matplotlib's grace_hopper, skimage's motorcycle_right) and
# motorcycle_right's stereo twin motorcycle_left are left out, so the teacher has never seen
# the held-out content its targets are measured on.
QUICK_TRAIN_IMAGES: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
    "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
    "gravel.png")

# Bump when the training procedure changes: it is part of the cache key.
_QUICK_TRAIN_VERSION = 1


def save_quick_trained(model: nn.Module, spec: dict[str, Any], final: Path, what: str) -> Path:
    """Write a quick-trained diffusers ``model`` and its ``spec`` to the cache dir ``final`` atomically.

    A staging dir beside it (onedc.io's naming) is renamed into place; losing a race with another
    builder of the same key is fine. An unwritable cache is a OneDCError naming ONEDC_CACHE.
    """
    staging = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        staging.mkdir(parents=True)
        model.save_pretrained(str(staging))
        (staging / "quick_train.json").write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
        try:
            staging.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race with another builder
                raise
    except OSError as err:
        raise OneDCError(f"cannot write the quick-trained {what} to {final} ({err.strerror or err}); "
                         "set ONEDC_CACHE to a writable folder") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def recipe_from_options(cls: type, options: dict[str, Any], key: str) -> Any:
    """``cls(**options)`` for a quick-train recipe dataclass, naming unknown options of config ``key``.

    ``images`` (a list in YAML) becomes a tuple; the caller checks the values' ranges.
    """
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"unknown {key} option(s) {', '.join(unknown)}; valid options: {', '.join(names)}")
    values = dict(options)
    if "images" in values:
        values["images"] = tuple(str(name) for name in values["images"])
    return cls(**values)


@dataclass(frozen=True)
class QuickTrainRecipe:
    """How :func:`quick_train_vq` trains a random tiny VQ tokenizer (``quick_train`` options).

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

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> QuickTrainRecipe:
        """The recipe of a ``quick_train`` config mapping; unknown keys or bad values raise."""
        recipe = recipe_from_options(cls, options, "quick_train")
        for name in ("steps", "batch_size", "crop", "readout", "kmeans_crops"):
            value = getattr(recipe, name)
            if not (value is None and name == "crop") and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"quick_train.{name} must be a positive integer, got {value!r}")
        if not (isinstance(recipe.lr, (int, float)) and recipe.lr > 0):
            raise ConfigError(f"quick_train.lr must be > 0, got {recipe.lr!r}")
        if not recipe.images:
            raise ConfigError("quick_train.images is empty: give at least one image file")
        return recipe


def teacher_cache_dir() -> Path:
    """Where quick-trained teachers are cached: ``$ONEDC_CACHE/teachers``, else
    ``$XDG_CACHE_HOME/onedc/teachers`` (``~/.cache/onedc/teachers``)."""
    root = os.environ.get("ONEDC_CACHE")
    if root:
        return Path(root).expanduser() / "teachers"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "onedc" / "teachers"


def _quick_train_images(names: Sequence[str], scale: float, crop: int, input_range: tuple[float, float],
                        resize: str) -> list[torch.Tensor]:
    """The recipe's images, resized and ranged by the teacher's protocol exactly as targets() does."""
    skimage_dir = None
    images = []
    for name in names:
        path = Path(name).expanduser()
        if not path.is_file():
            if skimage_dir is None:
                try:
                    import skimage.data
                except ImportError as err:
                    raise ConfigError(f"quick_train image {name!r} is not a file, and scikit-image "
                                      "(whose bundled photos it would name) is not installed") from err
                skimage_dir = Path(skimage.data.__file__).parent
            path = skimage_dir / name
        if not path.is_file():
            raise ConfigError(f"quick_train image {name!r} not found (neither a file nor in "
                              f"{skimage_dir}): give a path or a scikit-image data file name")
        image = load_image(path)[None]
        image = _to_range(_resize(image, _scaled_size(image.shape[-2], image.shape[-1], scale), resize),
                          input_range)[0]
        if min(image.shape[-2:]) < crop:
            raise ConfigError(f"quick_train image {path} is {tuple(image.shape[-2:])} px at input_scale "
                              f"{scale:g}, smaller than the {crop} px training crop")
        images.append(image)
    return images


def _random_crops(images: Sequence[torch.Tensor], count: int, size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size``-px crops (random image, position and horizontal flip)."""
    def draw(high: int) -> int:
        return int(torch.randint(high, (), generator=generator))

    crops = []
    for _ in range(count):
        image = images[draw(len(images))]
        top, left = draw(image.shape[-2] - size + 1), draw(image.shape[-1] - size + 1)
        crop = image[:, top:top + size, left:left + size]
        crops.append(crop.flip(-1) if draw(2) else crop)
    return torch.stack(crops)


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
    images = _quick_train_images(recipe.images, input_scale, crop, value_range, resize)
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
                x = _random_crops(images, recipe.batch_size, crop, generator)
                target = F.avg_pool2d(x, stride // recipe.readout)
                loss = F.mse_loss(readout(model.encode(x).latents), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            model.eval()
            with torch.no_grad():
                x = _random_crops(images, recipe.kmeans_crops, crop, generator)
                latents = torch.cat([model.encode(chunk).latents for chunk in x.split(512)])
                points = latents.permute(0, 2, 3, 1).reshape(-1, channels).float()
                weight = model.quantize.embedding.weight
                weight.copy_(_kmeans(points, model.quantize.n_e, iterations=20).to(weight.dtype))
    finally:
        torch.set_num_threads(threads)
    model.requires_grad_(False)


def _quick_trained_vq_dir(config: dict, seed: int, input_scale: float, tile_size: int | None,
                          recipe: QuickTrainRecipe, protocol: dict[str, Any]) -> Path:
    """The cached diffusers directory of a quick-trained VQModel; trains it on a cache miss.

    The cache key hashes everything the weights depend on (VQModel kwargs, seed, input_scale,
    tile_size, recipe, recipe version). A fresh model is written to a temporary directory and
    renamed into place, so readers never see half a model, and concurrent builders (DDP ranks
    on a cold cache) all end up loading the one directory that won the rename.
    """
    from diffusers import VQModel

    spec = {"version": _QUICK_TRAIN_VERSION, "config": config, "seed": seed,
            "input_scale": input_scale, "tile_size": tile_size, "recipe": asdict(recipe)}
    suffix = _protocol_suffix("vq", **protocol)
    if suffix:  # only a non-default protocol enters the key: existing caches stay valid
        spec["protocol"] = suffix
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = teacher_cache_dir()
    final = root / f"vq-{key}"
    if (final / "config.json").is_file():
        return final
    model = _build_random(lambda: VQModel(**config), seed, meta=False)
    quick_train_vq(model, recipe, seed=seed, input_scale=input_scale, tile_size=tile_size, **protocol)
    return save_quick_trained(model, spec, final, "teacher")
