"""Bjøntegaard deltas (BD-rate, BD-metric) between RD curves, for every metric, with ``bjontegaard``.

The fits are the ``bjontegaard`` package's (Akima by default, PCHIP as an option; the package is
the reference implementation the JVET/VCEG common test conditions moved to), not a hand-written
polynomial. onedc only prepares the curves and states the conventions:

- **BD-rate** (%): mean rate difference of the test curve against the anchor at equal quality,
  over the quality range both curves cover: ``100 · (10^mean(log10 R_test − log10 R_anchor) − 1)``.
  Negative = the test needs fewer bits (better), for every metric.
- **BD-metric** (metric units): mean of ``metric_test − metric_anchor`` at equal rate, over the
  log-rate range both curves cover. Its sign follows the metric: positive is better for PSNR
  and MS-SSIM, negative is better for LPIPS, DISTS, FID and KID (:data:`HIGHER_IS_BETTER`).
  Lower-is-better metrics are negated before the fit (the package wants quality rising with
  rate) and the delta negated back, so the reported value is in the metric's own direction.
- Where the two ranges do not overlap (or a curve has fewer than 2 distinct points) the result
  is None with a ``note`` saying why, never a number extrapolated from outside the data.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

# metric -> True when a higher value is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr": True, "ms_ssim": True, "lpips": False, "dists": False, "fid": False, "kid": False}
BD_METRICS: tuple[str, ...] = tuple(HIGHER_IS_BETTER)
BD_METHODS: tuple[str, ...] = ("akima", "pchip")


def _curve(points: Sequence[tuple[float, float]], sign: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(log10 rate, signed metric) of the finite points with positive rate; None below 2 distinct ones."""
    kept = sorted({(math.log10(r), sign * m) for r, m in points
                   if r is not None and m is not None and math.isfinite(r) and r > 0 and math.isfinite(m)})
    if len({p[0] for p in kept}) < 2 or len({p[1] for p in kept}) < 2:
        return None
    log_rate, metric = np.array([p[0] for p in kept]), np.array([p[1] for p in kept])
    return log_rate, metric


def _fit_delta(base_anchor: np.ndarray, value_anchor: np.ndarray, base_test: np.ndarray, value_test: np.ndarray,
               method: str) -> tuple[float | None, float]:
    """Mean of value_test − value_anchor over the overlap of the two base ranges (bjontegaard's bd_linear).

    Returns (delta or None when the ranges do not overlap, overlap as a fraction of the union).
    The points are sorted by the base variable and duplicate bases averaged, as the interpolators
    need a strictly increasing abscissa.
    """
    from bjontegaard import bd_linear

    def strict(base: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uniq, inverse = np.unique(base, return_inverse=True)
        return uniq, np.bincount(inverse, weights=value) / np.bincount(inverse)

    base_anchor, value_anchor = strict(base_anchor, value_anchor)
    base_test, value_test = strict(base_test, value_test)
    low = max(base_anchor.min(), base_test.min())
    high = min(base_anchor.max(), base_test.max())
    union = max(base_anchor.max(), base_test.max()) - min(base_anchor.min(), base_test.min())
    overlap = max(high - low, 0.0) / union if union > 0 else 0.0
    if len(base_anchor) < 2 or len(base_test) < 2 or high <= low:
        return None, overlap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "insufficient overlap" warning: the overlap is reported instead
        delta = float(bd_linear(base_anchor, value_anchor, base_test, value_test, method,
                                require_matching_points=False, min_overlap=0.0))
    return (delta if math.isfinite(delta) else None), overlap


def bd(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]], metric: str = "psnr",
       method: str = "akima") -> dict[str, Any]:
    """BD-rate (%) and BD-metric of the ``test`` curve against the ``anchor`` curve (module docstring).

    ``anchor`` / ``test`` are (rate, metric value) points (rate in bpp; any order). Returns
    ``{"bd_rate", "bd_metric", "rate_overlap", "metric_overlap", "note"}``: a delta is None where
    its ranges do not overlap, and ``note`` then says so.
    """
    if method not in BD_METHODS:
        raise ValueError(f"BD interpolation method must be one of {', '.join(BD_METHODS)}, got '{method}'")
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
    out: dict[str, Any] = {"bd_rate": None, "bd_metric": None, "rate_overlap": 0.0, "metric_overlap": 0.0,
                           "note": None}
    curve_a, curve_t = _curve(anchor, sign), _curve(test, sign)
    if curve_a is None or curve_t is None:
        out["note"] = "fewer than 2 distinct points"
        return out
    (rate_a, value_a), (rate_t, value_t) = curve_a, curve_t
    # BD-rate: log-rate as a function of quality, averaged over the common quality range.
    log_delta, out["metric_overlap"] = _fit_delta(value_a, rate_a, value_t, rate_t, method)
    if log_delta is not None:
        out["bd_rate"] = (10.0 ** log_delta - 1.0) * 100.0
    # BD-metric: quality as a function of log-rate, averaged over the common rate range.
    metric_delta, out["rate_overlap"] = _fit_delta(rate_a, value_a, rate_t, value_t, method)
    if metric_delta is not None:
        out["bd_metric"] = sign * metric_delta
    missing = [what for what, value in (("quality", log_delta), ("rate", metric_delta)) if value is None]
    if missing:
        out["note"] = f"no {' or '.join(missing)} overlap"
    return out


