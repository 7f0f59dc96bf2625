"""Rate-distortion evaluation the way the field reports it (ONEDC.md §5), with real files.

::

    image ─ OneDCCodec.compress_image ─> .onedc bytes ─ (written to OUT/files/) ─> bpp = 8·bytes / (H·W)
                                            └─ decompress_bytes(steps) ─> x̂
    image ─ Pillow JPEG / WebP: a fixed quality ladder + per image the quality whose file bpp is
            closest to onedc's (binary search) ─> bytes ─> bpp, x̂
    (x, x̂) both rounded to 8 bits ─> PSNR, MS-SSIM                         (always)
                                   ─> LPIPS (AlexNet), DISTS (VGG16)        (when their weights are local)
    256-px patches of x and x̂ (grid + a grid shifted by 128 px) ─ Inception ─> FID, KID per codec setting

Outputs (see :func:`evaluate`): ``per_image.csv`` / ``per_image.json`` (one row per image and codec
setting), ``aggregate.json`` (means per codec setting, FID/KID, notes) and ``rd.png`` (bpp vs PSNR
and bpp vs MS-SSIM: the onedc λ ladder, one point per checkpoint, against JPEG and WebP).

Conventions. bpp divides the whole file (header included) by the original pixel count; the
aggregate bpp/PSNR/... are means over images (as CompressAI and the Kodak tables report them).
PSNR and MS-SSIM are computed on the 8-bit images a viewer would see (data range 255).
MS-SSIM uses the standard 5 scales and 11-px Gaussian window when the image is large enough
(min side >= 176 for torchmetrics); smaller images use as many of the finest scales as fit,
with the standard weights renormalised to sum to 1, and a smaller odd window below 11 px
(:func:`ms_ssim_settings`; the row's ``ms_ssim_scales`` column says how many were used).

Perceptual backbones cannot be downloaded here: they are read from local files (``--weights-dir``,
else ``$ONEDC_WEIGHTS``, else torch hub's cache ``$TORCH_HOME/hub/checkpoints``), looked up as
``DIR/NAME``, ``DIR/checkpoints/NAME`` or ``DIR/hub/checkpoints/NAME``:

=========== ============================================== ===============================================
metric      file                                           source
=========== ============================================== ===============================================
LPIPS       ``alexnet-owt-7be5be79.pth``                   torchvision AlexNet (lpips v0.1 heads ship in the wheel)
DISTS       ``vgg16-397923af.pth``                         torchvision VGG16 (alpha/beta ship in torchmetrics)
FID, KID    ``weights-inception-2015-12-05-6726825d.pth``  torch-fidelity's Inception (needs ``torch-fidelity``)
=========== ============================================== ===============================================

A missing file leaves its columns empty and is named in one message; nothing is downloaded.
LPIPS and DISTS are computed on whole images; FID/KID follow HiFiC / MS-ILLM: non-overlapping
256x256 patches, plus a second pass over the image shifted by 128 px in both directions, all
pooled over the data set (images smaller than 256 px give no patches).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from onedc.errors import OneDCError, WeightsError
from onedc.modules.losses import ALEXNET_FILE

# Standard MS-SSIM weights (Wang, Simoncelli & Bovik 2003), finest scale first.
MS_SSIM_BETAS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
FID_PATCH = 256

VGG16_FILE = "vgg16-397923af.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHT_URLS = {
    ALEXNET_FILE: f"https://download.pytorch.org/models/{ALEXNET_FILE}",
    VGG16_FILE: f"https://download.pytorch.org/models/{VGG16_FILE}",
    INCEPTION_FILE: f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}",
}
WEIGHTS_ENV = "ONEDC_WEIGHTS"

# Fixed quality ladders of the baseline curves (Pillow's quality scales).
JPEG_QUALITIES: tuple[int, ...] = (5, 10, 20, 30, 50, 75, 90)
WEBP_QUALITIES: tuple[int, ...] = (5, 10, 20, 30, 50, 75, 90)
BASELINES: dict[str, tuple[str, int, int]] = {  # name -> (Pillow format, lowest quality, highest quality)
    "jpeg": ("JPEG", 1, 100),
    "webp": ("WEBP", 0, 100),
}

ROW_FIELDS: tuple[str, ...] = (
    "codec", "setting", "image", "height", "width", "bytes", "bpp", "psnr", "ms_ssim", "ms_ssim_scales",
    "lpips", "dists", "quality", "target_bpp", "steps", "enc_ms", "dec_ms", "file",
)
METRICS: tuple[str, ...] = ("bpp", "psnr", "ms_ssim", "lpips", "dists")


# --------------------------------------------------------------------------- pixel metrics
def to_uint8(image: Tensor) -> Tensor:
    """(3, H, W) image in [-1, 1] -> (3, H, W) uint8, rounded as when saved to an 8-bit file."""
    return ((image.detach().float().cpu().nan_to_num() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def psnr_uint8(reference: Tensor, decoded: Tensor) -> float:
    """PSNR in dB of two uint8 images of the same shape: ``10·log10(255² / MSE)`` over all values.

    Identical images give ``inf``.
    """
    mse = float(((reference.double() - decoded.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ms_ssim_settings(height: int, width: int) -> tuple[int, float, tuple[float, ...]] | None:
    """(window size, Gaussian sigma, betas) of MS-SSIM for a ``height`` x ``width`` image; None under 3 px.

    The standard setting (11-px window, sigma 1.5, 5 scales) when torchmetrics accepts it;
    otherwise the most of the finest scales that fit — torchmetrics' size rule
    ``side // (n-1)² > k-1`` and the reflect padding ``(k-1)/2 < side / 2^(n-1)`` at the coarsest
    scale — with the standard betas renormalised; below 11 px one scale with a smaller odd
    window k. torchmetrics sizes a Gaussian window from sigma (``2·int(3.5σ+0.5)+1``), so a
    smaller window comes with sigma ``(k-1)/7``.
    """
    side = min(height, width)
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        div = max(1, scales - 1) ** 2
        if side // div > MS_SSIM_KERNEL - 1 and (MS_SSIM_KERNEL - 1) // 2 < side >> (scales - 1):
            if scales == len(MS_SSIM_BETAS):
                return MS_SSIM_KERNEL, 1.5, MS_SSIM_BETAS  # as published (they sum to 1.0001)
            betas = MS_SSIM_BETAS[:scales]
            return MS_SSIM_KERNEL, 1.5, tuple(b / sum(betas) for b in betas)
    kernel = side if side % 2 else side - 1
    return (kernel, (kernel - 1) / 7, (1.0,)) if kernel >= 3 else None


def ms_ssim_uint8(reference: Tensor, decoded: Tensor) -> tuple[float | None, int]:
    """(MS-SSIM, number of scales used) of two uint8 (3, H, W) images, data range 255.

    torchmetrics' ``MultiScaleStructuralSimilarityIndexMeasure`` with :func:`ms_ssim_settings`;
    (None, 0) for images under 3 px.
    """
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    settings = ms_ssim_settings(int(reference.shape[-2]), int(reference.shape[-1]))
    if settings is None:
        return None, 0
    kernel, sigma, betas = settings
    metric = MultiScaleStructuralSimilarityIndexMeasure(data_range=255.0, kernel_size=kernel, sigma=sigma,
                                                        betas=betas)
    metric.update(decoded[None].float(), reference[None].float())  # float64 convolutions are ~10x slower on CPUs
    value = metric.compute()
    return float(value), len(betas)


def fid_patches(images: Tensor, size: int = FID_PATCH) -> Tensor:
    """HiFiC / MS-ILLM patches of (B, 3, H, W) images: a grid of non-overlapping ``size`` patches,
    then the same grid over the image shifted by ``size // 2`` in both directions.

    Returns (N, 3, size, size); N = ⌊H/s⌋·⌊W/s⌋ + ⌊(H-s/2)/s⌋·⌊(W-s/2)/s⌋ per image (0 when small).
    """
    def grid(x: Tensor) -> Tensor:
        rows, cols = x.shape[-2] // size, x.shape[-1] // size
        x = x[..., : rows * size, : cols * size]
        b, c = x.shape[:2]
        tiles = x.reshape(b, c, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(b * rows * cols, c, size, size)

    half = size // 2
    return torch.cat([grid(images), grid(images[..., half:, half:])])


# --------------------------------------------------------------------------- perceptual metrics
def weights_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for backbone weights: ``weights_dir``, else ``$ONEDC_WEIGHTS``, else torch hub's dir."""
    chosen = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_ENV) or None
    return [Path(chosen).expanduser()] if chosen is not None else [Path(torch.hub.get_dir())]


