"""The reference family: the published OneDC (``model=onedc_sd15``), weight-compatible with the release.

::

    model config ─vae──────> modules.reference.vae.build_reference_vae      (SD-2.1 VAE, windowed mid attention)
                 ─codec────> modules.reference.bundle.CodingReferenceCodec  (IntraNoAR + the coding interface)
                 ─generator> modules.reference.generator.build_reference_generator (SD-1.5 UNet + LoRA)

Stage 1 is the authors' fused stage I: codec and generator train together (the codec has no
light latent head, so v̂ always comes from the generator). The stages run the codec without its
entropy coder (``uncoded_forward``: same features and rate estimate, 5.2x cheaper at 512²); the
rANS tables are fixed (docs/reference-model.md §7), never saved. A stage checkpoint's
``init_from`` also fills the VAE: the preset names no VAE dir, the checkpoint carries the one its
codec works with. The released files are converted in :mod:`.released`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from onedc.families.contract import ModelFamily, register_family


class ReferenceFamily(ModelFamily):
    """The published OneDC family (see the module docstring)."""

    name = "reference"
    distills_with_generator = True
    saves_coding_tables = False
    # h_s, prior fusion, the context model, the semantic adaptor S and g_s
    codec_decoder_prefixes = ("codec.hyper_dec.", "codec.y_prior_fusion.", "codec.y_spatial_prior",
                              "codec.semantic_adaptor.", "codec.dec.")

    def build_vae(self, model_config: Mapping[str, Any], device: Any = None) -> nn.Module:
        from onedc.modules.reference.vae import build_reference_vae

        vae = dict(model_config["vae"])
        return build_reference_vae(pretrained=vae.get("pretrained"), config=vae.get("config"),
                                   seed=int(vae.get("seed", 0)), scaling_factor=vae.get("scaling_factor"),
                                   window=vae.get("attention_window", 16), posterior=vae.get("posterior", "mean"),
                                   device=device)

    def build_codec(self, model_config: Mapping[str, Any], vae_channels: int) -> nn.Module:
        from onedc.modules.reference.bundle import CodingReferenceCodec

        return CodingReferenceCodec(**dict(model_config["codec"]))

    def build_generator(self, model_config: Mapping[str, Any], device: Any = None) -> nn.Module:
        from onedc.modules.reference.generator import build_reference_generator

        gen = dict(model_config["generator"])
        lora = gen.get("lora") or {}
        return build_reference_generator(
            unet_config=gen.get("unet"), gs_channels=int(gen.get("gs_channels", 320)), lora=bool(lora),
            **({"lora_rank": int(lora["rank"]), "lora_alpha": float(lora["alpha"])} if lora else {}),
            seed=int(gen.get("seed", 0)), gradient_checkpointing=bool(gen.get("gradient_checkpointing", False)),
            pretrained=gen.get("pretrained"), device=device)

    def init_prefixes(self, model_config: Mapping[str, Any]) -> tuple[str, ...]:
        return ("codec.", "generator.", "vae.")

    def start_generator(self, generator: nn.Module, codec: nn.Module, mode: str) -> None:
        raise ValueError(f"model.generator.init={mode} needs the light codec's latent head, which the published "
                         "codec has not: set model.generator.init=null")

    def codec_pass(self, codec: nn.Module, x: Tensor, v: Tensor):
        """The codec without its entropy coder: the stages need features and the rate estimate, not
        the file's last-bit ŷ (the RD evaluation codes real files)."""
        return codec.uncoded_forward(x, v)

    def semantic_width(self, codec: nn.Module) -> int:
        return int(codec.config["semantic_ch"])

    def y_symbols(self, codec: nn.Module, padded_size: tuple[int, int]) -> int:
        from onedc.modules.reference.bundle import Y_STRIDE

        return int(codec.config["bottleneck_ch"]) * (padded_size[0] // Y_STRIDE) * (padded_size[1] // Y_STRIDE)


    # The released z-only script pads by reflection, not replication (docs/reference-model.md §4.9).
    z_only_padding = "reflect"

    def z_only_indices(self, codec: nn.Module, x: Tensor, v: Tensor) -> Tensor:
        """FSQ indices of ẑ = FSQ(h_a(g_a(x, v))) (as the codec's ``compress`` packs them)."""
        y, sem = codec.analyse(x, v)
        return codec.fsq.codes_to_indices(codec.quantise_z(codec.hyper_analyse(y, sem)))

    def z_only_latents(self, codec: nn.Module, z_hat: Tensor):
        """docs/reference-model.md §4.9: the four context steps with q = 0, so ŷ_k = μ_k·M_k and step k's
        means come from Σ_{j<k} ŷ_j; S from ẑ, F = g_s(ŷ, S). ``latent_hat`` is None (the generator decodes)."""
        from onedc.modules.reference.context import zero_residuals
        from onedc.modules.reference.synthesis import semantic_tokens
        from onedc.modules.streams import DecodedLatents

        context, semantic, features = codec.decode_from_z(z_hat, zero_residuals)
        return DecodedLatents(context.y_hat, z_hat, semantic, semantic_tokens(semantic), features, None)


REFERENCE = register_family(ReferenceFamily())
