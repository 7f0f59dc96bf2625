import math

import pytest
import torch

from onedc.modules.light.codec import HyperpriorCodec
from onedc.modules.streams import pad_to_multiple
from onedc.modules.vae import build_vae

TINY_CODEC = dict(channels=16, y_channels=8, sem_channels=16, fsq_levels=[4] * 7, token_dim=16, gs_channels=16)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return build_vae(config=TINY_VAE, seed=0), HyperpriorCodec(vae_channels=4, **TINY_CODEC)


def test_shapes_on_the_design_grid(models):
    vae, codec = models
    x = torch.rand(2, 3, 128, 192) * 2 - 1
    out = codec(x, vae.encode(x))
    assert out.y_hat.shape == (2, 8, 8, 12)  # 1/16
    assert out.z_hat.shape == (2, 7, 2, 3)  # 1/64
    assert out.tokens.shape == (2, 6, 16)  # one token per 64x64 block
    assert out.features.shape == (2, 16, 16, 24) and out.latent_hat.shape == (2, 4, 16, 24)  # 1/8


def test_rate_from_likelihoods_matches_hand_computation(models):
    vae, codec = models
    codec.eval()
    x = torch.rand(1, 3, 64, 128) * 2 - 1
    out = codec(x, vae.encode(x))
    y_bits = sum(-math.log2(p) for p in out.likelihoods["y"].flatten().tolist())
    z_bits = 14 * 1 * 2  # 2 z positions x 14 bits
    flush = 64  # rANS's final state: part of every y stream
    assert codec.rate_bits(out).item() == pytest.approx(y_bits + flush + z_bits, rel=1e-5)
    assert codec.bpp(out, 64 * 128).item() == pytest.approx((y_bits + flush + z_bits) / (64 * 128), rel=1e-5)


def test_compress_decompress_is_bit_exact(models):
    vae, codec = models
    codec.eval()
    codec.update(force=True)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    v = vae.encode(x)
    out = codec(x, v)
    coded = codec.compress(x, v)
    decoded = codec.decompress(coded["strings"], coded["shape"])
    assert torch.equal(decoded.y_hat, out.y_hat)
    assert torch.equal(decoded.z_hat, out.z_hat)
    assert torch.equal(decoded.features, out.features)
    assert torch.equal(decoded.tokens, out.tokens)
    assert all(len(z) == math.ceil(14 / 8) for z in coded["strings"][1])  # 1 z position: 14 bits -> 2 bytes


def test_compress_requires_update(models):
    vae, _ = models
    codec = HyperpriorCodec(vae_channels=4, **TINY_CODEC).eval()
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="update"):
        codec.compress(x, vae.encode(x))


def test_cdf_tables_survive_state_dict_round_trip(models):
    _, codec = models
    codec.update(force=True)
    clone = HyperpriorCodec.from_state_dict(codec.state_dict(), vae_channels=4, **TINY_CODEC)
    assert torch.equal(clone.gaussian_conditional._quantized_cdf, codec.gaussian_conditional._quantized_cdf)
    assert clone.aux_loss().item() == 0.0


def test_unpadded_input_is_refused_and_padding_restores_size():
    codec = HyperpriorCodec(vae_channels=4, **TINY_CODEC)
    with pytest.raises(ValueError, match="multiple of 64"):
        codec.analysis(torch.zeros(1, 3, 70, 64), torch.zeros(1, 4, 8, 8))
    x = torch.rand(1, 3, 70, 100)
    padded, size = pad_to_multiple(x, 64)
    assert padded.shape[-2:] == (128, 128) and size == (70, 100)
    assert torch.equal(padded[..., :70, :100], x)


def test_z_is_scale_free_and_contiguous(models):
    """A channel LayerNorm sits before FSQ: growing analysis features cannot saturate z, and ẑ has
    the plain layout the decoder rebuilds from indices (same conv kernels, same μ and σ bits)."""
    _, codec = models
    codec.eval()
    sem = torch.randn(2, 16, 3, 4)
    z_hat = codec.hyper_analysis(sem)
    assert z_hat.is_contiguous()
    assert torch.equal(codec.hyper_analysis(sem * 1000.0), z_hat)
    indices = codec.fsq.codes_to_indices(z_hat)
    assert torch.equal(codec.hyper_synthesis(codec.fsq.indices_to_codes(indices))[1], codec.hyper_synthesis(z_hat)[1])


def test_fresh_codec_already_codes_y(models):
    """y starts spread over several quantisation bins, so a fresh codec's rate is more than
    z's fixed bits and the rate-distortion loss can lower it (rather than only raise it)."""
    vae, codec = models
    codec.eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        out = codec(x, vae.encode(x))
        _, means, _ = codec.hyper_synthesis(out.z_hat)
    symbols = (out.y_hat - means).round()
    assert (symbols != 0).float().mean() > 0.5
    y_bits = codec.rate_bits(out).item() - 64 - out.z_bits.item()
    assert y_bits > 10 * out.z_bits.item()