def find_weights(name: str, weights_dir: str | Path | None = None) -> Path | None:
    """The file ``name`` in :func:`weights_dirs` (as ``DIR/name``, ``DIR/checkpoints/name`` or
    ``DIR/hub/checkpoints/name``), or None."""
    for folder in weights_dirs(weights_dir):
        for candidate in (folder / name, folder / "checkpoints" / name, folder / "hub" / "checkpoints" / name):
            if candidate.is_file():
                return candidate
    return None


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/KID take features computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


def _dists_network(vgg_file: Path) -> nn.Module:
    """torchmetrics' DISTS network with its VGG16 trunk read from ``vgg_file`` instead of downloaded.

    ``DISTSNetwork`` builds its trunk with ``torchvision.models.vgg16(weights=DEFAULT)``, which
    downloads; it is handed a VGG16 ``features`` stack already loaded from the local file. Its
    alpha/beta weights ship inside torchmetrics and are loaded by it.
    """
    from types import SimpleNamespace
    from unittest import mock

    import torchmetrics.functional.image.dists as tm_dists
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=False)
    try:
        state = torch.load(vgg_file, map_location="cpu", weights_only=True)
        features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    except Exception as err:  # unreadable file, or not a VGG16 state dict
        raise WeightsError(f"{vgg_file} is not torchvision's VGG16 ({VGG16_FILE}): {err}") from err
    with mock.patch.object(tm_dists, "vgg16", lambda *args, **kwargs: SimpleNamespace(features=features)):
        network = tm_dists.DISTSNetwork(load_weights=True)
    return network.eval().requires_grad_(False)