def curves_of(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Aggregate entries grouped into RD curves by their ``curve`` key (default: the codec), in first-seen order.

    Matched-bpp anchor points (setting ``matched:*``) are left out: they are per-image qualities,
    not a point of the anchor's quality ladder.
    """
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        if str(entry.get("setting", "")).startswith("matched"):
            continue
        curves.setdefault(str(entry.get("curve") or entry["codec"]), []).append(entry)
    return curves


def bd_table(entries: Sequence[Mapping[str, Any]], tests: Sequence[str], anchors: Sequence[str],
             metrics: Sequence[str] = BD_METRICS, method: str = "akima") -> list[dict[str, Any]]:
    """One row per (test curve, anchor curve, metric) of :func:`bd` over aggregate ``entries``.

    ``tests`` / ``anchors`` name curves of :func:`curves_of`; a pair of a curve with itself is
    skipped, and a metric no entry of either curve has is skipped. Rows hold ``test``,
    ``anchor``, ``metric``, ``method``, ``higher_is_better`` and :func:`bd`'s keys.
    """
    curves = curves_of(entries)
    rows: list[dict[str, Any]] = []
    for test in tests:
        for anchor in anchors:
            if test == anchor or test not in curves or anchor not in curves:
                continue
            for metric in metrics:
                points = {name: [(e.get("bpp"), e.get(metric)) for e in curves[name]] for name in (anchor, test)}
                if not any(v is not None for pts in points.values() for _, v in pts):
                    continue
                rows.append({"test": test, "anchor": anchor, "metric": metric, "method": method,
                             "higher_is_better": HIGHER_IS_BETTER.get(metric, True),
                             **bd(points[anchor], points[test], metric, method)})
    return rows


def format_bd_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The BD rows as a fixed-width text table: one line per (test, anchor), BD-rate and BD-metric per metric.

    Empty cells read ``n/a`` with the reason in a last column (e.g. ``psnr: no quality overlap``).
    """
    if not rows:
        return "BD table: no pair of curves to compare"
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    pairs = list(dict.fromkeys((r["test"], r["anchor"]) for r in rows))
    by_key = {(r["test"], r["anchor"], r["metric"]): r for r in rows}
    arrows = {m: "↑" if HIGHER_IS_BETTER.get(m, True) else "↓" for m in metrics}
    header = ["test vs anchor"] + [f"BD-rate {m} %" for m in metrics] + [f"BD-{m}{arrows[m]}" for m in metrics]
    lines = []
    for test, anchor in pairs:
        cells, notes = [f"{test} vs {anchor}"], []
        for key, fmt in (("bd_rate", "{:+.1f}"), ("bd_metric", "{:+.4g}")):
            for metric in metrics:
                row = by_key.get((test, anchor, metric))
                value = None if row is None else row[key]
                cells.append("n/a" if value is None else fmt.format(value))
                if row is not None and row["note"] and key == "bd_rate":
                    notes.append(f"{metric}: {row['note']}")
        lines.append(cells + ["; ".join(notes)])
    header.append("notes")
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    method = rows[0]["method"]
    return "\n".join([f"BD-rate (negative = fewer bits) and BD-metric (test − anchor; ↑/↓: higher/lower is "
                      f"better), {method} fit over the common range:", render(header)] + [render(c) for c in lines])
