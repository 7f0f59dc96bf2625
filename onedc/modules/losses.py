"""Losses of the finetune stage: GAN objectives, the adaptive GAN weight, and LPIPS.

GAN losses are small objects with two calls (logits: real > 0)::

    generator_loss(fake_logits)                    -> scalar the generator minimises
    discriminator_loss(real_logits, fake_logits)   -> scalar the critic minimises

``NonSaturatingLoss`` (softplus; Goodfellow et al. 2014, the OneDC reference) and ``HingeLoss``
(Lim & Ye 2017; taming/VQGAN). :class:`PerceptualLoss` is LPIPS (Zhang et al. 2018, AlexNet,
v0.1) from the ``lpips`` package with the backbone read from a local file: nothing is downloaded.
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
        f"put it at {candidates[0]}, or set stage.lpips.backbone=/path/to/{ALEXNET_FILE} (or to a torch hub dir "
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


class PerceptualLoss(nn.Module):
    """LPIPS (AlexNet, v0.1) as a frozen loss: ``forward(x̂, x) -> (B,)`` distances, images in [-1, 1].

    The linear heads are the calibrated ones shipped inside the ``lpips`` wheel; the AlexNet
    backbone is read from :func:`alexnet_weights_path` (``backbone``). ``random_backbone=True``
    (TESTS ONLY) keeps a random AlexNet drawn from ``seed`` instead and says so in the log: its
    values are not LPIPS. It stays in eval mode and has no gradients. It is a loss, not model
    state: stages hold it outside their ``state_dict`` (as the distill stage holds its teacher),
    so checkpoints neither carry it nor can overwrite a real backbone with a random one.

    Args:
        backbone: AlexNet weights file or torch hub dir (None: torch hub's cache).
        random_backbone: TESTS ONLY: random AlexNet, no weights file needed.
        seed: seed of the random backbone.
    """

    def __init__(self, backbone: str | Path | None = None, *, random_backbone: bool = False, seed: int = 0) -> None:
        super().__init__()
        import lpips

        path = None if random_backbone else alexnet_weights_path(backbone)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            # lpips calls torchvision's alexnet(pretrained=False), which torchvision flags as deprecated.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            # pnet_rand: no torchvision download; pretrained: the shipped linear heads are loaded.
            self.lpips = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        if path is None:
            log.warning("LPIPS with RANDOM backbone (tests only): its values are not LPIPS. "
                        "Set stage.lpips.random_backbone=false and give the AlexNet weights for real training")
        else:
            _load_alexnet_features(self.lpips.net, path)
            log.info("LPIPS (AlexNet) backbone loaded from %s", path)
        self.random_backbone = bool(random_backbone)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # frozen forever (dropout in the heads stays off)

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Per-image LPIPS distance (B,) between images in [-1, 1]; differentiable w.r.t. both."""
        return self.lpips(x_hat.float(), x.float()).flatten()