def _inception(inception_file: Path) -> nn.Module:
    """torch-fidelity's FID Inception (2048-d pool features) from a local weights file, via torchmetrics."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(inception_file))


@dataclass
class PerceptualMetrics:
    """The perceptual metrics whose weights are present; the others are listed in ``missing``.

    Build with :meth:`load`. ``lpips`` / ``dists`` take (x̂, x) images in [-1, 1] (B, 3, H, W)
    and return (B,) distances; ``features`` maps uint8 patches (N, 3, 256, 256) to (N, d).
    """

    lpips: nn.Module | None = None
    dists: nn.Module | None = None
    features: nn.Module | None = None
    missing: dict[str, list[str]] = field(default_factory=dict)  # metric -> the files/packages it lacks
    where: Path | None = None  # the folder a missing file should go to
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
             feature_extractor: nn.Module | None = None) -> "PerceptualMetrics":
        """Load every metric whose weights file is found (see :func:`find_weights`); never downloads.

        ``feature_extractor`` replaces the Inception network of FID/KID (any module mapping
        uint8 patches to (N, d) features; tests use a random one, whose values are not FID).
        """
        device = torch.device(device)
        found = {name: find_weights(name, weights_dir) for name in (ALEXNET_FILE, VGG16_FILE, INCEPTION_FILE)}
        folder = weights_dirs(weights_dir)[0]
        # Without a chosen dir the files go where torch hub would have cached them.
        where = folder if weights_dir is not None or os.environ.get(WEIGHTS_ENV) else folder / "checkpoints"
        metrics = cls(where=where, device=device)
        if found[ALEXNET_FILE] is not None:
            from onedc.modules.losses import PerceptualLoss

            metrics.lpips = PerceptualLoss(found[ALEXNET_FILE]).to(device)
        else:
            metrics.missing["LPIPS"] = [ALEXNET_FILE]
        if found[VGG16_FILE] is not None:
            metrics.dists = _dists_network(found[VGG16_FILE]).to(device)
        else:
            metrics.missing["DISTS"] = [VGG16_FILE]
        if feature_extractor is not None:
            metrics.features = feature_extractor.to(device).eval()
        else:
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

            needs = [] if found[INCEPTION_FILE] is not None else [INCEPTION_FILE]
            if not _TORCH_FIDELITY_AVAILABLE:
                needs.append("the torch-fidelity package (pip install torch-fidelity)")
            if needs:
                metrics.missing["FID/KID"] = needs
            else:
                metrics.features = _inception(found[INCEPTION_FILE]).to(device)
        return metrics

    def message(self) -> str | None:
        """One line naming every missing weights file and where to put it (None when all are present)."""
        if not self.missing:
            return None
        needs = "; ".join(f"{metric} needs {' and '.join(what)}" for metric, what in self.missing.items())
        sources = ", ".join(WEIGHT_URLS[f] for what in self.missing.values() for f in what if f in WEIGHT_URLS)
        where = (f" Nothing is downloaded: fetch {sources} on a machine with network access and put the files "
                 f"in {self.where} (or pass --weights-dir DIR, or set ${WEIGHTS_ENV}=DIR)") if sources else ""
        return f"perceptual metrics skipped, their columns are left empty: {needs}.{where}"

    @torch.no_grad()
    def distances(self, reference: Tensor, decoded: Tensor) -> dict[str, float | None]:
        """LPIPS and DISTS of one pair of uint8 (3, H, W) images (None where unavailable or too small)."""
        out: dict[str, float | None] = {"lpips": None, "dists": None}
        x = reference[None].to(self.device).float() / 127.5 - 1.0
        x_hat = decoded[None].to(self.device).float() / 127.5 - 1.0
        if self.lpips is not None:
            out["lpips"] = _guarded(lambda: float(self.lpips(x_hat, x)[0]))
        if self.dists is not None:
            out["dists"] = _guarded(lambda: float(self.dists((x_hat + 1) / 2, (x + 1) / 2)))
        return out

    @torch.no_grad()
    def patch_features(self, image: Tensor, batch_size: int = 16) -> Tensor | None:
        """Features (N, d) of the FID patches of one uint8 (3, H, W) image; None without an extractor."""
        if self.features is None:
            return None
        patches = fid_patches(image[None])
        if not len(patches):
            return torch.zeros(0, 0)
        chunks = [self.features(patches[i:i + batch_size].to(self.device)).double().cpu()
                  for i in range(0, len(patches), batch_size)]
        return torch.cat([c.reshape(c.shape[0], -1) for c in chunks])


def _guarded(compute: Callable[[], float]) -> float | None:
    """A metric value, or None when the backbone cannot run on this image (too small for its pooling)."""
    try:
        return compute()
    except RuntimeError:
        return None


def fid_kid(real: Sequence[Tensor], fake: Sequence[Tensor], subsets: int = 100,
            subset_size: int = 1000) -> dict[str, float | int | None]:
    """FID and KID (mean, std) of pooled patch features with torchmetrics; None below 2 patches.

    ``real`` / ``fake`` are lists of (N_i, d) feature tensors (one per image). KID's subset size
    is lowered to the number of patches when there are fewer than ``subset_size``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real_f = torch.cat([r for r in real if r.numel()]) if any(r.numel() for r in real) else torch.zeros(0, 0)
    fake_f = torch.cat([f for f in fake if f.numel()]) if any(f.numel() for f in fake) else torch.zeros(0, 0)
    n = min(len(real_f), len(fake_f))
    out: dict[str, float | int | None] = {"fid": None, "kid": None, "kid_std": None, "fid_patches": n}
    if n < 2:
        return out
    dim = int(real_f.shape[1])
    fid = FrechetInceptionDistance(feature=_Precomputed(dim)).double()
    fid.update(real_f, real=True)
    fid.update(fake_f, real=False)
    out["fid"] = float(fid.compute())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "KID saves all features in memory": that is the point here
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=subsets, subset_size=min(subset_size, n))
    kid.update(real_f, real=True)
    kid.update(fake_f, real=False)
    mean, std = kid.compute()
    out["kid"], out["kid_std"] = float(mean), float(std)
    return out


