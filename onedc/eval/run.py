"""``onedc eval``: code a λ ladder of checkpoints, the anchors and other codecs' files; score, compare, write.

The time goes into the networks (onedc decoding, LPIPS, DISTS, Inception) and FID's matrix
statistics; :mod:`onedc.eval.perceptual` computes each reference image's LPIPS/DISTS features
once per image instead of once per scored row, and FID over few patches in the patch space.
Anchor rows (most of the work: a ladder and matched points per image and codec) are read from
the persistent :mod:`onedc.eval.cache` when an earlier evaluation scored them; identical anchor
files are scored once (benchmarks/README.md: the split before and after, cold and warm).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from onedc.coding.bundle import OneDCCodec
from onedc.coding.images import IMAGE_SUFFIXES, decode_uint8, list_images, load_image, to_uint8
from onedc.errors import OneDCError
from onedc.eval.anchors import (ANCHOR_LADDERS, ANCHORS, matched_quality, missing_anchors, pillow_decode,
                                pillow_encode)
from onedc.eval.bd import BD_METRICS, bd_table, curves_of, format_bd_table
from onedc.eval.cache import AnchorCache, image_digest
from onedc.eval.perceptual import FID_PATCH, PerceptualMetrics, fid_kid
from onedc.eval.pixels import ms_ssim_uint8, psnr_uint8
from onedc.eval.report import ROW_FIELDS, aggregate, compressai_results, jsonable, rd_plot, write_csv, write_text
from onedc.io import atomic_write_bytes
from onedc.progress import progress as progress_bar

JPEG_QUALITIES = ANCHOR_LADDERS["jpeg"]
WEBP_QUALITIES = ANCHOR_LADDERS["webp"]


def _scores(reference: Tensor, decoded: Tensor, n_bytes: float, perceptual: PerceptualMetrics) -> dict[str, Any]:
    """The values of a row (:data:`onedc.eval.cache.SCORE_FIELDS`): rate from ``n_bytes``, distortion from the
    two uint8 images."""
    height, width = int(reference.shape[-2]), int(reference.shape[-1])
    ms_ssim, scales = ms_ssim_uint8(reference, decoded)
    return dict(bytes=int(n_bytes), bpp=n_bytes * 8 / (height * width), psnr=psnr_uint8(reference, decoded),
                ms_ssim=ms_ssim, ms_ssim_scales=scales, **perceptual.distances(reference, decoded))


def _row(codec: str, setting: str, image_id: str, reference: Tensor, scores: dict[str, Any],
         **extra: Any) -> dict[str, Any]:
    """One result row of ``image_id``: its :func:`_scores` and what names it (codec, setting, curve, size)."""
    row = {key: None for key in ROW_FIELDS}
    row.update(codec=codec, setting=setting, curve=codec, image=image_id, height=int(reference.shape[-2]),
               width=int(reference.shape[-1]), **scores)
    row.update(extra)
    return row


class _AnchorFiles:
    """One image's files of one anchor codec: encoded on demand, each quality once; sizes known from
    the cache are used without encoding (the matched-bpp search needs only sizes)."""

    def __init__(self, image: Tensor, codec: str, sizes: dict[int, int]) -> None:
        self.image, self.codec = image, codec
        self.sizes = dict(sizes)
        self.data: dict[int, bytes] = {}
        self.learned = False

    def encode(self, quality: int) -> bytes:
        if quality not in self.data:
            self.data[quality] = pillow_encode(self.image, self.codec, quality)
            self.learned |= self.sizes.get(quality) != len(self.data[quality])
            self.sizes[quality] = len(self.data[quality])
        return self.data[quality]

    def size(self, quality: int) -> int:
        if quality not in self.sizes:
            self.encode(quality)
        return self.sizes[quality]


#: What :func:`evaluate` writes in its output folder (``files/`` holds the .onedc files).
REPORT_NAMES = ("per_image.csv", "per_image.json", "aggregate.json", "rd.png", "files")


@dataclass
class EvalResult:
    """What :func:`evaluate` produced: rows, aggregate entries, BD rows (and their table), written paths,
    notes, and failures.

    ``failed`` maps the id of each image that could not be read or coded to its error message;
    those images are left out of every row and aggregate. ``images`` counts all images tried.
    """

    rows: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    paths: dict[str, Path]
    notes: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    bd: list[dict[str, Any]] = field(default_factory=list)
    bd_text: str = ""


def checkpoint_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short unique labels of checkpoint paths: the fewest trailing path parts (without suffix) that differ."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    if not parts:
        return []
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{'/'.join(p)}" for i, p in enumerate(parts)]


def _images(data: str | Path | Sequence[str | Path], max_images: int | None) -> list[tuple[str, Path]]:
    """(image id, path) pairs: a folder searched recursively (id = relative path without suffix) or files."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    found: list[tuple[str, Path]] = []
    for item in map(Path, items):
        if item.is_dir():
            found += [(p.relative_to(item).with_suffix("").as_posix(), p) for p in list_images(item)]
        elif item.exists():
            found.append((item.stem, item))
        else:
            raise OneDCError(f"{item}: no such image file or folder")
    if not found:
        raise OneDCError(f"no images found in {', '.join(map(str, items))}")
    ids = [i for i, _ in found]
    if len(set(ids)) != len(ids):
        raise OneDCError("two inputs share an image name: give one folder, or files with distinct names")
    return found[:max_images] if max_images else found


