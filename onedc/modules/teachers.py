"""Frozen generative-tokenizer teachers that produce the semantic-distillation targets.

OneDC trains the hyperprior's semantic features to predict what a pretrained tokenizer sees in
the image (design §2). The teacher is swappable; every teacher maps an image in ``[-1, 1]`` to
a :class:`TeacherTargets` on its own token grid::

    x (B,3,H,W) in [-1,1]
      -> resize by input_scale (`resize`: bilinear_antialias | bilinear), map to `input_range`
         (VQ: what the tokenizer was trained on; feature teachers: [0,1], then mean/std)
      -> VQ tokenizer      : encoder -> quant_conv -> nearest code -> indices (B,h,w), z_q (B,C,h,w)
      -> feature backbone  : ViT patch tokens (prefix tokens dropped)  -> features (B,C,h,w)

Three implementations: :class:`VQTeacher` (diffusers ``VQModel``, e.g. MaskGIT-VQGAN: f16 on the
image downsampled x2 gives a token grid at 1/32), :class:`TimmFeatureTeacher` (any timm ViT such
as DINOv2) and :class:`TransformersFeatureTeacher` (transformers vision models such as DINOv2).
:func:`build_teacher` builds one from the plain-dict contents of a ``configs/tokenizer/*.yaml``.

Tiny VQ presets are random VQModels; a random tokenizer's codes are noise that no student can
learn, so ``quick_train`` (:class:`QuickTrainRecipe`) trains one briefly on photos bundled with
scikit-image and caches it on disk (:func:`teacher_cache_dir`), and ``tile_size`` makes its codes
depend on their own patch only (:class:`VQTeacher`).

A teacher is frozen for good: no parameter requires grad and ``train()`` keeps it in eval mode,
so targets stay a fixed function of the image for the whole run. ``identity`` names the teacher
(weights content hash, or architecture + seed for random weights) so a stage can refuse to
resume a checkpoint whose predictor head was trained against another teacher.
"""
from __future__ import annotations

import abc
import hashlib
import inspect
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError, OneDCError, WeightsError
from onedc.modules.state_dict_files import STATE_DICT_SUFFIXES, load_state_dict_file, read_state_dict

log = logging.getLogger("onedc")

__all__ = [
    "QUICK_TRAIN_IMAGES",
    "RESIZE_METHODS",
    "TEACHER_KINDS",
    "QuickTrainRecipe",
    "Teacher",
    "TeacherTargets",
    "TimmFeatureTeacher",
    "TransformersFeatureTeacher",
    "VQTeacher",
    "build_teacher",
    "quick_train_vq",
    "teacher_cache_dir",
]

TEACHER_KINDS: tuple[str, ...] = ("vq", "timm", "transformers")

# How the image is resized to the teacher's input: "bilinear" is plain bilinear (no antialias),
# what MaskGIT-VQGAN was fed (REFERENCE §8: an antialiased x1/2 changes 3-9 % of its tokens).
RESIZE_METHODS: tuple[str, ...] = ("bilinear_antialias", "bilinear")
# The protocol teachers had before it became an option: identities and quick-train cache keys
# only name a protocol that differs from it, so existing ones stay valid.
_LEGACY_RANGE = {"vq": (-1.0, 1.0), "feature": (0.0, 1.0)}
_LEGACY_RESIZE = "bilinear_antialias"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Files whose content defines a saved model directory; hashed into the teacher identity.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class TeacherTargets(NamedTuple):
    """Distillation targets of one image batch on the teacher's token grid."""

    indices: torch.Tensor | None
    """(B, h, w) int64 codebook indices for VQ teachers; None for feature teachers."""
    latents: torch.Tensor
    """(B, C, h, w) float32: quantised latent (VQ) or patch features (feature teachers)."""


