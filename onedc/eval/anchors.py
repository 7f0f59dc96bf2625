"""The anchors onedc is compared against: Pillow JPEG, WebP, AVIF and JPEG-XL, each over a quality ladder.

Every anchor point's rate is the length of the real encoded bytes. A fixed quality ladder per
codec (:data:`ANCHOR_LADDERS`, its low end chosen to reach the bpp of onedc's ladder where the
codec can go that low) draws each codec's curve; per image, :func:`match_quality` also finds the
quality whose file bpp is closest to onedc's (binary search over the codec's quality scale).

AVIF is built into Pillow >= 11 (when Pillow was built with libavif); JPEG-XL comes from the
``pillow-jxl-plugin`` package (``pip install 'onedc[anchors]'``). An anchor that is not available
is skipped with one line saying how to install it (:func:`missing_anchors`).
"""
from __future__ import annotations

import io
from typing import Callable

from PIL import Image
from torch import Tensor

from onedc.coding.images import decode_uint8

# Fixed quality ladders of the anchor curves (each codec's Pillow quality scale). The lowest
# qualities are the codecs' lowest rates (on the 512-px sample photos: JPEG q=1 ≈ 0.11 bpp,
# WebP q=0 ≈ 0.14, AVIF q=0 ≈ 0.20, JPEG-XL q=0 ≈ 0.19), where onedc's ladder lives.
ANCHOR_LADDERS: dict[str, tuple[int, ...]] = {
    "jpeg": (1, 3, 5, 10, 20, 30, 50, 75, 90),
    "webp": (0, 2, 5, 10, 20, 30, 50, 75, 90),
    "avif": (0, 10, 20, 30, 45, 60, 80),
    "jxl": (0, 5, 10, 20, 35, 50, 75),
}
JPEG_QUALITIES: tuple[int, ...] = ANCHOR_LADDERS["jpeg"]
WEBP_QUALITIES: tuple[int, ...] = ANCHOR_LADDERS["webp"]
ANCHORS: tuple[str, ...] = tuple(ANCHOR_LADDERS)
BASELINES: dict[str, tuple[str, int, int]] = {  # name -> (Pillow format, lowest quality, highest quality)
    "jpeg": ("JPEG", 1, 100),
    "webp": ("WEBP", 0, 100),
    "avif": ("AVIF", 0, 100),
    "jxl": ("JXL", 0, 99),  # quality 100 is lossless, which this lossy mode refuses
}
INSTALL_HINTS: dict[str, str] = {
    "avif": "AVIF anchor skipped: this Pillow has no AVIF codec (pip install -U 'pillow>=11', a wheel built "
            "with libavif)",
    "jxl": "JPEG-XL anchor skipped: pip install pillow-jxl-plugin (or pip install 'onedc[anchors]')",
}


def anchor_available(codec: str) -> bool:
    """Whether Pillow can write and read ``codec`` here (JPEG-XL registers itself on import of ``pillow_jxl``)."""
    if codec in ("jpeg", "webp"):
        from PIL import features

        return codec == "jpeg" or bool(features.check("webp"))
    if codec == "avif":
        from PIL import features

        return bool(features.check("avif"))
    if codec == "jxl":
        try:
            import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)
        except ImportError:
            return False
        return "JXL" in Image.SAVE
    return False


def missing_anchors(codecs: tuple[str, ...] | list[str] = ANCHORS) -> dict[str, str]:
    """codec -> one line saying how to install it, for each of ``codecs`` not available here."""
    return {c: INSTALL_HINTS.get(c, f"{c} anchor skipped: Pillow cannot write it") for c in codecs
            if not anchor_available(c)}


def _pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def pillow_encode(image: Tensor, codec: str, quality: int) -> bytes:
    """Bytes of a uint8 (3, H, W) image as ``codec`` at Pillow ``quality``.

    ``jpeg``: optimised Huffman tables, 4:2:0; ``webp``: lossy, method 4; ``avif``: libavif speed 6,
    4:2:0 (Pillow's defaults); ``jxl``: libjxl effort 7 (its default), lossy.
    """
    fmt = BASELINES[codec][0]
    buffer = io.BytesIO()
    if fmt == "JPEG":
        _pil(image).save(buffer, format="JPEG", quality=int(quality), optimize=True)
    elif fmt == "WEBP":
        _pil(image).save(buffer, format="WEBP", quality=int(quality), method=4)
    elif fmt == "AVIF":
        _pil(image).save(buffer, format="AVIF", quality=int(quality), speed=6)
    else:
        anchor_available("jxl")  # registers the plugin
        _pil(image).save(buffer, format="JXL", quality=int(quality), effort=7, lossless=False)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> Tensor:
    """Decode JPEG/WebP/AVIF/JPEG-XL bytes into a uint8 (3, H, W) tensor (:func:`onedc.coding.images.decode_uint8`)."""
    if data[:2] == b"\xff\x0a" or data[4:8] == b"JXL ":
        anchor_available("jxl")  # registers the plugin
    return decode_uint8(data)


def matched_quality(codec: str, pixels: int, target_bpp: float, size_of: Callable[[int], int]) -> int:
    """The ``codec`` quality whose file bpp is closest to ``target_bpp``, from ``size_of(quality)`` in bytes.

    Binary search for the highest quality whose file is at most the target (file size grows
    with quality), then the closer of it and the next quality up. Outside the reachable range
    the lowest / highest quality is returned. ``size_of`` may encode, or read sizes known from an
    earlier run (:class:`onedc.eval.cache.AnchorCache`).
    """
    _, low, high = BASELINES[codec]

    def bpp(q: int) -> float:
        return size_of(q) * 8 / pixels

    if bpp(low) >= target_bpp:
        return low
    lo, hi = low, high  # invariant: bpp(lo) < target; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bpp(mid) <= target_bpp:
            lo = mid
        else:
            hi = mid - 1
    if lo < high and abs(bpp(lo + 1) - target_bpp) < abs(bpp(lo) - target_bpp):
        return lo + 1
    return lo


def match_quality(image: Tensor, codec: str, target_bpp: float) -> tuple[int, bytes]:
    """(quality, bytes) of the ``codec`` file of ``image`` whose bpp is closest to ``target_bpp``
    (:func:`matched_quality`, encoding each quality it asks for once)."""
    cache: dict[int, bytes] = {}

    def size_of(q: int) -> int:
        if q not in cache:
            cache[q] = pillow_encode(image, codec, q)
        return len(cache[q])

    best = matched_quality(codec, int(image.shape[-2]) * int(image.shape[-1]), target_bpp, size_of)
    return best, cache[best]
