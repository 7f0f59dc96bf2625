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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from onedc.coding.folders import Listing, scan_folder
from onedc.errors import ImageReadError, OneDCError, PixelLimitError
from onedc.io import atomic_write

# The still-image formats that Pillow decodes by itself (no Ghostscript, no OS codec), GIF and
# APNG included (their first frame, as for a file named on the command line). Pillow registers
# more suffixes (video stubs such as .mpg, EPS, HDF5, ...) that a photo folder holds for other
# reasons: a folder listing skips them and says so; they still work when named one by one.
_STILL_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".dib", ".tif",
                   ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".jp2", ".j2k", ".avif"}
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    suffix for suffix, fmt in Image.registered_extensions().items()
    if suffix in _STILL_SUFFIXES and fmt in Image.OPEN  # .avif only where this Pillow reads it
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
        advice = "Re-export or remove the file"
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


@contextmanager
def _own_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """With a limit of onedc's own, switch off Pillow's (a process-wide setting) while opening.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and refuses above twice that; onedc checks its
    ``max_pixels`` itself right after ``open`` (which reads the header only), so a user who raises
    the limit is not stopped by Pillow's, and one who lowers it gets onedc's message.
    """
    if max_pixels is None:
        yield
        return
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise PixelLimitError(f"image {path} is {height}x{width} = {width * height:,} pixels, above the limit of "
                              f"{max_pixels:,} (--max-pixels, or max_pixels= in Python): raise the limit to code it")


def check_image_header(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """Open ``path``'s header only and return its (height, width), without decoding any pixel.

    Raises :class:`~onedc.errors.ImageReadError` when Pillow does not recognise the file and
    :class:`~onedc.errors.PixelLimitError` when it declares more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        with _own_pixel_limit(max_pixels), Image.open(path) as image:
            size = image.size
    except Exception as exc:  # noqa: BLE001 - see load_image
        raise _read_error(path, exc) from exc
    _check_pixels(path, size, max_pixels)
    return size[1], size[0]


def load_image(path: str | Path, max_pixels: int | None = None) -> Tensor:
    """Read one image file into a float32 tensor of shape (3, H, W) with values in [-1, 1].

    Any Pillow mode is accepted: grayscale (L, I;16, I, F) is repeated over three channels,
    16-bit data is scaled by 65535 (not 255), images with alpha or palette transparency are
    composited on white, and the EXIF orientation is applied. Truncated files are decoded
    eagerly, so they fail here (this relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being
    left False, which onedc never changes). Every failure, including a missing file, raises
    :class:`~onedc.errors.ImageReadError` with a message naming ``path``. With ``max_pixels``,
    an image declaring more pixels (height x width) raises :class:`~onedc.errors.PixelLimitError`
    from its header, before any pixel is decoded; without it, Pillow's own bomb limit applies.
    """
    path = Path(path)
    try:
        with _own_pixel_limit(max_pixels), Image.open(path) as image:
            _check_pixels(path, image.size, max_pixels)  # header only: nothing decoded yet
            # Pillow decodes lazily; load() inside the try makes truncation fail here.
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_unit_rgb(image)
    except PixelLimitError:
        raise
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


def scan_images(root: str | Path) -> Listing:
    """List the image files under ``root`` recursively (suffix in :data:`IMAGE_SUFFIXES`), and what was left out.

    See :func:`onedc.coding.folders.scan_folder`: hidden files and other suffixes are reported in
    :attr:`~onedc.coding.folders.Listing.skipped`. Raises :class:`~onedc.errors.OneDCError` naming
    ``root`` when it is not a folder.
    """
    if not Path(root).is_dir():
        raise OneDCError(f"image folder {root} does not exist or is not a folder. Check the path.")
    return scan_folder(root, IMAGE_SUFFIXES, kind="an image format onedc lists")


def list_images(root: str | Path) -> list[Path]:
    """List the image files under ``root``, recursively, sorted by relative path.

    The files of :func:`scan_images` (which also says what it left out). Raises
    :class:`~onedc.errors.OneDCError` naming ``root`` when it is not a folder or holds no image.
    """
    files = scan_images(root).files
    if not files:
        raise OneDCError(
            f"image folder {root} holds no images (looked recursively for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}). Put images there or pass another folder."
        )
    return files


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