class Teacher(nn.Module, abc.ABC):
    """A frozen tokenizer that turns images into distillation targets.

    Subclasses set up their backbone and implement :meth:`_targets`; this base class owns the
    chores every teacher shares: freezing, staying in eval mode, refusing meta-device use,
    running in full precision even under autocast, the ``[-1, 1]`` input contract, and the
    input protocol: resize method (``resize``, one of :data:`RESIZE_METHODS`) and the value
    range the backbone expects (``input_range``; None = the kind's historic default, [-1, 1]
    for VQ and [0, 1] for feature teachers).
    """

    kind: str
    target_dim: int
    num_codes: int | None
    identity: str
    input_scale: float
    input_range: tuple[float, float]
    resize: str

    def __init__(self, *, kind: str, target_dim: int, num_codes: int | None, identity: str,
                 input_scale: float, input_range: Sequence[float] | None = None,
                 resize: str = _LEGACY_RESIZE) -> None:
        super().__init__()
        if not input_scale > 0:
            raise ConfigError(f"teacher input_scale must be > 0, got {input_scale}")
        self.kind = kind
        self.target_dim = int(target_dim)
        self.num_codes = None if num_codes is None else int(num_codes)
        self.identity = identity
        self.input_scale = float(input_scale)
        self.input_range = _check_range(_LEGACY_RANGE[kind] if input_range is None else input_range)
        if resize not in RESIZE_METHODS:
            raise ConfigError(f"unknown teacher resize {resize!r}; valid: {', '.join(RESIZE_METHODS)}")
        self.resize = resize

    def _prepare(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``x`` in [-1, 1] resized to ``size`` by the teacher's method, then mapped to its range.

        Resizing first, as the reference does (REFERENCE §8); both steps are linear, so the order
        only changes float rounding.
        """
        return _to_range(_resize(x, size, self.resize), self.input_range)

    def _freeze(self) -> None:
        """Called by subclasses once all submodules exist."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Ignore ``mode``: a teacher stays in eval mode so its targets never change.

        Parent modules call ``train()`` recursively at the start of every fit loop; dropout or
        batch-norm statistic updates in the teacher would silently change the targets.
        """
        return super().train(False)

    @property
    def is_meta(self) -> bool:
        """True when built on the meta device (architecture only, for parameter counting)."""
        return any(p.is_meta for p in self.parameters())

    def codebook(self) -> torch.Tensor | None:
        """The (K, C) codebook of a VQ teacher (its embedding weight); None for feature teachers."""
        return None

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> TeacherTargets:
        """Targets for an image batch ``x`` of shape (B, 3, H, W) with values in ``[-1, 1]``.

        The teacher resizes and normalises the image itself. It runs with autocast disabled and
        in its parameters' dtype: a bf16 autocast region around a VQ encoder flips nearest-code
        decisions, which would make the targets depend on the training precision.
        """
        if self.is_meta:
            raise WeightsError(
                f"teacher {self.identity} was built on the meta device (architecture only, for "
                "parameter counting); build it with a real device to compute targets")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"teacher expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        param = next(self.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        with torch.autocast(device_type=param.device.type, enabled=False):
            out = self._targets(x)
        return TeacherTargets(out.indices, out.latents.float())

    @abc.abstractmethod
    def _targets(self, x: torch.Tensor) -> TeacherTargets:
        """Targets for ``x`` in ``[-1, 1]``, already on the teacher's device and dtype."""

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, target_dim={self.target_dim}, num_codes={self.num_codes}, "
                f"input_scale={self.input_scale}, input_range={self.input_range}, resize={self.resize!r}, "
                f"identity={self.identity!r}")


def _to_range(x: torch.Tensor, input_range: tuple[float, float]) -> torch.Tensor:
    """``x`` mapped affinely from [-1, 1] to ``input_range`` ([0, 1]: x * 0.5 + 0.5, as in §8)."""
    low, high = input_range
    return x if (low, high) == (-1.0, 1.0) else x * ((high - low) / 2) + (high + low) / 2


