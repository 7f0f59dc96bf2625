"""Writing evaluation results: per-image rows, per-setting means, CSV/JSON files and the RD plot."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from onedc.io import atomic_write_bytes

ROW_FIELDS: tuple[str, ...] = (
    "codec", "setting", "curve", "image", "height", "width", "bytes", "bpp", "psnr", "ms_ssim", "ms_ssim_scales",
    "lpips", "dists", "quality", "target_bpp", "steps", "enc_ms", "dec_ms", "file",
)
METRICS: tuple[str, ...] = ("bpp", "psnr", "ms_ssim", "lpips", "dists")
# aggregate key -> CompressAI results key (compressai/utils/eval_model writes "bpp", "psnr-rgb",
# "ms-ssim-rgb", "encoding_time", "decoding_time"; its plot script reads any key with --metric).
COMPRESSAI_KEYS: dict[str, str] = {
    "bpp": "bpp", "psnr": "psnr-rgb", "ms_ssim": "ms-ssim-rgb", "lpips": "lpips", "dists": "dists", "fid": "fid",
    "kid": "kid", "enc_ms": "encoding_time", "dec_ms": "decoding_time"}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Means of :data:`METRICS` (and timings) per (codec, setting), in first-seen order.

    A mean is None when any image lacks the value (a partial mean would not be comparable).
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["codec"], row["setting"]), []).append(row)
    out = []
    for (codec, setting), members in groups.items():
        entry: dict[str, Any] = {"codec": codec, "setting": setting, "curve": members[0].get("curve") or codec,
                                 "images": len(members)}
        for key in METRICS + ("enc_ms", "dec_ms"):
            values = [m.get(key) for m in members]
            entry[key] = None if any(v is None for v in values) else float(np.mean(values))
        qualities = {m.get("quality") for m in members}
        entry["quality"] = qualities.pop() if len(qualities) == 1 else None
        out.append(entry)
    return out


def compressai_results(name: str, entries: Sequence[Mapping[str, Any]], description: str = "") -> dict[str, Any]:
    """One RD curve in CompressAI's results-JSON layout: ``{"name", "description", "results": {key: [...]}}``.

    ``entries`` are :func:`aggregate` rows of the curve, written in bpp order; keys as
    :data:`COMPRESSAI_KEYS` (times in seconds, as CompressAI writes them); a metric no entry has is
    left out, so ``compressai.utils.plot --metric`` lists only what is there.
    """
    ordered = sorted(entries, key=lambda e: (e.get("bpp") is None, e.get("bpp") or 0.0))
    results: dict[str, list[Any]] = {}
    for key, name_out in COMPRESSAI_KEYS.items():
        values = [e.get(key) for e in ordered]
        if all(v is None for v in values):
            continue
        scale = 1e-3 if key in ("enc_ms", "dec_ms") else 1.0
        results[name_out] = [None if v is None else v * scale for v in values]
    results["setting"] = [e.get("setting") for e in ordered]
    return {"name": name, "description": description, "results": results}


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats spelled for JSON (NaN -> null, inf -> "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_text(path: Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write_bytes(path, text.encode())


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``rows`` as CSV with the :data:`ROW_FIELDS` columns; None is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in ROW_FIELDS})
    return write_text(path, buffer.getvalue())


PLOT_METRICS: tuple[tuple[str, str], ...] = (
    ("psnr", "PSNR (dB) ↑"), ("ms_ssim", "MS-SSIM ↑"), ("lpips", "LPIPS ↓"), ("dists", "DISTS ↓"), ("fid", "FID ↓"),
    ("kid", "KID ↓"))
_ANCHOR_COLORS = {"jpeg": "tab:blue", "webp": "tab:green", "avif": "tab:purple", "jxl": "tab:orange"}
_OTHER_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black", "tab:gray")


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def rd_plot(entries: Sequence[Mapping[str, Any]], title: str = "", history: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """PNG bytes of the RD plot: bpp (log scale) vs each metric any entry has (PSNR and MS-SSIM always).

    ``entries`` are :func:`aggregate` rows. One curve per ``curve`` key (default: the codec):
    each onedc run (a point per checkpoint, sorted by bpp: the λ ladder), each anchor's quality
    ladder, each other codec; matched-bpp anchor points as hollow markers. ``history`` (rows with
    ``step``, ``bpp``, ``psnr``[, ``ms_ssim``]) draws a training trajectory instead of/in addition
    to the onedc ladder (the callback). The rate axis is logarithmic, since a ladder (and a
    z-only point) spans decades of bpp.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    panels = [(m, label) for m, label in PLOT_METRICS
              if m in ("psnr", "ms_ssim") or any(_finite(e.get(m)) for e in entries)]
    columns = min(3, len(panels))
    rows_n = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(5.4 * columns, 4.3 * rows_n), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows_n, columns, squeeze=False).ravel()
    ladder_entries = [e for e in entries if not str(e["setting"]).startswith("matched")]
    curve_names = list(dict.fromkeys(str(e.get("curve") or e["codec"]) for e in ladder_entries))
    colors, others = {}, iter(_OTHER_COLORS * 4)
    for name in curve_names:
        colors[name] = _ANCHOR_COLORS.get(name) or next(others)
    for ax, (metric, label) in zip(axes, panels):
        for name in curve_names:
            members = [e for e in ladder_entries if str(e.get("curve") or e["codec"]) == name]
            points = sorted((e["bpp"], e[metric]) for e in members if _finite(e.get(metric)) and _finite(e.get("bpp")))
            if not points:
                continue
            is_onedc = any(e["codec"] == "onedc" for e in members)
            legend = f"{name} ({len(points)} points)" if is_onedc else name
            ax.plot(*zip(*points), marker="o" if is_onedc else ".", color=colors[name], label=legend,
                    linewidth=2 if is_onedc else 1.2)
            matched = [(e["bpp"], e[metric]) for e in entries if e["codec"] == name
                       and str(e["setting"]).startswith("matched") and _finite(e.get(metric))]
            if matched:
                ax.scatter(*zip(*matched), facecolors="none", edgecolors=colors[name], s=50,
                           label=f"{name} @ onedc bpp")
        trajectory = [(h["bpp"], h[metric]) for h in history if _finite(h.get(metric))]
        if trajectory:
            ax.plot(*zip(*trajectory), marker=".", color="tab:red", alpha=0.6, label="onedc (training)")
            ax.scatter(*trajectory[-1], color="tab:red", s=60, zorder=3)
        if ax.has_data():
            ax.set_xscale("log")
            # Ticks at 1, 2, 5 x 10^k in plain numbers: matplotlib's default labels every minor
            # tick of a sub-decade range in 10^k notation, and they overlap.
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=7)
        ax.set_xlabel("bpp (from file sizes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
