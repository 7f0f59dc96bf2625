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


def is_reference(model_config: Mapping[str, Any]) -> bool:
    """Whether ``model_config`` is the published OneDC (``family: reference``, onedc.modules.reference)."""
    return model_config.get("family") == "reference"


def build_vae(model_config: Mapping[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """The frozen VAE of ``model_config["vae"]`` (see :func:`vae_kwargs`)."""
    if is_reference(model_config):
        from onedc.modules.reference.vae import build_reference_vae

        vae = dict(model_config["vae"])
        return build_reference_vae(pretrained=vae.get("pretrained"), config=vae.get("config"),
                                   seed=int(vae.get("seed", 0)), scaling_factor=vae.get("scaling_factor"),
                                   window=vae.get("attention_window", 16), posterior=vae.get("posterior", "mean"),
                                   device=device)
    return _build_vae(**vae_kwargs(model_config), device=device)


def build_codec(model_config: Mapping[str, Any], vae_channels: int = 4) -> nn.Module:
    """The ``HyperpriorCodec`` of ``model_config["codec"]`` (random init; weights come from checkpoints).

    There is no ``meta`` option: CompressAI's GDN initialises from real tensors, and the codec is
    small enough (tens of M parameters at full size) to build on the CPU for counting. For
    ``family: reference`` it is the reference ``IntraNoAR`` with the coding interface.
    """
    if is_reference(model_config):
        from onedc.modules.reference.bundle import CodingReferenceCodec

        return CodingReferenceCodec(**dict(model_config["codec"]))
    return HyperpriorCodec(**codec_kwargs(model_config, vae_channels))


def build_generator(model_config: Mapping[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """The ``OneStepGenerator`` of ``model_config["generator"]`` (see :func:`generator_kwargs`)."""
    if is_reference(model_config):
        from onedc.modules.reference.generator import build_reference_generator

        gen = dict(model_config["generator"])
        lora = gen.get("lora") or {}
        return build_reference_generator(
            unet_config=gen.get("unet"), gs_channels=int(gen.get("gs_channels", 320)), lora=bool(lora),
            **({"lora_rank": int(lora["rank"]), "lora_alpha": float(lora["alpha"])} if lora else {}),
            seed=int(gen.get("seed", 0)), gradient_checkpointing=bool(gen.get("gradient_checkpointing", False)),
            pretrained=gen.get("pretrained"), device=device)
    return _build_generator(**generator_kwargs(model_config), device=device)
