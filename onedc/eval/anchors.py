"""The anchors onedc is compared against: Pillow JPEG and WebP at fixed and matched qualities.

A fixed quality ladder draws each codec's curve; per image, :func:`match_quality` finds the
quality whose file bpp is closest to onedc's (binary search over Pillow's quality scale).
"""
from __future__ import annotations

import io

from PIL import Image
from torch import Tensor

from onedc.coding.images import decode_uint8

# Fixed quality ladders of the baseline curves (Pillow's quality scales).
JPEG_QUALITIES: tuple[int, ...] = (5, 10, 20, 30, 50, 75, 90)
WEBP_QUALITIES: tuple[int, ...] = (5, 10, 20, 30, 50, 75, 90)
BASELINES: dict[str, tuple[str, int, int]] = {  # name -> (Pillow format, lowest quality, highest quality)
    "jpeg": ("JPEG", 1, 100),
    "webp": ("WEBP", 0, 100),
}


def _pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def pillow_encode(image: Tensor, codec: str, quality: int) -> bytes:
    """Bytes of a uint8 (3, H, W) image as ``codec`` (``jpeg``: optimised Huffman tables, 4:2:0;
    ``webp``: lossy, method 4) at Pillow ``quality``."""
    fmt = BASELINES[codec][0]
    buffer = io.BytesIO()
    if fmt == "JPEG":
        _pil(image).save(buffer, format="JPEG", quality=int(quality), optimize=True)
    else:
        _pil(image).save(buffer, format="WEBP", quality=int(quality), method=4)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> Tensor:
    """Decode JPEG/WebP bytes into a uint8 (3, H, W) tensor (:func:`onedc.coding.images.decode_uint8`)."""
    return decode_uint8(data)


def match_quality(image: Tensor, codec: str, target_bpp: float) -> tuple[int, bytes]:
    """(quality, bytes) of the ``codec`` file of ``image`` whose bpp is closest to ``target_bpp``.

    Binary search for the highest quality whose file is at most the target (file size grows
    with quality), then the closer of it and the next quality up. Outside the reachable range
    the lowest / highest quality is returned.
    """
    _, low, high = BASELINES[codec]
    pixels = int(image.shape[-2]) * int(image.shape[-1])
    cache: dict[int, bytes] = {}

    def bpp(q: int) -> float:
        if q not in cache:
            cache[q] = pillow_encode(image, codec, q)
        return len(cache[q]) * 8 / pixels

    if bpp(low) >= target_bpp:
        return low, cache[low]
    lo, hi = low, high  # invariant: bpp(lo) < target; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bpp(mid) <= target_bpp:
            lo = mid
        else:
            hi = mid - 1
    best = lo
    if lo < high and abs(bpp(lo + 1) - target_bpp) < abs(bpp(lo) - target_bpp):
        best = lo + 1
    return best, cache[best]