@dataclass
class Recon:
    """Another codec's output at one rate point: reconstructions in ``recon`` and sizes in ``bits``.

    ``recon``: a folder holding, per original image, an image file of the same id (relative path
    without suffix, or the bare name) and any image suffix. ``bits``: a folder holding, per image,
    the codec's file of the same id (its size is the rate), or a CSV with a column ``image`` (the
    id or file name) and one of ``bytes``, ``bits`` or ``bpp``.
    """

    recon: Path
    bits: Path

    def _find(self, folder: Path, image_id: str, suffixes: Sequence[str] | None) -> Path | None:
        for stem in dict.fromkeys((image_id, Path(image_id).name)):
            base = folder / stem
            for candidate in sorted(base.parent.glob(base.name + ".*")) if base.parent.is_dir() else []:
                if candidate.is_file() and (suffixes is None or candidate.suffix.lower() in suffixes):
                    return candidate
        return None

    def image(self, image_id: str) -> Tensor:
        """The uint8 (3, H, W) reconstruction of ``image_id``."""
        path = self._find(self.recon, image_id, IMAGE_SUFFIXES)
        if path is None:
            raise OneDCError(f"--recon {self.recon}: no reconstruction of image '{image_id}' "
                             f"(looked for {image_id}.<{'|'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))}>)")
        return decode_uint8(path.read_bytes())

    def bits_of(self, image_id: str, pixels: int) -> int:
        """The codec's file size of ``image_id`` in bits (whole bytes when given as bytes or bpp×pixels)."""
        if self.bits.is_dir():
            path = self._find(self.bits, image_id, None)
            if path is None:
                raise OneDCError(f"--bits {self.bits}: no file of image '{image_id}' (looked for {image_id}.*)")
            return path.stat().st_size * 8
        table = self._table()
        for key in (image_id, Path(image_id).name):
            if key in table:
                kind, value = table[key]
                return int(round(value if kind == "bits" else value * 8 if kind == "bytes" else value * pixels))
        raise OneDCError(f"--bits {self.bits}: no row for image '{image_id}'")

    def _table(self) -> dict[str, tuple[str, float]]:
        if not hasattr(self, "_rows"):
            try:
                with open(self.bits, newline="") as handle:
                    rows = list(csv.DictReader(handle))
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                raise OneDCError(f"--bits {self.bits}: not a readable folder or CSV ({err})") from err
            columns = set(rows[0]) if rows else set()
            kind = next((k for k in ("bytes", "bits", "bpp") if k in columns), None)
            if "image" not in columns or kind is None:
                raise OneDCError(f"--bits {self.bits}: a CSV needs a column 'image' and one of 'bytes', 'bits', "
                                 f"'bpp' (found: {', '.join(sorted(columns)) or 'nothing'})")
            table = {}
            for row in rows:
                try:
                    value = float(row[kind])
                except (TypeError, ValueError) as err:
                    raise OneDCError(f"--bits {self.bits}: '{row[kind]}' in column {kind} is not a number") from err
                name = row["image"]
                table[name] = (kind, value)
                table.setdefault(Path(name).with_suffix("").as_posix(), (kind, value))
            self._rows = table
        return self._rows


def _ckpt_curves(ckpts: Sequence[str | Path], curves: Sequence[str] | None) -> list[str]:
    if curves is None:
        return ["onedc"] * len(ckpts)
    if len(curves) != len(ckpts):
        raise OneDCError(f"{len(curves)} curve names for {len(ckpts)} checkpoints")
    return [str(c) for c in curves]


