"""Every registered model family honours the contract of onedc.families.contract.

:func:`check_family` runs one family the way CompressAI's tests run a codec: its full-size preset
built on the meta device, then at test width one training step through the stages' seams and one
real file round-trip through the coding bundle. It fails with an AssertionError naming what broke,
so a new family is checked by adding its test-width config to ``FAMILY_CONFIGS``.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from onedc.coding.bitstream import decode_container
from onedc.coding.bundle import OneDCCodec
from onedc.coding.identity import model_identity
from onedc.families import FAMILIES, LIGHT, REFERENCE, CodecPass, LightFamily, ModelFamily, family_of, register_family
from onedc.training.config import compose, to_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bitstream"))
from test_reference_bundle import small_model_config  # noqa: E402  (the published model at test width)

FULL_SIZE = {"light": "sd15", "reference": "onedc_sd15"}
SIZE = 128  # a 2x2 z grid, 8x8 y grid


def small_config(name: str) -> dict[str, Any]:
    """The family's model config at test width (the same classes and key layout as the presets)."""
    if name == "light":
        return to_dict(compose(["model=tiny_random"]).model)
    return small_model_config()


def check_family(family: ModelFamily, model_config: Mapping[str, Any], full_size: Mapping[str, Any]) -> None:
    """Run ``family`` through the contract; an AssertionError names the first broken promise."""
    assert isinstance(family, ModelFamily), f"{family!r} is not a ModelFamily"
    assert FAMILIES.get(family.name) is family, f"{family!r} is not registered under '{family.name}'"
    assert family_of(model_config) is family, f"model.family of the config does not select {family!r}"

    # --- the full-size preset builds on the meta device (shapes only)
    for part, build in (("vae", family.build_vae), ("generator", family.build_generator)):
        module = build(full_size, device="meta")
        assert all(p.is_meta for p in module.parameters()), f"build_{part}(device='meta') allocated real weights"
        assert sum(p.numel() for p in module.parameters()) > 1_000_000, f"the full-size {part} is not full size"

    # --- one training step through the stages' seams, at test width
    torch.manual_seed(0)
    vae = family.build_vae(model_config)
    codec = family.build_codec(model_config, vae.latent_channels)
    generator = family.build_generator(model_config)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        v = vae.encode(x)
    codec.train()
    generator.train()
    out = family.codec_pass(codec, x, v)
    assert isinstance(out, CodecPass), f"codec_pass returned {type(out).__name__}, not a CodecPass"
    width = family.semantic_width(codec)
    expected = {"y_hat": (2, None, SIZE // 16, SIZE // 16), "z_hat": (2, None, SIZE // 64, SIZE // 64),
                "semantic": (2, width, SIZE // 64, SIZE // 64), "features": (2, None, SIZE // 8, SIZE // 8),
                "tokens": (2, (SIZE // 64) ** 2, width)}
    for name, shape in expected.items():
        got = tuple(getattr(out, name).shape)
        assert len(got) == len(shape) and all(w is None or g == w for g, w in zip(got, shape)), \
            f"codec_pass gives {name} of shape {got}, the contract wants {shape} (None: any)"
    bits = family.rate_bits(codec, out)
    assert bits.shape == (2,) and torch.isfinite(bits).all() and (bits > 0).all(), f"rate_bits gave {bits}"
    assert bits.requires_grad, "rate_bits in training must be differentiable"
    latent = generator(out.features, out.tokens)
    assert latent.shape == v.shape, f"the generator gives {tuple(latent.shape)} for a VAE latent of {tuple(v.shape)}"
    idle = {id(p) for part in family.idle_parts(codec, "latent", trains_generator=True) for p in part.parameters()}
    params = [p for p in list(codec.parameters()) + list(generator.parameters()) if p.requires_grad and id(p) not in idle]
    before = [p.detach().clone() for p in params]
    loss = 1e-3 * bits.mean() + F.mse_loss(latent, v)
    torch.optim.SGD(params, lr=1e-2).zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 1e-2 * p.grad
    moved = sum(not torch.equal(b, p) for b, p in zip(before, params))
    assert moved > len(params) // 4, f"one step moved only {moved} of {len(params)} trainable tensors"

    # --- one file round trip through the coding bundle
    bundle = OneDCCodec(vae, codec, generator, family=family)  # eval mode, tables built
    assert bundle.family is family
    image = x[0, :, :SIZE - 6, :SIZE - 10]  # a size that needs padding
    data, y_hat = bundle.compress_images([image], return_y_hat=True)
    header = decode_container(data[0])
    assert header.padded_size == (SIZE, SIZE) and (header.height, header.width) == (SIZE - 6, SIZE - 10)
    assert family.y_symbols(codec, header.padded_size) == y_hat[0].numel(), "y_symbols disagrees with ŷ"
    decoded = bundle.decompress_bytes(data[0])
    assert torch.equal(decoded.y_hat, y_hat), "the decoder did not rebuild the encoder's ŷ bit for bit"
    assert decoded.image.shape == image.shape and torch.isfinite(decoded.image).all()
    state = bundle.state_dict()
    for prefix in family.decoder_prefixes():
        assert any(k.startswith(prefix) for k in state), f"decoder prefix {prefix} matches no weight of the bundle"
    assert set(family.init_prefixes(model_config)) <= {"vae.", "codec.", "generator."}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_every_registered_family_honours_the_contract(name):
    family = FAMILIES[name]
    full_size = to_dict(compose([f"model={FULL_SIZE[name]}"]).model)
    check_family(family, small_config(name), full_size)


def test_both_families_are_registered():
    assert set(FAMILIES) == set(FULL_SIZE) and FAMILIES["light"] is LIGHT and FAMILIES["reference"] is REFERENCE


def test_a_family_without_a_method_cannot_exist():
    class NoCodecPass(ModelFamily):
        name = "broken"

        def build_vae(self, model_config, device=None, quick_train=False): ...
        def build_codec(self, model_config, vae_channels): ...
        def build_generator(self, model_config, device=None): ...
        def start_generator(self, generator, codec, mode): ...
        def semantic_width(self, codec): ...
        def y_symbols(self, codec, padded_size): ...

    with pytest.raises(TypeError, match="codec_pass"):
        register_family(NoCodecPass())
    assert "broken" not in FAMILIES


def test_the_conformance_check_catches_a_wrong_shape():
    class HalfFeatures(LightFamily):
        name = "half_features"

        def codec_pass(self, codec, x, v):
            out = codec(x, v)
            return out._replace(features=F.avg_pool2d(out.features, 2))

    family = HalfFeatures()
    FAMILIES[family.name] = family
    try:
        config = dict(small_config("light"), family="half_features")
        full = dict(to_dict(compose(["model=sd15"]).model), family="half_features")
        with pytest.raises(AssertionError, match="features of shape"):
            check_family(family, config, full)
    finally:
        del FAMILIES[family.name]


# The decoder-side prefixes format-2 files were written with before the families split them: one
# list for both codecs. Each family's own list must hash the same keys, so no old file changes id.
OLD_DECODER_PREFIXES = (
    "vae.autoencoder.decoder.", "vae.autoencoder.post_quant_conv.", "codec.h_s.", "codec.entropy_parameters.",
    "codec.h_sem.", "codec.token_norm.", "codec.g_s.", "codec.to_latent.", "codec.gaussian_conditional.",
    "codec.hyper_dec.", "codec.y_prior_fusion.", "codec.y_spatial_prior", "codec.semantic_adaptor.", "codec.dec.",
    "generator.",
)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_the_model_identity_of_old_files_is_unchanged(name):
    family = FAMILIES[name]
    config = small_config(name)
    vae = family.build_vae(config)
    bundle = OneDCCodec(vae, family.build_codec(config, vae.latent_channels), family.build_generator(config),
                        family=family)
    state = bundle.state_dict()
    assert sorted(k for k in state if k.startswith(OLD_DECODER_PREFIXES)) == \
        sorted(k for k in state if k.startswith(family.decoder_prefixes()))
    assert model_identity(state, {"x": 1}, OLD_DECODER_PREFIXES) == model_identity(state, {"x": 1}, family.decoder_prefixes())
