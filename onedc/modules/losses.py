"""Losses of the finetune stage: GAN objectives, the adaptive GAN weight, and LPIPS.

GAN losses are small objects with two calls (logits: real > 0)::

    generator_loss(fake_logits)                    -> scalar the generator minimises
    discriminator_loss(real_logits, fake_logits)   -> scalar the critic minimises

``NonSaturatingLoss`` (softplus; Goodfellow et al. 2014, the OneDC reference) and ``HingeLoss``
(Lim & Ye 2017; taming/VQGAN). :class:`PerceptualLoss` is LPIPS (Zhang et al. 2018) with one of
two backbones, each read from local files (nothing is downloaded):

``alex``  AlexNet, v0.1, from the ``lpips`` package (its calibrated heads ship in the wheel).
``vgg``   what ``piq.LPIPS(replace_pooling=True)`` computes, the loss of the paper's stage I
          (docs/reference-model.md §10.1): VGG16 with average instead of max pooling, ImageNet
          normalisation of [0, 1] input, relu1_2 … relu5_3 unit-normalised, squared differences
          weighted per channel, spatial mean, summed. Computed by ``piq``'s own ``ContentLoss``
          (the class ``piq.LPIPS`` is), built here around a VGG16 and heads read from files,
          because ``piq.LPIPS`` itself only fetches both from the network.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onedc.errors import ConfigError, WeightsError
from onedc.modules.weights import find_weight_file, weight_file_candidates

log = logging.getLogger("onedc")

# torchvision's ImageNet AlexNet (what lpips.LPIPS(net="alex") downloads through torch.hub).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
# torchvision's ImageNet VGG16 and piq's LPIPS heads: the two files piq.LPIPS() puts in torch hub's cache.
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
PIQ_LPIPS_FILE = "lpips_weights.pt"
PIQ_LPIPS_URL = f"https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/{PIQ_LPIPS_FILE}"
# piq's LPIPS layers relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 as indices of torchvision's vgg16().features.
VGG16_LPIPS_LAYERS = ("3", "8", "15", "22", "29")
VGG16_LPIPS_WIDTHS = (64, 128, 256, 512, 512)
LPIPS_BACKBONES = ("alex", "vgg")


class GANLoss(Protocol):
    """The interface of a GAN objective (logits: real > 0)."""

    def generator_loss(self, fake_logits: Tensor) -> Tensor: ...

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor: ...


class NonSaturatingLoss:
    """Non-saturating (softplus) GAN loss: G ``E softplus(-D(x̂))``; D ``E softplus(-D(x)) + E softplus(D(x̂))``."""

    name = "softplus"

    def generator_loss(self, fake_logits: Tensor) -> Tensor:
        return F.softplus(-fake_logits.float()).mean()

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


class HingeLoss:
    """Hinge GAN loss: G ``-E D(x̂)``; D ``E relu(1 - D(x)) + E relu(1 + D(x̂))``."""

    name = "hinge"

    def generator_loss(self, fake_logits: Tensor) -> Tensor:
        return -fake_logits.float().mean()

    def discriminator_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


GAN_LOSSES: dict[str, type] = {"softplus": NonSaturatingLoss, "non_saturating": NonSaturatingLoss, "hinge": HingeLoss}


def build_gan_loss(name: str) -> GANLoss:
    """The GAN objective called ``name`` (``softplus`` / ``non_saturating`` or ``hinge``)."""
    if name not in GAN_LOSSES:
        raise ConfigError(f"unknown GAN loss '{name}'; choose one of {', '.join(GAN_LOSSES)}")
    return GAN_LOSSES[name]()


def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(fraction of real patches scored real (> 0), fraction of generated patches scored fake (< 0))."""
    return (real_logits.detach() > 0).float().mean(), (fake_logits.detach() < 0).float().mean()


