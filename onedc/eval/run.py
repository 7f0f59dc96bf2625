"""``onedc eval``: code a λ ladder of checkpoints and the Pillow anchors, score and write them."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from onedc.errors import OneDCError
from onedc.eval.anchors import JPEG_QUALITIES, WEBP_QUALITIES, match_quality, pillow_decode, pillow_encode
from onedc.eval.perceptual import FID_PATCH, PerceptualMetrics, fid_kid
from onedc.eval.pixels import ms_ssim_uint8, psnr_uint8
from onedc.eval.report import ROW_FIELDS, aggregate, jsonable, rd_plot, write_csv, write_text
from onedc.coding.images import list_images, load_image, to_uint8
from onedc.coding.bundle import OneDCCodec
from onedc.io import atomic_write_bytes
from onedc.progress import progress as progress_bar


def _row(codec: str, setting: str, image_id: str, reference: Tensor, decoded: Tensor, n_bytes: int,
         perceptual: PerceptualMetrics, **extra: Any) -> dict[str, Any]:
    """One result row: rate from ``n_bytes``, distortion from the two uint8 images."""
    height, width = int(reference.shape[-2]), int(reference.shape[-1])
    ms_ssim, scales = ms_ssim_uint8(reference, decoded)
    row = {key: None for key in ROW_FIELDS}
    row.update(codec=codec, setting=setting, image=image_id, height=height, width=width, bytes=int(n_bytes),
               bpp=n_bytes * 8 / (height * width), psnr=psnr_uint8(reference, decoded), ms_ssim=ms_ssim,
               ms_ssim_scales=scales, **perceptual.distances(reference, decoded))
    row.update(extra)
    return row


#: What :func:`evaluate` writes in its output folder (``files/`` holds the .onedc files).
REPORT_NAMES = ("per_image.csv", "per_image.json", "aggregate.json", "rd.png", "files")


@dataclass
class EvalResult:
    """What :func:`evaluate` produced: rows, aggregate entries, written paths, notes, and failures.

    ``failed`` maps the id of each image that could not be read or coded to its error message;
    those images are left out of every row and aggregate. ``images`` counts all images tried.
    """

    rows: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    paths: dict[str, Path]
    notes: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    images: int = 0


def checkpoint_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short unique labels of checkpoint paths: the fewest trailing path parts (without suffix) that differ."""
    parts = [Path(p).with_suffix("").parts for p in paths]
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