def evaluate(
    ckpts: Sequence[str | Path],
    data: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights_dir: str | Path | None = None,
    baselines: bool = True,
    anchors: Sequence[str] = ANCHORS,
    max_images: int | None = None,
    steps: int = 1,
    device: str | torch.device = "cpu",
    curves: Sequence[str] | None = None,
    recon: Sequence[Recon] = (),
    recon_name: str = "other",
    bd_method: str = "akima",
    z_only: bool = False,
    ladders: dict[str, Sequence[int]] | None = None,
    jpeg_qualities: Sequence[int] | None = None,
    webp_qualities: Sequence[int] | None = None,
    feature_extractor: nn.Module | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    fail_fast: bool = False,
    anchor_cache: str | Path | bool = True,
) -> EvalResult:
    """Evaluate checkpoints (λ ladders), anchors and other codecs' outputs on the images of ``data``.

    For each checkpoint and image: compress to a real ``.onedc`` file (``out_dir/files/<ckpt>/``),
    decompress (``steps`` generator steps), and score (see the package docstring). ``curves``
    names the RD curve of each checkpoint (default: one curve ``onedc``). With ``baselines``:
    each of ``anchors`` (JPEG, WebP, AVIF, JPEG-XL; one not installed is skipped with a note) at
    each quality of its ladder, and per image and checkpoint at the quality whose file bpp is
    closest to onedc's (setting ``matched:<ckpt>``). ``recon``: another codec's points, scored
    the same way as curve ``recon_name``. Then BD-rate / BD-metric of every onedc curve against
    every anchor and other codec, and between onedc curves (``bd_method``: akima or pchip).
    ``z_only``: each checkpoint also writes z-only files (setting ``<ckpt>:z-only``, same curve).
    ``anchor_cache``: anchor rows are read from and written to a persistent cache
    (:mod:`onedc.eval.cache`; True: its default folder, a path: that folder, False: off); they do
    not depend on the checkpoints, so a second evaluation of the same images scores only onedc's.

    Writes ``per_image.csv``, ``per_image.json``, ``aggregate.json``, ``bd.json``, ``rd.png`` and
    one CompressAI results file per curve (``compressai/<curve>.json``). ``say`` receives the
    one-line notes (missing weights or anchors), default: stderr.

    An image that cannot be read or coded (:class:`~onedc.errors.OneDCError`) is reported with one
    ``error:`` line through ``say``, left out of every row and aggregate, and listed in
    ``aggregate.json`` (``failed``) and :attr:`EvalResult.failed`; the others are evaluated. With
    ``fail_fast`` the first such error is raised instead; so is the error when no image is left.
    """
    say = say or (lambda message: print(message, file=sys.stderr))
    if not ckpts and not recon:
        raise OneDCError("give at least one checkpoint (--ckpt) or another codec's output (--recon)")
    out_dir = Path(out_dir)
    images = _images(data, max_images)
    labels = checkpoint_labels(ckpts)
    ckpt_curves = _ckpt_curves(ckpts, curves)
    ladder_of = dict(ANCHOR_LADDERS, **(ladders or {}))
    if jpeg_qualities is not None:
        ladder_of["jpeg"] = tuple(jpeg_qualities)
    if webp_qualities is not None:
        ladder_of["webp"] = tuple(webp_qualities)
    perceptual = PerceptualMetrics.load(weights_dir, device=device, feature_extractor=feature_extractor)
    notes = [m for m in [perceptual.message()] if m]
    chosen = [a for a in anchors if a in ANCHOR_LADDERS] if baselines else []
    unknown = [a for a in anchors if a not in ANCHOR_LADDERS]
    if unknown:
        raise OneDCError(f"unknown anchor {', '.join(unknown)}: choose from {', '.join(ANCHORS)}")
    skipped = missing_anchors(chosen)
    notes += list(skipped.values())
    chosen = [a for a in chosen if a not in skipped]
    for note in notes:
        say(note)
    cache = None
    if anchor_cache is not False and chosen:
        cache = AnchorCache.open(None if anchor_cache is True else anchor_cache, perceptual.networks(),
                                 perceptual.device, say)

    rows: list[dict[str, Any]] = []
    real_features: dict[str, Tensor | None] = {}
    fake_features: dict[tuple[str, str], list[tuple[str, Tensor]]] = {}
    failed: dict[str, str] = {}

    def add(row: dict[str, Any], feats: Tensor | None) -> None:
        rows.append(row)
        if feats is not None:
            fake_features.setdefault((row["codec"], row["setting"]), []).append((row["image"], feats))

    def fail(image_id: str, path: Path, err: OneDCError) -> None:
        if fail_fast:
            raise err
        message = " ".join(str(err).split())
        failed[image_id] = message if str(path) in message else f"{path}: {message}"
        say(f"error: {failed[image_id]}")

    def reference(image_id: str, path: Path) -> Tensor:
        x = to_uint8(load_image(path))
        if image_id not in real_features:
            found, feats = cache.reference_features(image_digest(x)) if cache else (False, None)
            if not found:
                feats = perceptual.patch_features(x)
                if cache:
                    cache.put_reference_features(image_digest(x), feats)
            real_features[image_id] = feats
        return x

    onedc_bpp: dict[tuple[str, str], float] = {}
    for ckpt, label, curve in zip(ckpts, labels, ckpt_curves):
        codec = OneDCCodec.from_checkpoint(ckpt, device=device)
        codec.check_steps(steps, source=ckpt)
        modes = [(label, codec.compress_image)] + ([(f"{label}:z-only", codec.compress_z_only)] if z_only else [])
        for setting, compress in modes:
            folder = label if setting == label else f"{label}.z-only"
            for image_id, path in progress_bar(images, f"onedc {setting}", unit="image", enabled=progress):
                if image_id in failed:
                    continue
                try:
                    image = load_image(path)
                    x = reference(image_id, path)
                    start = time.perf_counter()
                    data_bytes = compress(image)
                    enc_ms = (time.perf_counter() - start) * 1e3
                    target = atomic_write_bytes(out_dir / "files" / folder / f"{image_id}.onedc", data_bytes)
                    start = time.perf_counter()
                    decoded = to_uint8(codec.decompress_bytes(target.read_bytes(), steps=steps).image)
                    dec_ms = (time.perf_counter() - start) * 1e3
                except OneDCError as err:
                    fail(image_id, path, err)
                    continue
                row = _row("onedc", setting, image_id, x, _scores(x, decoded, os.path.getsize(target), perceptual),
                           steps=steps, enc_ms=enc_ms, dec_ms=dec_ms, file=str(target.relative_to(out_dir)), curve=curve)
                if setting == label:
                    onedc_bpp[(label, image_id)] = row["bpp"]
                add(row, perceptual.patch_features(decoded))
        del codec

    # An image that failed under one checkpoint leaves every curve: all points average one image set.
    rows = [row for row in rows if row["image"] not in failed]
    if images and len(failed) == len(images):
        raise OneDCError(f"none of the {len(images)} image(s) could be evaluated: {'; '.join(failed.values())}")
    recon_labels = checkpoint_labels([r.recon for r in recon])
    for point, label in zip(recon, recon_labels):
        for image_id, path in progress_bar(images, f"{recon_name} {label}", unit="image", enabled=progress):
            if image_id in failed:
                continue
            x = reference(image_id, path)
            decoded = point.image(image_id)
            if decoded.shape != x.shape:
                raise OneDCError(f"--recon {point.recon}: '{image_id}' is {tuple(decoded.shape[1:])}, the original "
                                 f"{tuple(x.shape[1:])}")
            bits = point.bits_of(image_id, int(x.shape[-2]) * int(x.shape[-1]))
            row = _row(recon_name, label, image_id, x, _scores(x, decoded, bits / 8, perceptual), curve=recon_name)
            row["bytes"] = bits / 8 if bits % 8 else bits // 8
            add(row, perceptual.patch_features(decoded))

    for image_id, path in progress_bar(images, "/".join(chosen) or "anchors", unit="image",
                                       enabled=progress and bool(chosen)):
        if image_id in failed:
            continue
        x = reference(image_id, path)
        digest = image_digest(x) if cache else ""
        # (codec, quality) -> scores + patch features: a quality shared by the ladder and matched
        # points (or by checkpoints of equal bpp) is scored once, and so are identical files.
        scored: dict[tuple[str, int], tuple[dict[str, Any], Tensor | None]] = {}
        by_content: dict[tuple[str, bytes], tuple[dict[str, Any], Tensor | None]] = {}

        def baseline(files: _AnchorFiles, quality: int, setting: str, **extra: Any) -> None:
            name = files.codec
            if (name, quality) not in scored:
                found = cache.get(digest, name, quality) if cache else None
                if found is None:
                    data_bytes = files.encode(quality)
                    content = (name, hashlib.sha256(data_bytes).digest())
                    if content not in by_content:
                        decoded = pillow_decode(data_bytes)
                        by_content[content] = (_scores(x, decoded, len(data_bytes), perceptual),
                                               perceptual.patch_features(decoded))
                    found = by_content[content]
                    if cache:
                        cache.put(digest, name, quality, *found)
                scored[name, quality] = found
            scores, feats = scored[name, quality]
            add(_row(name, setting, image_id, x, scores, quality=quality, **extra), feats)

        pixels = int(x.shape[-2]) * int(x.shape[-1])
        for name in chosen:
            files = _AnchorFiles(x, name, cache.sizes(digest, name) if cache else {})
            for quality in ladder_of[name]:
                baseline(files, quality, f"q={quality}")
            for label in labels:
                target_bpp = onedc_bpp[(label, image_id)]
                baseline(files, matched_quality(name, pixels, target_bpp, files.size), f"matched:{label}",
                         target_bpp=target_bpp)
            if cache and files.learned:
                cache.put_sizes(digest, name, files.sizes)

    entries = aggregate(rows)
    if perceptual.features is not None:
        real = [f for image_id, f in real_features.items() if f is not None and image_id not in failed]
        for entry in entries:
            pairs = fake_features.get((entry["codec"], entry["setting"]), [])
            fake = [f for image_id, f in pairs if image_id not in failed]
            entry.update(fid_kid(real, fake))
        if all(e["fid_patches"] < 2 for e in entries):
            notes.append(f"FID/KID left empty: fewer than 2 patches of {FID_PATCH} px (images too small)")
            say(notes[-1])
    else:
        for entry in entries:
            entry.update({"fid": None, "kid": None, "kid_std": None, "fid_patches": None})

    # BD: every onedc curve against every anchor and other codec, and each later onedc curve
    # against the first.
    onedc_curves = list(dict.fromkeys(ckpt_curves))
    others = chosen + ([recon_name] if recon else [])
    bd_rows = bd_table(entries, onedc_curves, others, BD_METRICS, bd_method)
    for index, curve in enumerate(onedc_curves[1:], start=1):
        bd_rows += bd_table(entries, [curve], onedc_curves[:index], BD_METRICS, bd_method)
    if not ckpts and recon:
        bd_rows += bd_table(entries, [recon_name], chosen, BD_METRICS, bd_method)
    bd_text = format_bd_table(bd_rows)

    paths = {
        "csv": write_csv(rows, out_dir / "per_image.csv"),
        "json": write_text(out_dir / "per_image.json", json.dumps(jsonable(rows), indent=1)),
        "aggregate": write_text(out_dir / "aggregate.json", json.dumps(jsonable({
            "checkpoints": {label: str(c) for label, c in zip(labels, ckpts)},
            "curves": {label: c for label, c in zip(labels, ckpt_curves)},
            "recon": {label: {"recon": str(r.recon), "bits": str(r.bits), "name": recon_name}
                      for label, r in zip(recon_labels, recon)},
            "anchors": chosen, "images": len(images) - len(failed), "failed": failed, "steps": steps, "notes": notes,
            "missing_weights": perceptual.missing, "results": entries}), indent=1)),
        "bd": write_text(out_dir / "bd.json", json.dumps(jsonable({
            "method": bd_method, "metrics": list(BD_METRICS),
            "convention": "bd_rate: % rate change of test vs anchor at equal quality (negative = fewer bits); "
                          "bd_metric: mean test - anchor at equal rate (higher_is_better says which sign is "
                          "better); null where the curves do not overlap (note)",
            "rows": bd_rows}), indent=1)),
    }
    for curve, members in curves_of(entries).items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in curve)
        paths[f"compressai:{curve}"] = write_text(out_dir / "compressai" / f"{safe}.json", json.dumps(jsonable(
            compressai_results(curve, members, description=f"onedc eval on {len(images)} image(s)")), indent=1))
    title = f"{len(images) - len(failed)} image(s) from {data if isinstance(data, (str, Path)) else 'inputs'}"
    paths["plot"] = atomic_write_bytes(out_dir / "rd.png", rd_plot(entries, title=title))
    return EvalResult(rows=rows, aggregate=entries, paths=paths, notes=notes, bd=bd_rows, bd_text=bd_text,
                      failed=failed, images=len(images))