def _check_range(values: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not low < high:
        raise ConfigError(f"teacher input_range must be [low, high] with low < high, e.g. [0, 1]; got {values!r}")
    return low, high


def _protocol_suffix(kind: str, input_range: Sequence[float] | None = None,
                     resize: str = _LEGACY_RESIZE) -> str:
    """The identity/cache-key suffix of an input protocol; empty for the historic default."""
    group = "vq" if kind == "vq" else "feature"
    value = _LEGACY_RANGE[group] if input_range is None else _check_range(input_range)
    parts = []
    if tuple(value) != _LEGACY_RANGE[group]:
        parts.append(f":range={value[0]:g},{value[1]:g}")
    if resize != _LEGACY_RESIZE:
        parts.append(f":resize={resize}")
    return "".join(parts)


def _scaled_size(height: int, width: int, scale: float, multiple: int = 1) -> tuple[int, int]:
    """(H, W) times ``scale``, rounded to the nearest positive multiple of ``multiple``."""
    def one(n: int) -> int:
        return max(multiple, int(round(n * scale / multiple)) * multiple)
    return one(height), one(width)


def _resize(x: torch.Tensor, size: tuple[int, int], method: str = _LEGACY_RESIZE) -> torch.Tensor:
    """Bilinear resize (align_corners False), antialiased unless ``method`` is plain "bilinear".

    Antialias avoids aliasing when downsampling, but a teacher must see what it was trained on.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                         antialias=method == "bilinear_antialias")


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


class _FeatureTeacher(Teacher):
    """Shared input handling of the ViT feature teachers: resize, [-1,1] -> input_range -> mean/std."""

    def __init__(self, *, target_dim: int, identity: str, input_scale: float,
                 mean: Sequence[float], std: Sequence[float], **protocol: Any) -> None:
        super().__init__(kind="feature", target_dim=target_dim, num_codes=None, identity=identity,
                         input_scale=input_scale, **protocol)
        # Non-persistent: the statistics come from the backbone's config, not from checkpoints.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def _normalise(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return (self._prepare(x, size) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @staticmethod
    def _tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, prefix + h*w, C) -> (B, C, h, w), dropping the leading CLS/register tokens."""
        prefix = tokens.shape[1] - height * width
        if prefix < 0:
            raise RuntimeError(f"backbone returned {tokens.shape[1]} tokens, fewer than the "
                               f"{height}x{width} patch grid")
        patches = tokens[:, prefix:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class TimmFeatureTeacher(_FeatureTeacher):
    """A timm backbone (e.g. ``vit_base_patch14_dinov2``) whose patch tokens are the targets.

    The normalisation comes from the model's ``pretrained_cfg``. A ViT built with
    ``dynamic_img_size=True`` sees the image at ``input_scale`` rounded to whole patches; a
    fixed-size ViT (the timm default) needs exactly its ``img_size``, so the image is resized to
    that (the aspect ratio is then not kept). CNN backbones' ``forward_features`` already return
    a (B, C, h, w) map and are used as is.
    """

    def __init__(self, model: nn.Module, *, identity: str, input_scale: float = 0.5, **protocol: Any) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(target_dim=model.num_features, identity=identity, input_scale=input_scale,
                         mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD), **protocol)
        self.model = model
        self._freeze()

    def _input_size(self, height: int, width: int) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None:
            return _scaled_size(height, width, self.input_scale)
        if getattr(patch_embed, "strict_img_size", False):
            return tuple(patch_embed.img_size)
        return _scaled_size(height, width, self.input_scale, multiple=patch_embed.patch_size[0])

    def _targets(self, x: torch.Tensor) -> TeacherTargets:
        size = self._input_size(x.shape[-2], x.shape[-1])
        feats = self.model.forward_features(self._normalise(x, size))
        if feats.ndim == 4:
            return TeacherTargets(None, feats)
        patch = self.model.patch_embed.patch_size
        grid = self._tokens_to_grid(feats, size[0] // patch[0], size[1] // patch[1])
        return TeacherTargets(None, grid)


class TransformersFeatureTeacher(_FeatureTeacher):
    """A transformers vision backbone (e.g. ``Dinov2Model``) whose patch tokens are the targets.

    The image is resized by ``input_scale`` to whole patches; DINOv2 interpolates its position
    embeddings to any grid (ViT-style models get ``interpolate_pos_encoding=True``). The leading
    CLS and register tokens of ``last_hidden_state`` are dropped.
    """

    def __init__(self, model: nn.Module, *, identity: str, input_scale: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, **protocol: Any) -> None:
        super().__init__(target_dim=model.config.hidden_size, identity=identity,
                         input_scale=input_scale, mean=mean, std=std, **protocol)
        self.model = model
        patch = model.config.patch_size
        self.patch_size: tuple[int, int] = tuple(patch) if isinstance(patch, Sequence) else (patch, patch)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self._freeze()

    def _targets(self, x: torch.Tensor) -> TeacherTargets:
        ph, pw = self.patch_size
        height = _scaled_size(x.shape[-2], x.shape[-1], self.input_scale, multiple=ph)[0]
        width = _scaled_size(x.shape[-2], x.shape[-1], self.input_scale, multiple=pw)[1]
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=self._normalise(x, (height, width)), **kwargs)
        return TeacherTargets(None, self._tokens_to_grid(out.last_hidden_state, height // ph, width // pw))


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------

def _sha256_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _weights_identity(cls: type, path: Path, input_scale: float) -> str:
    """Identity from weights content, not location: moving the weights keeps the identity."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    else:
        files = [path]
    return f"{cls.__name__}:sha256={_sha256_files(files)}:scale={input_scale:g}"


def _random_identity(cls: type, spec: dict[str, Any], seed: int, input_scale: float) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return (f"{cls.__name__}:random:cfg={hashlib.sha256(blob).hexdigest()[:12]}:seed={seed}"
            f":scale={input_scale:g}")


# --------------------------------------------------------------------------------------------
# Random-teacher codebook initialisation (tiny random teachers only)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Quick training of tiny random VQ tokenizers (cached on disk)
# --------------------------------------------------------------------------------------------

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
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"unknown quick_train option(s) {', '.join(unknown)}; "
                              f"valid options: {', '.join(names)}")
        values = dict(options)
        if "images" in values:
            values["images"] = tuple(str(name) for name in values["images"])
        recipe = cls(**values)
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


def _read_rgb(path: Path) -> torch.Tensor:
    """One image file as a (3, H, W) float32 tensor in [-1, 1]; grayscale is repeated to RGB."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1) / 127.5 - 1.0


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
        image = _read_rgb(path)[None]
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
    # Same naming and umask-respecting mode as onedc.io's atomic file writes, for a directory.
    staging = root / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
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
        raise OneDCError(f"cannot write the quick-trained teacher to {final} ({err.strerror or err}); "
                         "set ONEDC_CACHE to a writable folder") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def _build_random(fn, seed: int, meta: bool) -> nn.Module:
    """Run ``fn`` on the meta device, or seeded with a forked RNG so the caller's RNG is untouched."""
    if meta:
        with torch.device("meta"):
            return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _check_path(path: Path, expected: str) -> None:
    if not path.exists():
        raise WeightsError(f"teacher weights not found at {path}: expected {expected}")


_VQ_FORMAT = ("a diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors), "
              "a .safetensors/.bin/.pt state-dict file of the VQModel described by `config`, or the "
              "original MaskGIT-VQGAN .bin (converted on load; `onedc import-reference --tokenizer` "
              "converts it once)")


def _build_vq(pretrained: str | None, config: dict | None, seed: int, input_scale: float,
              meta: bool, tile_size: int | None = None,
              quick_train: QuickTrainRecipe | None = None,
              protocol: dict[str, Any] | None = None) -> VQTeacher:
    from diffusers import VQModel

    protocol = protocol or {}

    def teacher(model: nn.Module, identity: str) -> VQTeacher:
        if tile_size is not None and not identity.endswith(":meta"):
            identity += f":tile={tile_size}"
        return VQTeacher(model, identity=identity, input_scale=input_scale, tile_size=tile_size, **protocol)

    def from_config() -> nn.Module:
        if config is None:
            raise ConfigError("vq teacher needs `config` (diffusers VQModel kwargs) to build a random "
                              "VQModel or to load a state-dict file; or give a diffusers directory")
        try:
            return VQModel(**config)
        except TypeError as err:
            raise ConfigError(f"vq teacher config is not valid VQModel kwargs: {err}") from err

    if pretrained is None and quick_train is not None and not meta:
        teacher(_build_random(from_config, seed, meta=True), "check")  # bad options fail before training
        path = _quick_trained_vq_dir(config, seed, input_scale, tile_size, quick_train, protocol)
        # Loaded back with the real loader, so a cold and a cached build give the same model;
        # the identity is the weights' content hash, as for any pretrained directory.
        try:
            model = VQModel.from_pretrained(str(path))
        except Exception as err:
            raise WeightsError(f"cannot load the cached quick-trained tokenizer {path} ({err}); "
                               "delete that directory to retrain it") from err
        return teacher(model, _weights_identity(VQTeacher, path, input_scale))
    if pretrained is None:
        model = _build_random(from_config, seed, meta)
        if meta:
            return teacher(model, "VQTeacher:meta")
        _init_codebook_from_data(model, seed)
        spec = {"config": config, "codebook": "kmeans-pseudo-images-v1"}
        return teacher(model, _random_identity(VQTeacher, spec, seed, input_scale))

    path = Path(pretrained)
    _check_path(path, _VQ_FORMAT)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"teacher weights dir {path} has no config.json: expected {_VQ_FORMAT}")
        try:
            if meta:
                arch = VQModel.load_config(str(path))
                model = _build_random(lambda: VQModel.from_config(arch), seed, meta=True)
            else:
                model = VQModel.from_pretrained(str(path))
        except Exception as err:
            raise WeightsError(f"cannot load VQModel from {path} ({err}): expected {_VQ_FORMAT}") from err
    elif path.suffix not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"teacher weights {path} have an unknown suffix: expected {_VQ_FORMAT}")
    elif meta:
        model = _build_random(from_config, seed, meta=True)
    else:
        from onedc.modules.maskgit import is_maskgit_state_dict, maskgit_vqmodel

        state = read_state_dict(path, expected=_VQ_FORMAT)
        if is_maskgit_state_dict(state):
            log.info("tokenizer %s is a MaskGIT-VQGAN state dict: converting it to a diffusers VQModel "
                     "(REFERENCE §8); `onedc import-reference --tokenizer %s -o DIR` does this once", path, path)
            model = maskgit_vqmodel(state, path=path)
        else:
            model = load_state_dict_file(_build_random(from_config, seed, meta=True), path,
                                         what="the VQModel of `config`", expected=_VQ_FORMAT, state=state)
    return teacher(model, "VQTeacher:meta" if meta else _weights_identity(VQTeacher, path, input_scale))


def _build_timm(pretrained: str | None, model_name: str | None, model_kwargs: dict | None,
                seed: int, input_scale: float, meta: bool, protocol: dict[str, Any]) -> TimmFeatureTeacher:
    import timm

    if not model_name:
        raise ConfigError("timm teacher needs `model_name` (e.g. vit_base_patch14_dinov2)")
    kwargs = dict(model_kwargs or {})
    expected = (f"a .safetensors/.pth/.bin weights file of timm model {model_name!r} without "
                "classifier head (num_classes=0)")

    def make(weights: Path | None) -> nn.Module:
        # timm's own local-file route: the file replaces the hub source in the pretrained
        # config, so the model's checkpoint filter (pos-embed resampling, layout conversion)
        # still applies. num_classes=0 in the overlay keeps timm's load strict (timm relaxes
        # strictness when model and weights class counts differ), so a wrong file cannot load
        # half-way.
        load = (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=0))
                if weights is not None else dict(pretrained=False))
        try:
            return timm.create_model(model_name, num_classes=0, **load, **kwargs)
        except Exception as err:
            if weights is not None:
                raise WeightsError(f"cannot load {weights} into timm model {model_name!r} "
                                   f"({err}): expected {expected}") from err
            raise ConfigError(f"cannot build timm model {model_name!r} with {kwargs} ({err})") from err

    if pretrained is None or meta:
        model = _build_random(lambda: make(None), seed, meta)
        identity = ("TimmFeatureTeacher:meta" if meta else _random_identity(
            TimmFeatureTeacher, {"model_name": model_name, "model_kwargs": kwargs}, seed, input_scale))
        return TimmFeatureTeacher(model, identity=identity, input_scale=input_scale, **protocol)

    path = Path(pretrained)
    _check_path(path, expected)
    if not path.is_file():
        raise WeightsError(f"teacher weights {path} is not a file: expected {expected}")
    model = make(path)
    return TimmFeatureTeacher(model, identity=_weights_identity(TimmFeatureTeacher, path, input_scale),
                              input_scale=input_scale, **protocol)


