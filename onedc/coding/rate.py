"""Real vs. estimated rate: how many bits the files take against what the model predicts.

::

    image ─VAE enc─> v ─┬─ compress ─> .onedc bytes ─> header, z / y / fix stream sizes  (real)
                        └─ codec forward (eval) ─> codec.rate_bits(out)                   (estimate)

Used by ``benchmarks/`` and the tests to check that the entropy coder writes what the rate
term of training pays for. The estimate is each codec family's own, through one seam: its
``rate_bits(out)`` (bits per image of an eval forward's output) and ``z_bits_per_image(shape)``.
``HyperpriorCodec``: -Σlog2 p(ŷ) + rANS flush + z bits; the reference codec
(``CodingReferenceCodec``): docs/reference-model.md §4.6's Σ bits + 14 per z index. Coding layer
(docs/architecture.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from onedc.coding.bitstream import decode_container
from onedc.coding.bundle import OneDCCodec
from onedc.coding.images import load_image


def rate_table(codec: OneDCCodec, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Real vs. estimated rate of each image in ``paths``: one dict per image.

    Real bits come from the ``.onedc`` bytes (whole file, and payload = file minus the
    header); the estimate is the codec's ``rate_bits`` of the eval forward pass on the same
    padded image (see the module docstring), its z part ``z_bits_per_image``. bpp values divide
    by the original (unpadded) pixel count; ``rel_diff`` = (payload bits - estimate) / estimate.
    """
    rows = []
    for path in paths:
        path = Path(path)
        data, est_total, est_z = codec.compress_with_estimate(load_image(path))
        header = decode_container(data)
        pixels = header.height * header.width
        payload_bits = header.payload_size * 8
        rows.append({
            "image": path.stem,
            "height": header.height,
            "width": header.width,
            "file_bytes": len(data),
            "header_bytes": header.header_size,
            "z_bytes": len(header.z_stream),
            "y_bytes": len(header.y_stream),
            "fix_bytes": len(header.fix_stream),
            "real_bits": len(data) * 8,
            "payload_bits": payload_bits,
            "est_bits": est_total,
            "est_y_bits": est_total - est_z,
            "est_z_bits": est_z,
            "bpp_file": len(data) * 8 / pixels,
            "bpp_payload": payload_bits / pixels,
            "bpp_est": est_total / pixels,
            "rel_diff": (payload_bits - est_total) / est_total,
        })
    return rows


def format_rate_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`rate_table` rows (one line per image)."""
    lines = [f"{'image':<18} {'size':>9} {'file B':>7} {'payload bpp':>11} {'est bpp':>9} {'file bpp':>9} {'diff':>7}"]
    for r in rows:
        lines.append(f"{r['image']:<18} {r['height']:>4}x{r['width']:<4} {r['file_bytes']:>7} "
                     f"{r['bpp_payload']:>11.5f} {r['bpp_est']:>9.5f} {r['bpp_file']:>9.5f} {r['rel_diff']:>+7.2%}")
    return "\n".join(lines)
