"""Frozen VAE wrapper around diffusers' ``AutoencoderKL``.

The VAE defines the latent space the whole codec lives in (SD: 4 channels at 1/8). It is never
trained: parameters are frozen, the module stays in eval mode, and ``encode`` / ``decode``
handle the latent scaling factor so that the rest of onedc sees unit-variance latents.

Weights come from a diffusers directory, a state-dict file of the configured architecture
(the embedded default's ``asset:tiny_vae``, made offline by ``python -m onedc.assets.make``, is
one), or a seed (random). ``identity`` names the weights a VAE was built with (content hash, or
architecture + seed for random weights) and is recorded in stage checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from onedc.assets import resolve_pretrained
from onedc.errors import WeightsError
from onedc.modules.state_dict_files import STATE_DICT_SUFFIXES, load_state_dict_file
from onedc.modules.weights import diffusers_model_dir


def _autocast_bf16(device: torch.device) -> contextlib.AbstractContextManager:
    # The frozen VAE runs in bf16 where the hardware has fast bf16; fp32 on CPUs (exactness).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FrozenVAE(nn.Module):
    """A frozen ``AutoencoderKL``: ``encode(x in [-1,1]) -> v`` and ``decode(v) -> x``.

    ``v`` is the *scaled* latent (``mean * scaling_factor``): the posterior mean, so encoding
    is deterministic, which the codec's exact decode round-trip relies on.
    """

    def __init__(self, autoencoder: nn.Module, scaling_factor: float | None = None, identity: str = "") -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.identity = identity
        config_factor = getattr(getattr(autoencoder, "config", None), "scaling_factor", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config_factor or 1.0)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent (4 for SD)."""
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor of the encoder (8 for SD)."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> "FrozenVAE":
        # Frozen forever: a parent's .train() must not switch the VAE's norm layers.
        return super().train(False)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> scaled latent mean (B,C,H/8,W/8), fp32."""
        with _autocast_bf16(x.device):
            posterior = self.autoencoder.encode(x).latent_dist
        return posterior.mean.float() * self.scaling_factor

    @property
    def decode_dtype(self) -> torch.dtype:
        """The dtype the decoder's weights are stored in (bf16 after a fast-decode cast, else float32)."""
        return self.autoencoder.post_quant_conv.weight.dtype if getattr(
            self.autoencoder.config, "use_post_quant_conv", True) else next(self.autoencoder.decoder.parameters()).dtype

    def decode(self, v: Tensor) -> Tensor:
        """Scaled latent -> image in [-1,1] (unclamped), float32. Differentiable w.r.t. ``v``.

        The latent is scaled in its own dtype and handed to the decoder in the decoder's weight
        dtype, so a decoder cast to bf16 for speed (:mod:`onedc.modules.decode_speed`) runs in bf16.
        """
        with _autocast_bf16(v.device):
            x = self.autoencoder.decode((v / self.scaling_factor).to(self.decode_dtype)).sample
        return x.float()


def _weights_identity(path: Path) -> str:
    """``AutoencoderKL:sha256=...`` over a state-dict file, or a diffusers dir's config and weight
    files (content, not location)."""
    from onedc.modules.teachers import _sha256_files

    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    return f"AutoencoderKL:sha256={_sha256_files(files)}"


_FILE_FORMAT = "a .safetensors/.bin/.pt state-dict file of the AutoencoderKL described by model.vae.config"


def _load_file(path: Path, config: dict[str, Any] | None, device: str | torch.device | None) -> nn.Module:
    """The ``AutoencoderKL`` of ``config`` with the tensors of the state-dict file ``path`` (strict)."""
    from diffusers import AutoencoderKL

    if config is None:
        raise WeightsError(f"the VAE weights {path} are a state-dict file: set model.vae.config to its "
                           "architecture (diffusers AutoencoderKL kwargs)")
    with torch.device("meta"):
        autoencoder = AutoencoderKL(**config)
    if str(device) == "meta":
        return autoencoder
    return load_state_dict_file(autoencoder, path, what="the AutoencoderKL of model.vae.config",
                                expected=_FILE_FORMAT)


def _load_dir(path: Path, what: str) -> nn.Module:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"cannot load {what} from {path}: {err}") from err


def build_vae(
    *,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    scaling_factor: float | None = None,
    device: str | torch.device | None = None,
) -> FrozenVAE:
    """Build the frozen VAE from local weights (``pretrained``) or at random from ``config``.

    ``pretrained`` is a directory written by ``AutoencoderKL.save_pretrained`` (or a full SD
    model dir with a ``vae/`` subfolder), a state-dict file of the ``config`` architecture, or
    ``asset:NAME``, a file shipped in :mod:`onedc.assets` (loaded like any other file). With
    ``pretrained=None`` the weights are drawn from ``seed`` without touching the global RNG.
    Nothing is ever trained here. ``device="meta"`` builds shapes only (parameter counting).
    """
    from diffusers import AutoencoderKL

    pretrained = resolve_pretrained(pretrained)
    if pretrained is not None and Path(pretrained).expanduser().suffix in STATE_DICT_SUFFIXES:
        path = Path(pretrained).expanduser()
        autoencoder = _load_file(path, config, device)
        identity = _weights_identity(path) if path.is_file() else ""  # missing: _load_file raised (or meta)
    elif pretrained is not None:
        path = diffusers_model_dir(pretrained, "vae", "a diffusers AutoencoderKL directory", "model.vae.pretrained")
        autoencoder = _load_dir(path, "the VAE")
        identity = _weights_identity(path)
    else:
        if config is None:
            raise WeightsError("build_vae needs `pretrained` (a local dir or file) or an architecture `config`")
        if str(device) == "meta":
            with torch.device("meta"):
                autoencoder = AutoencoderKL(**config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                autoencoder = AutoencoderKL(**config)
        blob = json.dumps(config, sort_keys=True, default=str).encode()
        identity = f"AutoencoderKL:random:cfg={hashlib.sha256(blob).hexdigest()[:12]}:seed={seed}"
    vae = FrozenVAE(autoencoder, scaling_factor, identity=identity)
    if device is not None and str(device) != "meta":
        vae.to(device)
    return vae