def evaluate(
    ckpts: Sequence[str | Path],
    data: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights_dir: str | Path | None = None,
    baselines: bool = True,
    max_images: int | None = None,
    steps: int = 1,
    device: str | torch.device = "cpu",
    jpeg_qualities: Sequence[int] = JPEG_QUALITIES,
    webp_qualities: Sequence[int] = WEBP_QUALITIES,
    feature_extractor: nn.Module | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    fail_fast: bool = False,
) -> EvalResult:
    """Evaluate checkpoints (a λ ladder) on the images of ``data``, writing the results to ``out_dir``.

    For each checkpoint and image: compress to a real ``.onedc`` file (``out_dir/files/<ckpt>/``),
    decompress (``steps`` generator steps), and score (see the module docstring). With
    ``baselines``: JPEG and WebP at each quality of the ladders, and per image and checkpoint at
    the quality whose file bpp is closest to onedc's (setting ``matched:<ckpt>``). Writes
    ``per_image.csv``, ``per_image.json``, ``aggregate.json`` and ``rd.png``. ``say`` receives
    the one-line notes (missing perceptual weights, failed images), default: stderr.

    An image that cannot be read or coded (:class:`~onedc.errors.OneDCError`) is reported with one
    ``error:`` line through ``say``, left out of every row and aggregate, and listed in
    ``aggregate.json`` (``failed``) and :attr:`EvalResult.failed`; the others are evaluated. With
    ``fail_fast`` the first such error is raised instead; so is the error when no image is left.
    """
    say = say or (lambda message: print(message, file=sys.stderr))
    if not ckpts:
        raise OneDCError("give at least one checkpoint (--ckpt)")
    out_dir = Path(out_dir)
    images = _images(data, max_images)
    labels = checkpoint_labels(ckpts)
    perceptual = PerceptualMetrics.load(weights_dir, device=device, feature_extractor=feature_extractor)
    notes = [m for m in [perceptual.message()] if m]
    for note in notes:
        say(note)

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
            real_features[image_id] = perceptual.patch_features(x)
        return x

    onedc_bpp: dict[tuple[str, str], float] = {}
    for ckpt, label in zip(ckpts, labels):
        codec = OneDCCodec.from_checkpoint(ckpt, device=device)
        codec.check_steps(steps, source=ckpt)
        for image_id, path in progress_bar(images, f"onedc {label}", unit="image", enabled=progress):
            if image_id in failed:
                continue
            try:
                image = load_image(path)
                x = reference(image_id, path)
                start = time.perf_counter()
                data_bytes = codec.compress_image(image)
                enc_ms = (time.perf_counter() - start) * 1e3
                target = atomic_write_bytes(out_dir / "files" / label / f"{image_id}.onedc", data_bytes)
                start = time.perf_counter()
                decoded = to_uint8(codec.decompress_bytes(target.read_bytes(), steps=steps).image)
                dec_ms = (time.perf_counter() - start) * 1e3
            except OneDCError as err:
                fail(image_id, path, err)
                continue
            row = _row("onedc", label, image_id, x, decoded, os.path.getsize(target), perceptual, steps=steps,
                       enc_ms=enc_ms, dec_ms=dec_ms, file=str(target.relative_to(out_dir)))
            onedc_bpp[(label, image_id)] = row["bpp"]
            add(row, perceptual.patch_features(decoded))
        del codec

    # An image that failed under one checkpoint leaves every curve: all points average one image set.
    rows = [row for row in rows if row["image"] not in failed]
    if len(failed) == len(images):
        raise OneDCError(f"none of the {len(images)} image(s) could be evaluated: {'; '.join(failed.values())}")
    if baselines:
        ladders = {"jpeg": jpeg_qualities, "webp": webp_qualities}
        for image_id, path in progress_bar(images, "jpeg/webp", unit="image", enabled=progress):
            if image_id in failed:
                continue
            x = reference(image_id, path)
            # (codec, quality) -> scored row + patch features: a quality shared by the ladder and
            # matched points (or by checkpoints of equal bpp) is scored once.
            scored: dict[tuple[str, int], tuple[dict[str, Any], Tensor | None]] = {}

            def baseline(name: str, quality: int, data_bytes: bytes, setting: str, **extra: Any) -> None:
                if (name, quality) not in scored:
                    decoded = pillow_decode(data_bytes)
                    scored[name, quality] = (_row(name, "", image_id, x, decoded, len(data_bytes), perceptual,
                                                  quality=quality), perceptual.patch_features(decoded))
                row, feats = scored[name, quality]
                add(dict(row, setting=setting, **extra), feats)

            for name, qualities in ladders.items():
                for quality in qualities:
                    baseline(name, quality, pillow_encode(x, name, quality), f"q={quality}")
                for label in labels:
                    target_bpp = onedc_bpp[(label, image_id)]
                    quality, data_bytes = match_quality(x, name, target_bpp)
                    baseline(name, quality, data_bytes, f"matched:{label}", target_bpp=target_bpp)

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

    paths = {
        "csv": write_csv(rows, out_dir / "per_image.csv"),
        "json": write_text(out_dir / "per_image.json", json.dumps(jsonable(rows), indent=1)),
        "aggregate": write_text(out_dir / "aggregate.json", json.dumps(jsonable({
            "checkpoints": {label: str(c) for label, c in zip(labels, ckpts)},
            "images": len(images) - len(failed), "failed": failed, "steps": steps, "notes": notes,
            "missing_weights": perceptual.missing, "results": entries}), indent=1)),
    }
    title = f"{len(images) - len(failed)} image(s) from {data if isinstance(data, (str, Path)) else 'inputs'}"
    paths["plot"] = atomic_write_bytes(out_dir / "rd.png", rd_plot(entries, title=title))
    return EvalResult(rows=rows, aggregate=entries, paths=paths, notes=notes, failed=failed, images=len(images))