# --------------------------------------------------------------------------- Pillow baselines
def _pil(image: Tensor):
    from PIL import Image

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
    """Decode JPEG/WebP bytes into a uint8 (3, H, W) tensor."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


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


# --------------------------------------------------------------------------- rows and outputs
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> Path:
    from onedc.io import atomic_write_bytes

    return atomic_write_bytes(path, text.encode())


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``rows`` as CSV with the :data:`ROW_FIELDS` columns; None is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in ROW_FIELDS})
    return _write_text(path, buffer.getvalue())


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


# --------------------------------------------------------------------------- the run
@dataclass
class EvalResult:
    """What :func:`evaluate` produced: rows, aggregate entries, written paths, and notes."""

    rows: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    paths: dict[str, Path]
    notes: list[str]


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
    from onedc.datamodules.image_folder import list_images

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


def _progress(items: list[Any], desc: str, enabled: bool) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", disable=not enabled, file=sys.stderr)


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
) -> EvalResult:
    """Evaluate checkpoints (a λ ladder) on the images of ``data``, writing the results to ``out_dir``.

    For each checkpoint and image: compress to a real ``.onedc`` file (``out_dir/files/<ckpt>/``),
    decompress (``steps`` generator steps), and score (see the module docstring). With
    ``baselines``: JPEG and WebP at each quality of the ladders, and per image and checkpoint at
    the quality whose file bpp is closest to onedc's (setting ``matched:<ckpt>``). Writes
    ``per_image.csv``, ``per_image.json``, ``aggregate.json`` and ``rd.png``. ``say`` receives
    the one-line notes (missing perceptual weights), default: stderr.
    """
    from onedc.datamodules.image_folder import load_image
    from onedc.inference import OneDCCodec
    from onedc.io import atomic_write_bytes

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
    fake_features: dict[tuple[str, str], list[Tensor]] = {}

    def add(row: dict[str, Any], feats: Tensor | None) -> None:
        rows.append(row)
        if feats is not None:
            fake_features.setdefault((row["codec"], row["setting"]), []).append(feats)

    def reference(image_id: str, path: Path) -> Tensor:
        x = to_uint8(load_image(path))
        if image_id not in real_features:
            real_features[image_id] = perceptual.patch_features(x)
        return x

    onedc_bpp: dict[tuple[str, str], float] = {}
    for ckpt, label in zip(ckpts, labels):
        codec = OneDCCodec.from_checkpoint(ckpt, device=device)
        if steps > 1 and codec.generator is None:
            raise OneDCError(f"steps={steps} (multi-step decoding) needs a one-step generator and {ckpt} has none "
                             "(a distill-stage checkpoint): evaluate it with steps=1")
        for image_id, path in _progress(images, f"onedc {label}", progress):
            image = load_image(path)
            x = reference(image_id, path)
            start = time.perf_counter()
            data_bytes = codec.compress_image(image)
            enc_ms = (time.perf_counter() - start) * 1e3
            target = atomic_write_bytes(out_dir / "files" / label / f"{image_id}.onedc", data_bytes)
            start = time.perf_counter()
            decoded = to_uint8(codec.decompress_bytes(target.read_bytes(), steps=steps).image)
            dec_ms = (time.perf_counter() - start) * 1e3
            row = _row("onedc", label, image_id, x, decoded, os.path.getsize(target), perceptual, steps=steps,
                       enc_ms=enc_ms, dec_ms=dec_ms, file=str(target.relative_to(out_dir)))
            onedc_bpp[(label, image_id)] = row["bpp"]
            add(row, perceptual.patch_features(decoded))
        del codec

    if baselines:
        ladders = {"jpeg": jpeg_qualities, "webp": webp_qualities}
        for image_id, path in _progress(images, "jpeg/webp", progress):
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
        real = [f for f in real_features.values() if f is not None]
        for entry in entries:
            entry.update(fid_kid(real, fake_features.get((entry["codec"], entry["setting"]), [])))
        if all(e["fid_patches"] < 2 for e in entries):
            notes.append(f"FID/KID left empty: fewer than 2 patches of {FID_PATCH} px (images too small)")
            say(notes[-1])
    else:
        for entry in entries:
            entry.update({"fid": None, "kid": None, "kid_std": None, "fid_patches": None})

    paths = {
        "csv": write_csv(rows, out_dir / "per_image.csv"),
        "json": _write_text(out_dir / "per_image.json", json.dumps(_jsonable(rows), indent=1)),
        "aggregate": _write_text(out_dir / "aggregate.json", json.dumps(_jsonable({
            "checkpoints": {label: str(c) for label, c in zip(labels, ckpts)},
            "images": len(images), "steps": steps, "notes": notes,
            "missing_weights": perceptual.missing, "results": entries}), indent=1)),
    }
    title = f"{len(images)} image(s) from {data if isinstance(data, (str, Path)) else 'inputs'}"
    paths["plot"] = atomic_write_bytes(out_dir / "rd.png", rd_plot(entries, title=title))
    return EvalResult(rows=rows, aggregate=entries, paths=paths, notes=notes)
