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
    "codec", "setting", "image", "height", "width", "bytes", "bpp", "psnr", "ms_ssim", "ms_ssim_scales",
    "lpips", "dists", "quality", "target_bpp", "steps", "enc_ms", "dec_ms", "file",
)
METRICS: tuple[str, ...] = ("bpp", "psnr", "ms_ssim", "lpips", "dists")


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Means of :data:`METRICS` (and timings) per (codec, setting), in first-seen order.

    A mean is None when any image lacks the value (a partial mean would not be comparable).
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["codec"], row["setting"]), []).append(row)
    out = []
    for (codec, setting), members in groups.items():
        entry: dict[str, Any] = {"codec": codec, "setting": setting, "images": len(members)}
        for key in METRICS + ("enc_ms", "dec_ms"):
            values = [m.get(key) for m in members]
            entry[key] = None if any(v is None for v in values) else float(np.mean(values))
        qualities = {m.get("quality") for m in members}
        entry["quality"] = qualities.pop() if len(qualities) == 1 else None
        out.append(entry)
    return out


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


def rd_plot(entries: Sequence[Mapping[str, Any]], title: str = "", history: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """PNG bytes of the RD plot: bpp vs PSNR and bpp vs MS-SSIM side by side.

    ``entries`` are :func:`aggregate` rows. One curve per codec: onedc (a point per checkpoint,
    sorted by bpp: the λ ladder), the JPEG and WebP quality ladders; matched-bpp baseline
    points as hollow markers. ``history`` (rows with ``step``, ``bpp``, ``psnr``[, ``ms_ssim``])
    draws a training trajectory instead of/in addition to the onedc ladder (the callback).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    colors = {"onedc": "tab:red", "jpeg": "tab:blue", "webp": "tab:green"}
    for ax, metric, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ms_ssim", "MS-SSIM")):
        for codec in ("onedc", "jpeg", "webp"):
            ladder = [e for e in entries if e["codec"] == codec and not str(e["setting"]).startswith("matched")]
            points = sorted((e["bpp"], e[metric]) for e in ladder
                            if e.get(metric) is not None and math.isfinite(e[metric]))
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[codec], label=codec if codec != "onedc" else
                        f"onedc ({len(points)} ckpt)")
            matched = [(e["bpp"], e[metric]) for e in entries if e["codec"] == codec
                       and str(e["setting"]).startswith("matched") and e.get(metric) is not None
                       and math.isfinite(e[metric])]
            if matched:
                ax.scatter(*zip(*matched), facecolors="none", edgecolors=colors[codec], s=60,
                           label=f"{codec} @ onedc bpp")
        trajectory = [(h["bpp"], h[metric]) for h in history if h.get(metric) is not None]
        if trajectory:
            ax.plot(*zip(*trajectory), marker=".", color=colors["onedc"], alpha=0.6, label="onedc (training)")
            ax.scatter(*trajectory[-1], color=colors["onedc"], s=60, zorder=3)
        ax.set_xlabel("bpp (from file sizes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