def _processor_stats(path: Path) -> tuple[Sequence[float], Sequence[float]]:
    """Image mean/std from a saved ``preprocessor_config.json``, ImageNet statistics otherwise."""
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        data = json.loads(proc.read_text())
        if "image_mean" in data and "image_std" in data:
            return data["image_mean"], data["image_std"]
    return IMAGENET_MEAN, IMAGENET_STD


def _build_transformers(pretrained: str | None, config: dict | None, seed: int,
                        input_scale: float, meta: bool, protocol: dict[str, Any]) -> TransformersFeatureTeacher:
    from transformers import AutoConfig, AutoModel

    expected = "a transformers model directory (config.json + model.safetensors), e.g. a saved DINOv2"
    if pretrained is None:
        if not config or "model_type" not in config:
            raise ConfigError("transformers teacher needs `config` with a `model_type` (e.g. dinov2) "
                              "or `pretrained` (a saved model directory)")
        try:
            model_config = AutoConfig.for_model(**config)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"transformers teacher config is not valid ({err})") from err
        model = _build_random(lambda: AutoModel.from_config(model_config), seed, meta)
        identity = ("TransformersFeatureTeacher:meta" if meta else _random_identity(
            TransformersFeatureTeacher, {"config": config}, seed, input_scale))
        return TransformersFeatureTeacher(model, identity=identity, input_scale=input_scale, **protocol)

    path = Path(pretrained)
    _check_path(path, expected)
    if not (path / "config.json").is_file():
        raise WeightsError(f"teacher weights dir {path} has no config.json: expected {expected}")
    try:
        if meta:
            model_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            model = _build_random(lambda: AutoModel.from_config(model_config), seed, meta=True)
        else:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise WeightsError(f"cannot load a transformers model from {path} ({err}): "
                           f"expected {expected}") from err
    mean, std = _processor_stats(path)
    return TransformersFeatureTeacher(
        model, identity=_weights_identity(TransformersFeatureTeacher, path, input_scale),
        input_scale=input_scale, mean=mean, std=std, **protocol)


