"""Image files in and out: the one place onedc decodes and writes pictures.

::

    file ──Pillow open + load (eager: truncation fails here) ──EXIF orientation──► any mode
         ──_to_unit_rgb: 16-bit /65535, alpha over white, gray ×3──► float32 (3, H, W) in [-1, 1]
    bytes (JPEG/WebP baseline) ──decode_uint8──► uint8 (3, H, W)
    float (3, H, W) in [-1, 1] ──to_uint8 (round, as an 8-bit file stores it)──► save_image: PNG, atomic

Every reading failure, a missing file included, is an :class:`~onedc.errors.ImageReadError`
naming the file. Base layer (see docs/architecture.md): imports only errors, io, numpy,
Pillow and torch, so the ``onedc compress`` path never pulls in Lightning for a PNG.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from onedc.errors import ImageReadError, OneDCError
from onedc.io import atomic_write

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_TRANSPARENT_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _read_error(path: Path, exc: BaseException) -> ImageReadError:
    """Turn whatever Pillow raised into the one error type callers handle, naming the file."""
    if isinstance(exc, FileNotFoundError):
        reason, advice = "no such file", "Check the path"
    elif isinstance(exc, IsADirectoryError):
        reason, advice = "it is a directory", "Pass an image file"
    elif isinstance(exc, Image.UnidentifiedImageError):
        reason, advice = "not an image format Pillow recognises", "Remove or convert the file"
    else:
        reason = f"corrupt or truncated file ({type(exc).__name__}: {exc})"
        advice = "Re-export or remove the file, or set data.skip_bad=true to drop unreadable files with a warning"
    return ImageReadError(f"cannot read image {path}: {reason}. {advice}.")


def _to_unit_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to a float32 (H, W, 3) array in [0, 1], alpha over white."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Pillow opens 16-bit grayscale PNG/TIFF as I;16 (or I in older releases); going
        # through convert("L") would clip at 255 instead of scaling, so scale by 65535 here.
        gray = np.clip(np.asarray(image).astype(np.float32) / 65535.0, 0.0, 1.0)
    elif mode == "F":
        # Float images carry no declared range; [0, 1] is the common convention.
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    else:
        gray = None
    if gray is not None:
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _TRANSPARENT_MODES or "transparency" in image.info:
        # convert("RGBA") also applies palette/tRNS transparency; compositing on white keeps
        # transparent regions from turning black, which is what viewers show.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> Tensor:
    """Read one image file into a float32 tensor of shape (3, H, W) with values in [-1, 1].

    Any Pillow mode is accepted: grayscale (L, I;16, I, F) is repeated over three channels,
    16-bit data is scaled by 65535 (not 255), images with alpha or palette transparency are
    composited on white, and the EXIF orientation is applied. Truncated files are decoded
    eagerly, so they fail here (this relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being
    left False, which onedc never changes). Every failure, including a missing file, raises
    :class:`~onedc.errors.ImageReadError` with a message naming ``path``.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            # Pillow decodes lazily; load() inside the try makes truncation fail here.
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_unit_rgb(image)
    # Pillow's format plugins raise a wide variety of types for corrupt data (OSError,
    # SyntaxError, ValueError, struct.error, ...); all of them mean "unreadable file".
    except Exception as exc:  # noqa: BLE001
        raise _read_error(path, exc) from exc
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))) * 2.0 - 1.0


def decode_image(data: bytes, name: str) -> Tensor:
    """Decode encoded image bytes like :func:`load_image` decodes a file: float32 (3, H, W) in [-1, 1].

    The same mode handling (16-bit, alpha over white, EXIF orientation); any failure, empty
    data included, raises :class:`~onedc.errors.ImageReadError` naming ``name`` (a sample key).
    """
    try:
        if not data:
            raise ValueError("no image bytes")
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_unit_rgb(image)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise _read_error(Path(name), exc) from exc
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))) * 2.0 - 1.0


def probe_short_side(path: Path, full_decode: bool) -> int:
    """Open ``path`` once and return its short side; raise ImageReadError if unreadable.

    ``full_decode`` decodes the pixels (catches truncation); otherwise only the header is
    verified, which is what a large folder can afford at set-up.
    """
    try:
        with Image.open(path) as image:
            short_side = min(image.size)  # EXIF rotation swaps sides but keeps the minimum
            if full_decode:
                image.load()
            else:
                image.verify()
    except Exception as exc:  # noqa: BLE001 - see load_image
        raise _read_error(path, exc) from exc
    return short_side


def list_images(root: str | Path) -> list[Path]:
    """List the image files under ``root``, recursively, sorted by relative path.

    A file counts as an image when its suffix is one of :data:`IMAGE_SUFFIXES` (compared
    case-insensitively). Hidden files and folders (names starting with ".") are left out,
    because they are editor or OS debris such as macOS ``._photo.jpg`` resource forks, which
    carry an image suffix but are not images. Raises :class:`~onedc.errors.OneDCError` naming
    ``root`` when it is not a folder or holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise OneDCError(f"image folder {root} does not exist or is not a folder. Check the path.")
    files = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    ]
    if not files:
        raise OneDCError(
            f"image folder {root} holds no images (looked recursively for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}). Put images there or pass another folder."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def decode_uint8(data: bytes) -> Tensor:
    """Decode the bytes of an image file (JPEG/WebP baselines) into a uint8 (3, H, W) tensor."""
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def to_uint8(image: Tensor) -> Tensor:
    """(3, H, W) image in [-1, 1] -> (3, H, W) uint8, rounded as when saved to an 8-bit file (NaN -> 0)."""
    return ((image.detach().float().cpu().nan_to_num() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_image(image: Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) image in [-1, 1] as an 8-bit RGB PNG at ``path``, atomically."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    array = to_uint8(image).permute(1, 2, 0).contiguous().numpy()
    return atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))
