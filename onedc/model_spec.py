"""The stored model config (a plain dict) <-> the VAE, codec and generator it builds.

A checkpoint carries its ``model`` config as a plain dict (``model.vae``, ``model.codec``,
``model.generator``); training composes the same dict from YAML. This file is the one place that
reads it: the ``*_kwargs`` functions turn it into the keyword arguments of the module builders
(pure dict work, no module imported), and :mod:`onedc.modules.spec_builders` calls those
builders. ``onedc.build`` (config objects) and ``onedc.inference`` (checkpoints) both build
through there, so a model loads with the architecture it trained with. Layer 1 of
docs/architecture.md.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from onedc.errors import ConfigError

# Parts of the inference bundle; any other prefix in a checkpoint (distill., discriminator., ...)
# is training-only and ignored.
BUNDLE_PARTS: tuple[str, ...] = ("vae", "codec", "generator")
# Non-tensor generator settings that change the decoded image (model.generator config keys).
GENERATOR_DECODE_SETTINGS: tuple[str, ...] = ("timestep", "prediction_type", "scheduler")


# --------------------------------------------------------------------------- dict -> kwargs
def vae_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`onedc.modules.vae.build_vae` for ``model_config["vae"]``."""
    vae = dict(model_config["vae"])
    kwargs: dict[str, Any] = dict(pretrained=vae.get("pretrained"), config=vae.get("config"),
                                  seed=int(vae.get("seed", 0)), scaling_factor=vae.get("scaling_factor"))
    return kwargs


def codec_kwargs(model_config: Mapping[str, Any], vae_channels: int = 4) -> dict[str, Any]:
    """Keyword arguments of :class:`onedc.modules.codec.HyperpriorCodec` for ``model_config["codec"]``."""
    return dict(vae_channels=vae_channels, **dict(model_config["codec"]))


def generator_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`onedc.modules.generator.build_generator` for ``model_config["generator"]``.

    Its conv_in input and cross-attention width come from ``model.codec`` (gs_channels,
    token_dim); a UNet config whose cross-attention width disagrees is a ConfigError.
    """
    gen, codec = dict(model_config["generator"]), dict(model_config["codec"])
    unet = dict(gen.get("unet") or {})
    if gen.get("pretrained") is None and unet.get("cross_attention_dim") not in (None, codec["token_dim"]):
        raise ConfigError(f"model.codec.token_dim={codec['token_dim']} but model.generator.unet.cross_attention_dim="
                          f"{unet['cross_attention_dim']}: the semantic tokens are the UNet's cross-attention "
                          "context, set both to the same width")
    return dict(gs_channels=int(codec["gs_channels"]), token_dim=int(codec["token_dim"]),
                pretrained=gen.get("pretrained"), unet_config=unet or None, seed=int(gen.get("seed", 0)),
                timestep=int(gen.get("timestep", 999)), prediction_type=str(gen.get("prediction_type", "epsilon")),
                scheduler_config=gen.get("scheduler") or {}, lora=gen.get("lora"),
                gradient_checkpointing=bool(gen.get("gradient_checkpointing", False)),
                xt_kernel_size=int(gen.get("xt_kernel_size", 1)))


def generator_settings(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's non-tensor decode settings (:data:`GENERATOR_DECODE_SETTINGS`) from a model config."""
    gen_cfg = model_config.get("generator") or {}
    return {k: gen_cfg.get(k) for k in GENERATOR_DECODE_SETTINGS if k in gen_cfg}


def weights_only_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's model config that builds without the machine it trained on.

    The checkpoint holds all the weights, so a ``pretrained`` dir only supplies the architecture:
    it is used where present (its layout is certain to match), and dropped where it is not on
    this machine but an architecture config exists (``vae.config``, ``generator.unet``).
    """
    model_config = copy.deepcopy(dict(model_config))
    for part, arch_key in (("vae", "config"), ("generator", "unet")):
        node = model_config.get(part)
        if isinstance(node, dict) and node.get(arch_key) is not None and node.get("pretrained") is not None:
            if not Path(str(node["pretrained"])).expanduser().is_dir():
                node["pretrained"] = None
    return model_config


def split_parts(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group a prefixed state dict by bundle part (:data:`BUNDLE_PARTS`), dropping training-only parts."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in BUNDLE_PARTS}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
    return parts
