"""The light family: CompressAI's hyperprior codec with a light latent head (``model=tiny``, ``sd15``).

::

    model config ─vae_kwargs──────> modules.vae.build_vae           (diffusers AutoencoderKL, frozen)
                 ─codec_kwargs────> modules.light.codec.HyperpriorCodec
                 ─generator_kwargs> modules.generator.build_generator (UNet2DConditionModel, one step)

Stage 1 trains the codec alone (its light latent head ``to_latent`` gives v̂); the generator
joins in stage 2 and may start at that light reconstruction (``model.generator.init: residual``).
The codec's rANS tables are model state, resized by ``update()`` and saved in checkpoints.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from onedc.errors import ConfigError
from onedc.families.contract import ModelFamily, load_part, register_family
from onedc.modules.coding_tables import CDF_BUFFERS, fit_cdf_buffers, tables_missing
from onedc.modules.generator import build_generator
from onedc.modules.light.codec import HyperpriorCodec
from onedc.modules.streams import DecodedLatents
from onedc.modules.vae import build_vae


# --------------------------------------------------------------------------- dict -> kwargs
def vae_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`onedc.modules.vae.build_vae` for ``model_config["vae"]``."""
    vae = dict(model_config["vae"])
    kwargs: dict[str, Any] = dict(pretrained=vae.get("pretrained"), config=vae.get("config"),
                                  seed=int(vae.get("seed", 0)), scaling_factor=vae.get("scaling_factor"))
    return kwargs


def codec_kwargs(model_config: Mapping[str, Any], vae_channels: int = 4) -> dict[str, Any]:
    """Keyword arguments of :class:`~onedc.modules.light.codec.HyperpriorCodec` for ``model_config["codec"]``."""
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


class LightFamily(ModelFamily):
    """The light hyperprior codec family (see the module docstring)."""

    name = "light"
    distills_with_generator = False
    saves_coding_tables = True
    codec_decoder_prefixes = ("codec.h_s.", "codec.entropy_parameters.", "codec.h_sem.", "codec.token_norm.",
                              "codec.g_s.", "codec.to_latent.", "codec.gaussian_conditional.")

    def build_vae(self, model_config: Mapping[str, Any], device: Any = None) -> nn.Module:
        return build_vae(**vae_kwargs(model_config), device=device)

    def build_codec(self, model_config: Mapping[str, Any], vae_channels: int) -> nn.Module:
        """The ``HyperpriorCodec`` (no meta option: CompressAI's GDN initialises from real tensors)."""
        return HyperpriorCodec(**codec_kwargs(model_config, vae_channels))

    def build_generator(self, model_config: Mapping[str, Any], device: Any = None) -> nn.Module:
        return build_generator(**generator_kwargs(model_config), device=device)

    def fit_init_state(self, codec: nn.Module, prefix: str, state: dict[str, Tensor]) -> None:
        """Resize the CDF table buffers to a checkpoint's before a load (``update()`` sizes them)."""
        if any(k.startswith(prefix + "gaussian_conditional.") for k in state):
            fit_cdf_buffers(codec.gaussian_conditional, prefix + "gaussian_conditional", state)

    def start_generator(self, generator: nn.Module, codec: nn.Module, mode: str) -> None:
        """``residual``: start at the codec's light latent reconstruction (its ``to_latent`` head)."""
        if mode != "residual":
            raise ValueError(f"model.generator.init must be null or 'residual', got {mode!r}")
        generator.start_from_latent_head(codec.to_latent)

    def codec_pass(self, codec: nn.Module, x: Tensor, v: Tensor):
        return codec(x, v)

    def semantic_width(self, codec: nn.Module) -> int:
        return int(codec.config["token_dim"])

    def idle_parts(self, codec: nn.Module, stage: str, trains_generator: bool) -> list[nn.Module]:
        """Stage 1 without a generator: the token norm (tokens feed only the generator). Later
        stages: the stage-1 latent head, unused once the generator decodes."""
        if stage == "distill":
            return [] if trains_generator else [codec.token_norm]
        return [codec.to_latent]

    def y_symbols(self, codec: nn.Module, padded_size: tuple[int, int]) -> int:
        y_stride = 2 * int(codec.config["patch_size"])  # y lives at 1/16: patch-embed /8, then /2
        return int(codec.config["y_channels"]) * (padded_size[0] // y_stride) * (padded_size[1] // y_stride)

    def load_codec(self, codec: nn.Module, weights: Mapping[str, Tensor], source: Path) -> None:
        """Strict load; absent (or never built) rANS tables are rebuilt with ``update()`` instead."""
        weights = dict(weights)
        tables = [f"gaussian_conditional.{b}" for b in CDF_BUFFERS]
        no_tables = any(k not in weights or weights[k].numel() == 0 for k in tables)
        if no_tables:
            for key in tables:
                weights.pop(key, None)
        load_part("codec", codec, weights, source, allowed_missing=tables if no_tables else (), plain=no_tables)
        if tables_missing(codec):
            codec.update(force=True)


    def z_only_indices(self, codec: nn.Module, x: Tensor, v: Tensor) -> Tensor:
        """h_a's ẑ of the padded images as FSQ indices (what ``HyperpriorCodec.compress`` packs into the z stream)."""
        _, sem = codec.analysis(x, v)
        return codec.fsq.codes_to_indices(codec.hyper_analysis(sem))

    def z_only_latents(self, codec: nn.Module, z_hat: Tensor) -> DecodedLatents:
        """ŷ = the hyperprior's means μ = entropy_parameters(h_s(ẑ)); g_s, h_sem and the latent head as usual."""
        hyper, means, _ = codec.hyper_synthesis(z_hat)
        semantic, tokens = codec.semantics(z_hat)
        features, latent_hat = codec.synthesis(means.to(hyper.dtype), hyper)
        return DecodedLatents(means, z_hat, semantic, tokens, features, latent_hat)


LIGHT = register_family(LightFamily())
