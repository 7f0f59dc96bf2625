"""Perceptual metrics from local weight files: LPIPS (AlexNet), DISTS (VGG16), FID/KID (Inception).

Nothing is downloaded: each backbone is read from a local file found by
:func:`onedc.modules.weights.find_weight_file` in ``--weights-dir``, else ``$ONEDC_WEIGHTS``,
else torch hub's cache; a missing file leaves its metric empty and is named in one message
(:meth:`PerceptualMetrics.message`). FID/KID follow HiFiC / MS-ILLM: 256-px patches, a second
grid shifted by 128 px, pooled over the data set (:func:`fid_patches`).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from onedc.errors import WeightsError
from onedc.modules.losses import ALEXNET_FILE, VGG16_FILE
from onedc.modules.weights import find_weight_file

FID_PATCH = 256
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHT_URLS = {
    ALEXNET_FILE: f"https://download.pytorch.org/models/{ALEXNET_FILE}",
    VGG16_FILE: f"https://download.pytorch.org/models/{VGG16_FILE}",
    INCEPTION_FILE: f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}",
}
WEIGHTS_ENV = "ONEDC_WEIGHTS"
KID_SEED = 0


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


def weights_dirs(weights_dir: str | Path | None = None) -> list[Path] | list[None]:
    """Where backbone weights are searched: ``weights_dir``, else ``$ONEDC_WEIGHTS``; [None] = torch hub's cache."""
    chosen = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_ENV) or None
    return [Path(chosen).expanduser()] if chosen is not None else [None]


def find_weights(name: str, weights_dir: str | Path | None = None) -> Path | None:
    """The file ``name`` in :func:`weights_dirs` (see :func:`onedc.modules.weights.find_weight_file`), or None."""
    return find_weight_file(name, weights_dirs(weights_dir)[0])


class _ReferenceMemo:
    """A network's forward that remembers its last two (input, output) pairs and answers repeats.

    Scoring a row runs LPIPS / DISTS on (decoded, reference); an image's reference is scored
    against every decoded version of it (each checkpoint, anchor quality and matched point), so
    the reference half of each call repeats. Calls alternate decoded, reference, decoded,
    reference, so two slots (least recently used out) keep the reference while decoded images
    pass through. A hit needs an input equal in every value (``torch.equal``), so the outputs
    are the very ones the network would return: the metric's own distance code runs unchanged.
    """

    def __init__(self, forward: Callable[[Tensor], object]) -> None:
        self.forward = forward
        self.slots: list[tuple[Tensor, object]] = []
        self.hits = 0

    def __call__(self, x: Tensor) -> object:
        for index, (key, value) in enumerate(self.slots):
            if key.shape == x.shape and key.dtype == x.dtype and key.device == x.device and torch.equal(key, x):
                self.slots.append(self.slots.pop(index))
                self.hits += 1
                return value
        value = self.forward(x)
        self.slots = (self.slots + [(x.detach().clone(), value)])[-2:]
        return value


def _memoise_reference(network: nn.Module, method: str) -> nn.Module:
    """``network.method`` wrapped in a :class:`_ReferenceMemo` (an instance attribute; the class is untouched)."""
    setattr(network, method, _ReferenceMemo(getattr(network, method)))
    return network


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
        where = folder if folder is not None else Path(torch.hub.get_dir()) / "checkpoints"
        metrics = cls(where=where, device=device)
        if found[ALEXNET_FILE] is not None:
            from onedc.modules.losses import PerceptualLoss

            metrics.lpips = PerceptualLoss(found[ALEXNET_FILE]).to(device)
            _memoise_reference(metrics.lpips.lpips.net, "forward")  # the AlexNet trunk of lpips.LPIPS
        else:
            metrics.missing["LPIPS"] = [ALEXNET_FILE]
        if found[VGG16_FILE] is not None:
            metrics.dists = _memoise_reference(_dists_network(found[VGG16_FILE]).to(device), "forward_once")
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
        if metrics.features is not None:
            # Inception's convolutions in channels-last: ~30 % faster on an AVX-512 CPU, features equal to
            # ~2e-7 relative (float rounding; benchmarks/README.md, eval_speed).
            metrics.features.to(memory_format=torch.channels_last)
        return metrics

    def networks(self) -> dict[str, nn.Module | None]:
        """The metric networks by name (None where absent): what an anchor row's values depend on."""
        return {"lpips": self.lpips, "dists": self.dists, "features": self.features}

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


def frechet_distance_few(real: Tensor, fake: Tensor) -> float:
    """The Fréchet distance of two feature sets (N, d) with fewer samples than dimensions, exactly.

    FID = ‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2 tr (Σ_r Σ_f)^½, with Σ = AᵀA / (n − 1) for the centred
    features A. The eigenvalues of Σ_r Σ_f are the squared singular values of A_r A_fᵀ / √((n_r−1)(n_f−1))
    (an n_r × n_f matrix), so the trace term is the sum of those singular values. torchmetrics
    takes the eigenvalues of the d × d product instead (d = 2048 for Inception): seconds per codec
    setting on a CPU, for a matrix of rank < n. Hand-written for that reason only; it agrees with
    torchmetrics' FID to ~1e-9 relative (tests/evaluation/test_eval.py).
    """
    real, fake = real.double(), fake.double()
    a_r, a_f = real - real.mean(0), fake - fake.mean(0)
    n_r, n_f = len(real), len(fake)
    mean_term = float(((real.mean(0) - fake.mean(0)) ** 2).sum())
    traces = float((a_r ** 2).sum()) / (n_r - 1) + float((a_f ** 2).sum()) / (n_f - 1)
    cross = torch.linalg.svdvals(a_r @ a_f.T).sum() / math.sqrt((n_r - 1) * (n_f - 1))
    return mean_term + traces - 2.0 * float(cross)


def fid_kid(real: Sequence[Tensor], fake: Sequence[Tensor], subsets: int = 100,
            subset_size: int = 1000) -> dict[str, float | int | None]:
    """FID and KID (mean, std) of pooled patch features with torchmetrics; None below 2 patches.

    ``real`` / ``fake`` are lists of (N_i, d) feature tensors (one per image). KID's random subsets
    are drawn from a fixed seed (:data:`KID_SEED`, the global RNG left untouched), so the same
    features give the same KID in every run and process. KID's subset size
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
    if min(len(real_f), len(fake_f)) < dim:
        out["fid"] = frechet_distance_few(real_f, fake_f)
    else:
        fid = FrechetInceptionDistance(feature=_Precomputed(dim)).double()
        fid.update(real_f, real=True)
        fid.update(fake_f, real=False)
        out["fid"] = float(fid.compute())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "KID saves all features in memory": that is the point here
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=subsets, subset_size=min(subset_size, n))
    kid.update(real_f, real=True)
    kid.update(fake_f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)  # torch seeds each process at random: the subsets would differ per run
        mean, std = kid.compute()
    out["kid"], out["kid_std"] = float(mean), float(std)
    return out