def adaptive_gan_weight(reconstruction: Tensor, adversarial: Tensor, last_layer: Tensor,
                        max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance (Esser et al. 2021): ``‖∇_w L_rec‖ / (‖∇_w L_adv‖ + 1e-4)`` at the last generator layer.

    Detached, clamped to ``[0, max_weight]``. Both losses must still hold their graphs (the
    gradients are taken with ``retain_graph=True``); nothing is accumulated into ``.grad``.
    """
    rec_grad = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------- LPIPS
def alexnet_weights_path(location: str | Path | None) -> Path:
    """Where the AlexNet backbone of LPIPS is read from, for ``location`` given in config.

    ``None``: torch hub's cache (``$TORCH_HOME/hub/checkpoints/`` + :data:`ALEXNET_FILE`), where
    ``lpips``/torchvision would have downloaded it. A file: that file. A directory: the file in
    it, in its ``checkpoints/`` or in its ``hub/checkpoints/`` (a torch hub or TORCH_HOME dir).
    Raises :class:`WeightsError` naming the file and where to put it when nothing is found.
    """
    candidates = weight_file_candidates(ALEXNET_FILE, location)
    found = find_weight_file(ALEXNET_FILE, location)
    if found is not None:
        return found
    raise WeightsError(
        f"LPIPS needs torchvision's ImageNet AlexNet weights, file {ALEXNET_FILE} ({ALEXNET_URL}), and none was "
        f"found at: {', '.join(str(c) for c in candidates)}. Download it on a machine with network access and "
        f"put it at {candidates[0]}, or set stage.lpips.weights=/path/to/{ALEXNET_FILE} (or to a torch hub dir "
        "holding checkpoints/). Or set stage.lpips_weight=0 to train without LPIPS"
    )


def _load_alexnet_features(trunk: nn.Module, path: Path) -> None:
    """Copy torchvision AlexNet ``features.<i>.*`` tensors into lpips' ``slice<k>.<i>.*`` layers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise WeightsError(f"cannot read the AlexNet weights {path}: {err}") from err
    own = trunk.state_dict()
    by_index = {key.split(".", 1)[1]: key for key in own}  # "0.weight" -> "slice1.0.weight"
    wanted = {by_index[key[len("features."):]]: value for key, value in state.items()
              if key.startswith("features.") and key[len("features."):] in by_index}
    bad = [k for k in own if k not in wanted or wanted[k].shape != own[k].shape]
    if bad:
        raise WeightsError(f"{path} is not torchvision's AlexNet ({ALEXNET_FILE}): missing or misshaped "
                           f"{', '.join(bad)}")
    trunk.load_state_dict(wanted)


def vgg_lpips_weight_paths(location: str | Path | None) -> tuple[Path, Path]:
    """(VGG16 file, piq heads file) of the ``vgg`` LPIPS for ``location`` given in config.

    ``None``: torch hub's cache, where ``piq.LPIPS()`` would have downloaded both; a directory:
    each file in it, in its ``checkpoints/`` or ``hub/checkpoints/``. A single file cannot hold
    both. Raises :class:`WeightsError` naming each missing file, its URL and where to put it.
    """
    if location is not None and Path(location).expanduser().is_file():
        raise WeightsError(f"stage.lpips.weights={location} is a file, but the VGG LPIPS needs two ({VGG16_FILE} and "
                           f"{PIQ_LPIPS_FILE}): set it to a directory (or torch hub dir) holding both")
    found, missing = [], []
    for name, url in ((VGG16_FILE, VGG16_URL), (PIQ_LPIPS_FILE, PIQ_LPIPS_URL)):
        path = find_weight_file(name, location)
        found.append(path)
        if path is None:
            missing.append(f"{name} ({url})")
    if missing:
        where = weight_file_candidates(VGG16_FILE, location)[0].parent
        raise WeightsError(
            f"the VGG LPIPS (piq's, docs/reference-model.md §10.1) needs {' and '.join(missing)}, not found in "
            f"{where}. Download on a machine with network access and put them in {where}, or set "
            "stage.lpips.weights=/dir/holding/both (or a torch hub dir). Or set the stage's lpips_weight=0")
    return found[0], found[1]


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same layer indices), without the 120M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=False)


