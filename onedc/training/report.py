"""The report at the end of ``stage=all``: how each trained stage codes the held-out photos.

::

    final.ckpt of each stage ─ onedc.eval.evaluate(held-out photos) ─> real .onedc files,
        bpp from their sizes, PSNR, MS-SSIM; JPEG / WebP ladders and at each stage's bpp; rd.png
    last stage's VAE alone (encode -> decode, nothing coded) ─> the reconstruction ceiling
    the .onedc files decoded again + the VAE alone + JPEG at the last stage's bpp ─> reconstructions.png
    ─> report.json + a printed table

Everything lands in ``<run_dir>/report/`` (the evaluation's own files beside them), written
atomically. The measurement itself is :func:`onedc.eval.evaluate`; this module only picks
the held-out photos' rows, adds the VAE-only line and draws the grid.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GRID_CROP", "LADDER", "format_table", "vae_only", "write_report"]

GRID_CROP = 256
"""Side of the centre crop each grid cell shows at 1:1 (downscaled whole photos hide the artefacts)."""
LADDER = (5, 10, 20, 40, 75)
"""JPEG / WebP qualities of the RD plot's anchor curves: each costs an MS-SSIM per photo, and the
matched-bpp points (the table's) come on top of them."""


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values) / len(values))


@torch.no_grad()
def vae_only(codec: Any, image: Tensor) -> Tensor:
    """``image`` (3, H, W) in [-1, 1] through the bundle's VAE alone (padded as coding pads), uint8."""
    from onedc.eval import to_uint8

    height, width = image.shape[-2:]
    multiple = 64
    padded = F.pad(image[None], (0, (-width) % multiple, 0, (-height) % multiple), mode="reflect")
    decoded = codec.vae.decode(codec.vae.encode(padded))[0, :, :height, :width].clamp(-1, 1)
    return to_uint8(decoded)


