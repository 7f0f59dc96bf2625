"""The teacher contract: what every frozen tokenizer does with an image, and its input protocol.

A teacher maps an image in ``[-1, 1]`` to :class:`TeacherTargets` on its own token grid. The
base class owns freezing, eval mode, full precision under autocast and the input protocol
(resize method, value range); subclasses (:mod:`.vq`, :mod:`.features`) bring the backbone.
"""
from __future__ import annotations

import abc
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from onedc.errors import ConfigError, WeightsError

TEACHER_KINDS: tuple[str, ...] = ("vq", "timm", "transformers")

# How the image is resized to the teacher's input: "bilinear" is plain bilinear (no antialias),
# what MaskGIT-VQGAN was fed (docs/reference-model.md §8: an antialiased x1/2 changes 3-9 % of its tokens).
RESIZE_METHODS: tuple[str, ...] = ("bilinear_antialias", "bilinear")
# The protocol teachers had before it became an option: identities
# only name a protocol that differs from it, so existing ones stay valid.
_LEGACY_RANGE = {"vq": (-1.0, 1.0), "feature": (0.0, 1.0)}
_LEGACY_RESIZE = "bilinear_antialias"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


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

        Resizing first, as the reference does (docs/reference-model.md §8); both steps are linear, so the order
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


def _build_random(fn, seed: int, meta: bool) -> nn.Module:
    """Run ``fn`` on the meta device, or seeded with a forked RNG so the caller's RNG is untouched."""
    if meta:
        with torch.device("meta"):
            return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()
