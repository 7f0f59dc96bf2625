"""The VAE, codec and generator of a model spec dict (:mod:`onedc.model_spec` says what the dict means).

``onedc.build`` (training configs) and ``onedc.inference`` (checkpoints) both build here, so a
checkpoint is rebuilt with the architecture it trained with.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from onedc.model_spec import codec_kwargs, generator_kwargs, vae_kwargs
from onedc.modules.codec import HyperpriorCodec
from onedc.modules.generator import build_generator as _build_generator
from onedc.modules.vae import build_vae as _build_vae


def build_vae(model_config: Mapping[str, Any], device: str | torch.device | None = None,
              quick_train: bool = False) -> nn.Module:
    """The frozen VAE of ``model_config["vae"]`` (see :func:`vae_kwargs`)."""
    return _build_vae(**vae_kwargs(model_config, quick_train=quick_train), device=device)


def build_codec(model_config: Mapping[str, Any], vae_channels: int = 4) -> nn.Module:
    """The ``HyperpriorCodec`` of ``model_config["codec"]`` (random init; weights come from checkpoints).

    There is no ``meta`` option: CompressAI's GDN initialises from real tensors, and the codec is
    small enough (tens of M parameters at full size) to build on the CPU for counting.
    """
    return HyperpriorCodec(**codec_kwargs(model_config, vae_channels))


def build_generator(model_config: Mapping[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """The ``OneStepGenerator`` of ``model_config["generator"]`` (see :func:`generator_kwargs`)."""
    return _build_generator(**generator_kwargs(model_config), device=device)
