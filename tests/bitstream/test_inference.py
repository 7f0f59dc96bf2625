"""OneDCCodec: exact latent round trips through file bytes, model identity, loading, rate."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from onedc.coding.bitstream import HEADER_SIZE, decode_container
from onedc.errors import CheckpointError, ModelMismatchError
from onedc.coding.bundle import OneDCCodec
from onedc.coding.identity import model_identity
from onedc.coding.rate import rate_table
from onedc.modules.streams import pad_to_multiple


def forward_on_padded(codec: OneDCCodec, x: torch.Tensor):
    """The eval-mode codec forward pass on the padded image, computed independently of compress."""
    padded, _ = pad_to_multiple(x[None], 64)
    with torch.no_grad():
        return codec.codec(padded, codec.vae.encode(padded))


def _grayscale(tmp_path, photo):
    path = tmp_path / "gray.png"
    gray = ((photo[0, :90, :130] + 1) * 127.5).round().byte().numpy()
    Image.fromarray(gray).save(path)
    from onedc.datamodules import load_image

    x = load_image(path)
    assert x.shape == (3, 90, 130) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    return x


@pytest.mark.parametrize("case", ["photo crop", "333x517", "64x64", "grayscale"])
def test_decompress_recovers_the_forward_latents_exactly(onedc_codec, photo, tmp_path, case):
    from onedc.datamodules import load_image, sample_photo_paths

    if case == "photo crop":
        x = photo[:, 200:392, 160:416]
    elif case == "333x517":
        x = load_image(sample_photo_paths()["motorcycle_left"])[:, 100:433, 150:667]
    elif case == "64x64":
        x = photo[:, 300:364, 300:364]
    else:
        x = _grayscale(tmp_path, photo)
    data = onedc_codec.compress_image(x)
    decoded = onedc_codec.decompress_bytes(data)
    expected = forward_on_padded(onedc_codec, x)
    assert torch.equal(decoded.y_hat, expected.y_hat)
    assert torch.equal(decoded.z_hat, expected.z_hat)
    assert torch.equal(decoded.latent, expected.latent_hat)  # no generator yet: the light latent
    assert decoded.image.shape == x.shape
    assert (decoded.header.height, decoded.header.width) == tuple(x.shape[-2:])
    assert decoded.image.abs().max() <= 1.0


def test_image_is_the_vae_decode_of_the_latent_cropped(onedc_codec, photo):
    x = photo[:, :70, :100]
    decoded = onedc_codec.decompress_bytes(onedc_codec.compress_image(x))
    with torch.no_grad():
        full = onedc_codec.vae.decode(decoded.latent).clamp(-1, 1)
    assert full.shape[-2:] == (128, 128)
    assert torch.equal(decoded.image, full[0, :, :70, :100])


def test_compression_is_deterministic(onedc_codec, photo):
    x = photo[:, :64, :128]
    assert onedc_codec.compress_image(x) == onedc_codec.compress_image(x.clone())


def test_model_id_covers_decoder_side_weights_only(onedc_codec, tiny_ckpt, other_ckpt):
    state = onedc_codec.state_dict()
    assert onedc_codec.model_id == OneDCCodec.from_checkpoint(tiny_ckpt).model_id
    assert len(onedc_codec.model_id) == 16
    settings = {"fsq_levels": [4] * 7, "vae_scaling_factor": onedc_codec.vae.scaling_factor, "stride": 64,
                "generator": None}
    prefixes = onedc_codec.family.decoder_prefixes()
    assert model_identity(state, settings, prefixes) == onedc_codec.model_id
    encoder_only = dict(state, **{"codec.g_a_y.1.weight": state["codec.g_a_y.1.weight"] + 1,
                                  "vae.autoencoder.encoder.conv_in.bias": state["vae.autoencoder.encoder.conv_in.bias"] + 1})
    assert model_identity(encoder_only, settings, prefixes) == onedc_codec.model_id
    decoder_side = dict(state, **{"vae.autoencoder.decoder.conv_out.bias": state["vae.autoencoder.decoder.conv_out.bias"] + 1})
    assert model_identity(decoder_side, settings, prefixes) != onedc_codec.model_id
    assert model_identity(state, dict(settings, fsq_levels=[8] * 5), prefixes) != onedc_codec.model_id
    assert OneDCCodec.from_checkpoint(other_ckpt).model_id != onedc_codec.model_id


def test_file_from_another_model_is_refused(onedc_codec, other_ckpt, small_file):
    other = OneDCCodec.from_checkpoint(other_ckpt)
    with pytest.raises(ModelMismatchError, match=onedc_codec.model_id.hex()) as info:
        other.decompress_bytes(small_file)
    assert other.model_id.hex() in str(info.value)


def test_missing_tables_are_rebuilt_to_the_same_model(tiny_ckpt, tmp_path, onedc_codec, small_file):
    checkpoint = torch.load(tiny_ckpt, weights_only=False)
    for key in [k for k in checkpoint["state_dict"] if k.startswith("codec.gaussian_conditional._")]:
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "no_tables.ckpt")
    rebuilt = OneDCCodec.from_checkpoint(tmp_path / "no_tables.ckpt")
    assert rebuilt.model_id == onedc_codec.model_id  # update() is deterministic
    assert torch.equal(rebuilt.decompress_bytes(small_file).y_hat, onedc_codec.decompress_bytes(small_file).y_hat)


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.pop("onedc"), "not an onedc stage checkpoint"),
    (lambda c: c["state_dict"].pop("codec.g_s.0.weight"), "missing g_s.0.weight"),
    (lambda c: c["state_dict"].update({"codec.g_s.0.weight": torch.zeros(1)}), "do not fit"),
    (lambda c: c["state_dict"].update({"vae.autoencoder.extra": torch.zeros(1)}), "unexpected autoencoder.extra"),
    (lambda c: c["onedc"].update(format=99), "upgrade onedc"),
])
def test_bad_checkpoints_raise_checkpoint_error(tiny_ckpt, tmp_path, edit, words):
    checkpoint = torch.load(tiny_ckpt, weights_only=False)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=words):
        OneDCCodec.from_checkpoint(tmp_path / "bad.ckpt")


def test_checkpoint_with_a_generator_decodes_through_it(tiny_ckpt, tmp_path, model_config, onedc_codec, photo):
    from onedc.training import build

    checkpoint = torch.load(tiny_ckpt, weights_only=False)
    if not hasattr(build, "generator_from_config"):
        checkpoint["state_dict"]["generator.unet.conv_in.weight"] = torch.zeros(1)
        torch.save(checkpoint, tmp_path / "gen.ckpt")
        with pytest.raises(CheckpointError, match="generator"):
            OneDCCodec.from_checkpoint(tmp_path / "gen.ckpt")
        return
    generator = build.generator_from_config(model_config)
    checkpoint["state_dict"].update({f"generator.{k}": v for k, v in generator.state_dict().items()})
    torch.save(checkpoint, tmp_path / "gen.ckpt")
    bundle = OneDCCodec.from_checkpoint(tmp_path / "gen.ckpt")
    assert type(bundle.generator) is type(generator)
    assert bundle.model_id != onedc_codec.model_id  # the generator is part of the decoder
    x = photo[:, :64, :64]
    decoded = bundle.decompress_bytes(bundle.compress_image(x))
    coded = forward_on_padded(bundle, x)
    with torch.no_grad():
        expected = bundle.generator(coded.features, coded.tokens)
    assert torch.equal(decoded.latent, expected)


class StubGenerator(nn.Module):
    """Stands in for OneStepGenerator: (features, tokens) -> VAE latent."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, 4, 1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(features) + tokens.mean()