def _centre(image: Tensor, side: int) -> Tensor:
    height, width = image.shape[-2:]
    side = min(side, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[:, top:top + side, left:left + side]


def _grid_png(rows: Sequence[Sequence[tuple[Tensor, str]]], title: str) -> bytes:
    """PNG bytes of a grid: one row per photo, cells (uint8 (3, h, w) image, caption)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(len(r) for r in rows)
    figure = Figure(figsize=(2.9 * cols, 3.1 * len(rows) + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), cols, squeeze=False)
    for r, cells in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cells):
                image, caption = cells[c]
                ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_title(caption, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def format_table(report: Mapping[str, Any]) -> str:
    """The report's table as text: one line per stage (means over the held-out photos)."""
    def num(value: float | None, digits: int) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    lines = [f"report on {len(report['images'])} held-out photo(s): {', '.join(report['images'])} (means)",
             f"{'':<10} {'bpp':>7} {'PSNR':>6} {'MS-SSIM':>7} | {'JPEG bpp':>8} {'PSNR':>6} {'MS-SSIM':>7}"
             f" | {'WebP bpp':>8} {'PSNR':>6} {'MS-SSIM':>7}"]
    for name, stage in report["stages"].items():
        line = f"{name:<10} {num(stage['bpp'], 4):>7} {num(stage['psnr'], 2):>6} {num(stage['ms_ssim'], 4):>7}"
        for anchor in ("jpeg", "webp"):
            a = stage[anchor]
            line += f" | {num(a['bpp'], 4):>8} {num(a['psnr'], 2):>6} {num(a['ms_ssim'], 4):>7}"
        lines.append(line)
    vae = report["vae_only"]
    lines.append(f"{'VAE only':<10} {'-':>7} {num(vae['psnr'], 2):>6} {num(vae['ms_ssim'], 4):>7} | "
                 "encode -> decode, nothing coded: the ceiling of every stage")
    return "\n".join(lines)


def write_report(ckpts: Mapping[str, str | Path], images: Sequence[str | Path], out_dir: str | Path, *,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate each stage's checkpoint (``ckpts``: stage name -> final.ckpt, in chain order) on ``images``.

    Writes ``out_dir/{rd.png, reconstructions.png, report.json}`` (and the evaluation's
    per-image CSV/JSON and .onedc files), passes the table to ``say`` and returns the report
    dict. The grid shows, per photo, the original, the VAE alone, each stage's decode and JPEG
    at the last stage's bpp, as :data:`GRID_CROP` px centre crops.
    """
    from onedc.datamodules.image_folder import load_image
    from onedc.eval import (checkpoint_labels, evaluate, ms_ssim_uint8, pillow_decode, pillow_encode, psnr_uint8,
                                  to_uint8)
    from onedc.coding.bundle import OneDCCodec
    from onedc.io import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    names, paths = list(ckpts), [Path(ckpts[n]) for n in ckpts]
    result = evaluate(paths, [Path(p) for p in images], out_dir, progress=False, say=say,
                      jpeg_qualities=LADDER, webp_qualities=LADDER, anchors=("jpeg", "webp"))
    label_of = dict(zip(names, checkpoint_labels(paths)))  # the settings evaluate gave them
    photos = list(dict.fromkeys(row["image"] for row in result.rows))

    def picked(codec: str, setting: str) -> dict[str, Any]:
        rows = [r for r in result.rows if r["codec"] == codec and r["setting"] == setting]
        return {"bpp": _mean([r["bpp"] for r in rows]), "psnr": _mean([r["psnr"] for r in rows]),
                "ms_ssim": _mean([r["ms_ssim"] for r in rows]),
                "per_image": {r["image"]: {k: r[k] for k in ("bpp", "psnr", "ms_ssim", "quality", "file")}
                              for r in rows}}

    stages = {}
    for name in names:
        label = label_of[name]
        stages[name] = {"ckpt": str(ckpts[name]), **picked("onedc", label),
                        "jpeg": picked("jpeg", f"matched:{label}"), "webp": picked("webp", f"matched:{label}")}

    # Decode the written files again for the grid (evaluate keeps no pixels), and the VAE alone.
    originals = {Path(p).stem: load_image(p) for p in images}
    decoded: dict[str, dict[str, Tensor]] = {photo: {} for photo in photos}
    vae_rows, vae_images = {}, {}
    for name, path in zip(names, paths):
        codec = OneDCCodec.from_checkpoint(path)
        for photo in photos:
            file = out_dir / stages[name]["per_image"][photo]["file"]
            decoded[photo][name] = to_uint8(codec.decompress_bytes(file.read_bytes()).image)
        if name == names[-1]:
            for photo in photos:
                reference, vae_images[photo] = to_uint8(originals[photo]), vae_only(codec, originals[photo])
                vae_rows[photo] = {"psnr": psnr_uint8(reference, vae_images[photo]),
                                   "ms_ssim": ms_ssim_uint8(reference, vae_images[photo])[0]}
        del codec
    vae = {"psnr": _mean([v["psnr"] for v in vae_rows.values()]),
           "ms_ssim": _mean([v["ms_ssim"] for v in vae_rows.values()]), "per_image": vae_rows}

    last = stages[names[-1]]
    grid = []
    for photo in photos:
        reference = to_uint8(originals[photo])
        cells = [(_centre(reference, GRID_CROP), f"{photo} (original)"),
                 (_centre(vae_images[photo], GRID_CROP), f"VAE only: {vae_rows[photo]['psnr']:.1f} dB")]
        for name in names:
            row = stages[name]["per_image"][photo]
            cells.append((_centre(decoded[photo][name], GRID_CROP),
                          f"{name}: {row['bpp']:.3f} bpp, {row['psnr']:.1f} dB"))
        jpeg = last["jpeg"]["per_image"][photo]
        jpeg_image = pillow_decode(pillow_encode(reference, "jpeg", int(jpeg["quality"])))
        cells.append((_centre(jpeg_image, GRID_CROP),
                      f"JPEG q={jpeg['quality']}: {jpeg['bpp']:.3f} bpp, {jpeg['psnr']:.1f} dB"))
        grid.append(cells)
    title = (f"held-out photos, {GRID_CROP} px centre crops of full-image decodes; "
             f"JPEG at the {names[-1]} bpp (or its lowest quality)")
    report = {"images": photos, "stages": stages, "vae_only": vae,
              "files": {"rd": "rd.png", "grid": "reconstructions.png", "per_image": "per_image.csv"}}
    atomic_write_bytes(out_dir / "reconstructions.png", _grid_png(grid, title))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, default=str))
    say(format_table(report))
    return report