def _read(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise WeightsError(f"cannot read {what} {path}: {err}") from err


def _load_vgg16_features(features: nn.Sequential, path: Path) -> None:
    """Copy torchvision VGG16 ``features.<i>.*`` tensors (the classifier is ignored) into ``features``."""
    state = _read(path, "the VGG16 weights")
    own = features.state_dict()
    wanted = {key: state.get(f"features.{key}") for key in own} if isinstance(state, dict) else {}
    bad = [k for k in own if not isinstance(wanted.get(k), Tensor) or wanted[k].shape != own[k].shape]
    if bad:
        raise WeightsError(f"{path} is not torchvision's VGG16 ({VGG16_FILE}): missing or misshaped "
                           f"{', '.join('features.' + k for k in bad[:4])}")
    features.load_state_dict({k: v.float() for k, v in wanted.items()})


def _lpips_heads(path: Path) -> list[Tensor]:
    """piq's five per-channel LPIPS weights as (1, C, 1, 1) tensors, from piq's file (a list of five
    tensors) or from an ``lpips`` package state dict (``lin<k>.model.1.weight``, its ``weights/v0.1/vgg.pth``)."""
    value = _read(path, "the LPIPS heads")
    if isinstance(value, dict):
        value = [value.get(f"lin{k}.model.1.weight") for k in range(len(VGG16_LPIPS_WIDTHS))]
    heads = list(value) if isinstance(value, (list, tuple)) else []
    if len(heads) != len(VGG16_LPIPS_WIDTHS) or not all(
            isinstance(h, Tensor) and h.numel() == width for h, width in zip(heads, VGG16_LPIPS_WIDTHS)):
        raise WeightsError(f"{path} is not piq's LPIPS heads ({PIQ_LPIPS_FILE}: five tensors of "
                           f"{'/'.join(map(str, VGG16_LPIPS_WIDTHS))} channel weights)")
    return [h.detach().float().reshape(1, -1, 1, 1) for h in heads]


def _piq_vgg_lpips(paths: tuple[Path, Path] | None, seed: int) -> nn.Module:
    """piq's ``ContentLoss`` configured as ``piq.LPIPS(replace_pooling=True, reduction="none")`` does, around
    a VGG16 and heads from ``paths`` (or random ones drawn from ``seed``: tests only)."""
    try:
        from piq.perceptual import ContentLoss
    except ImportError as err:
        raise ConfigError(f"stage.lpips.backbone=vgg needs the piq package ({err}): pip install 'onedc[paper]' "
                          "(or piq), or use backbone=alex") from err

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = _vgg16_features()
        heads = [torch.rand(1, width, 1, 1) for width in VGG16_LPIPS_WIDTHS]
    if paths is not None:
        _load_vgg16_features(features, paths[0])
        heads = _lpips_heads(paths[1])
    # The arguments piq.LPIPS passes to ContentLoss (its defaults: ImageNet mean/std, distance mse).
    return ContentLoss(features, layers=VGG16_LPIPS_LAYERS, weights=heads, replace_pooling=True, distance="mse",
                       reduction="none", normalize_features=True)


class PerceptualLoss(nn.Module):
    """LPIPS as a frozen loss: ``forward(x̂, x) -> (B,)`` distances, images in [-1, 1].

    ``backbone="alex"``: LPIPS v0.1 of the ``lpips`` package; its calibrated linear heads ship in
    the wheel, the AlexNet is read from :func:`alexnet_weights_path` (``weights``).
    ``backbone="vgg"``: ``piq.LPIPS(replace_pooling=True)`` (VGG16, average pooling; see the module
    docstring), the images mapped to [0, 1] (x·0.5+0.5) as the paper's stage I feeds it; the VGG16
    and the heads are read from :func:`vgg_lpips_weight_paths` (``weights``).
    ``random_backbone=True`` (TESTS ONLY) keeps a random network drawn from ``seed`` instead (random
    heads too for ``vgg``) and says so in the log: its values are not LPIPS. It stays in eval mode
    and has no gradients. It is a loss, not model state: stages hold it outside their
    ``state_dict`` (as the distill stage holds its teacher), so checkpoints neither carry it nor
    can overwrite a real backbone with a random one.

    Args:
        weights: where the weights are: a file or torch hub dir (``alex``), a dir or torch hub dir
            holding both files (``vgg``); None: torch hub's cache.
        backbone: ``alex`` or ``vgg``.
        random_backbone: TESTS ONLY: random network, no weights file needed.
        seed: seed of the random network.
    """

    def __init__(self, weights: str | Path | None = None, *, backbone: str = "alex", random_backbone: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        if backbone not in LPIPS_BACKBONES:
            hint = " (a weights file or dir goes to stage.lpips.weights)" if any(
                c in str(backbone) for c in "/\\.") else ""
            raise ConfigError(f"stage.lpips.backbone must be one of {', '.join(LPIPS_BACKBONES)}, got {backbone!r}{hint}")
        self.backbone = backbone
        if backbone == "vgg":
            paths = None if random_backbone else vgg_lpips_weight_paths(weights)
            self.piq = _piq_vgg_lpips(paths, seed)
            source = None if paths is None else f"VGG16 from {paths[0]}, heads from {paths[1]}"
        else:
            import lpips

            path = None if random_backbone else alexnet_weights_path(weights)
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                torch.manual_seed(seed)
                # lpips calls torchvision's alexnet(pretrained=False), which torchvision flags as deprecated.
                warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
                # pnet_rand: no torchvision download; pretrained: the shipped linear heads are loaded.
                self.lpips = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
            if path is not None:
                _load_alexnet_features(self.lpips.net, path)
            source = None if path is None else f"backbone loaded from {path}"
        name = {"alex": "AlexNet", "vgg": "VGG16, average pooling (piq)"}[backbone]
        if source is None:
            log.warning("LPIPS with RANDOM backbone (tests only), %s: its values are not LPIPS. "
                        "Set stage.lpips.random_backbone=false and give its weights for real training", name)
        else:
            log.info("LPIPS (%s) %s", name, source)
        self.random_backbone = bool(random_backbone)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # frozen forever (dropout in the heads stays off)

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Per-image LPIPS distance (B,) between images in [-1, 1]; differentiable w.r.t. both."""
        if self.backbone == "vgg":
            return self.piq(x_hat.float() * 0.5 + 0.5, x.float() * 0.5 + 0.5).flatten()
        return self.lpips(x_hat.float(), x.float()).flatten()