def build_teacher(kind: str, *, pretrained: str | None = None, config: dict | None = None,
                  model_name: str | None = None, model_kwargs: dict | None = None, seed: int = 0,
                  input_scale: float = 0.5, allow_random: bool = True,
                  tile_size: int | None = None, quick_train: dict[str, Any] | None = None,
                  input_range: Sequence[float] | None = None, resize: str = _LEGACY_RESIZE,
                  device: str | torch.device | None = None) -> Teacher:
    """Build a frozen teacher of ``kind`` ("vq", "timm" or "transformers") from plain options.

    The options are those of a ``configs/tokenizer/*.yaml`` file. ``pretrained`` is a local path
    (VQ: diffusers VQModel dir, state-dict file of the VQModel in ``config``, or the original
    MaskGIT-VQGAN ``.bin``, converted on load; timm: weights file for ``model_name``;
    transformers: saved model dir); ``None`` builds random weights,
    deterministically from ``seed`` and without touching the global RNG, and is refused when
    ``allow_random`` is False. VQ only: ``tile_size`` encodes the image in independent tiles
    (see :class:`VQTeacher`), and ``quick_train`` (options of :class:`QuickTrainRecipe`) trains
    such a random tokenizer briefly so its codes describe image content like a real tokenizer's;
    the result is cached under :func:`teacher_cache_dir` and its identity is its weights' content
    hash. ``input_range`` (None = [-1, 1] for VQ, [0, 1] for feature teachers) and ``resize``
    (:data:`RESIZE_METHODS`) are the input protocol; a non-default one is part of the identity.
    ``device="meta"`` builds the architecture only, for counting
    parameters of full-size presets; such a teacher cannot compute targets. Bad options raise
    :class:`ConfigError`, missing or unfitting weights :class:`WeightsError`.
    """
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"unknown teacher kind {kind!r}; valid kinds: {', '.join(TEACHER_KINDS)}")
    unused = {"vq": ("model_name", "model_kwargs"), "timm": ("config", "tile_size", "quick_train"),
              "transformers": ("model_name", "model_kwargs", "tile_size", "quick_train")}[kind]
    given = {"config": config, "model_name": model_name, "model_kwargs": model_kwargs,
             "tile_size": tile_size, "quick_train": quick_train}
    stray = [name for name in unused if given[name]]
    if stray:
        raise ConfigError(f"teacher kind {kind!r} does not use {', '.join(stray)}; "
                          "did you mix options of two tokenizer configs?")
    meta = device is not None and torch.device(device).type == "meta"
    if pretrained is None and not allow_random and not meta:
        raise WeightsError(f"the {kind} teacher has no pretrained weights and random teachers are "
                           f"not allowed here: set tokenizer.pretrained=/path/to/weights "
                           f"({'a model dir' if kind != 'timm' else 'a weights file'})")
    pretrained = None if pretrained is None else str(Path(pretrained).expanduser())
    protocol = {"input_range": None if input_range is None else _check_range(input_range),
                "resize": str(resize)}
    if kind == "vq":
        recipe = None if quick_train is None else QuickTrainRecipe.from_options(dict(quick_train))
        tile = None if tile_size is None else int(tile_size)
        teacher: Teacher = _build_vq(pretrained, config, seed, input_scale, meta, tile, recipe, protocol)
    elif kind == "timm":
        teacher = _build_timm(pretrained, model_name, model_kwargs, seed, input_scale, meta, protocol)
    else:
        teacher = _build_transformers(pretrained, config, seed, input_scale, meta, protocol)
    if not meta:  # the same weights fed differently give other targets: another teacher
        teacher.identity += _protocol_suffix(teacher.kind, input_range, teacher.resize)
    if device is not None and not meta:
        teacher = teacher.to(device)
    return teacher