def test_generator_slot_decodes_through_the_generator(onedc_codec, photo):
    torch.manual_seed(3)
    generator = StubGenerator(onedc_codec.codec.config["gs_channels"])
    bundle = OneDCCodec(onedc_codec.vae, onedc_codec.codec, generator, generator_settings={"timestep": 999})
    assert bundle.model_id != onedc_codec.model_id  # the generator is part of the decoder
    x = photo[:, :64, :64]
    decoded = bundle.decompress_bytes(bundle.compress_image(x))
    with torch.no_grad():
        coded = forward_on_padded(bundle, x)
        expected = generator(coded.features, coded.tokens)
    assert torch.equal(decoded.latent, expected)
    with pytest.raises(ModelMismatchError):
        onedc_codec.decompress_bytes(bundle.compress_image(x))


def test_rate_table_matches_the_files(onedc_codec, photo, tmp_path):
    paths = []
    for name, crop in (("a", photo[:, :70, :100]), ("b", photo[:, 200:392, 100:356])):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(((crop + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(paths[-1])
    rows = rate_table(onedc_codec, paths)
    assert [r["image"] for r in rows] == ["a", "b"]
    for row, (h, w, zh, zw) in zip(rows, [(70, 100, 2, 2), (192, 256, 3, 4)]):
        assert (row["height"], row["width"]) == (h, w)
        assert row["est_z_bits"] == 14 * zh * zw
        assert row["z_bytes"] == math.ceil(row["est_z_bits"] / 8)  # fixed-length z costs exactly its bits
        assert row["fix_bytes"] >= 1  # the fix list's count byte, at least
        assert row["file_bytes"] == HEADER_SIZE + row["z_bytes"] + row["fix_bytes"] + row["y_bytes"]
        assert row["bpp_file"] == pytest.approx(row["file_bytes"] * 8 / (h * w))
        # Untrained: y is nearly free and rANS adds a fixed 8-byte final state, so the file never
        # undercuts the estimate (trained models land within a few % either side, see rate_table).
        assert row["payload_bits"] >= 0.99 * row["est_bits"]
        assert row["rel_diff"] == pytest.approx((row["payload_bits"] - row["est_bits"]) / row["est_bits"])
        assert row["y_bytes"] >= 8 and row["y_bytes"] % 4 == 0  # rANS64: 32-bit words + 8-byte final state


def test_header_records_the_padding(onedc_codec, small_file):
    header = decode_container(small_file)
    assert (header.height, header.width, header.pad_bottom, header.pad_right) == (70, 100, 58, 28)
    assert (header.z_height, header.z_width, header.z_bits) == (2, 2, 14)
    assert header.model_id == onedc_codec.model_id
