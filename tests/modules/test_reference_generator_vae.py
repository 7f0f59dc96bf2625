"""Reference VAE (docs/reference-model.md §6): SD-2.1 layout, 16×16 windowed mid attention (GroupNorm per window), mean/sample."""
from __future__ import annotations

import pytest
import torch

from onedc.modules.reference.vae import (
    WindowedAttnProcessor,
    apply_in_windows,
    build_reference_vae,
    mid_block_attentions,
)
from reference_testdata import SMALL_VAE, read_key_list

@pytest.fixture(scope="module")
def pair():
    windowed = build_reference_vae(config=SMALL_VAE, seed=1)
    global_ = build_reference_vae(config=SMALL_VAE, seed=1, window=None)
    return windowed, global_


def _image(side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_full_size_vae_has_the_sd21_keys_and_count():
    vae = build_reference_vae(device="meta")
    expected = read_key_list("vae.txt")
    state = vae.autoencoder.state_dict()
    assert set(state) == set(expected) and len(expected) == 248
    assert all(tuple(state[k].shape) == shape for k, (shape, _) in expected.items())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.scaling_factor == 0.18215
    assert all(isinstance(a.processor, WindowedAttnProcessor) for a in mid_block_attentions(vae.autoencoder))


@pytest.mark.parametrize("side", [8, 16])
def test_windowed_equals_global_attention_on_maps_up_to_16(pair, side):
    windowed, global_ = pair
    x = _image(2 * side)
    v = windowed.encode(x)
    assert torch.allclose(v, global_.encode(x), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(windowed.decode(v), global_.decode(v), atol=1e-5)


@pytest.mark.parametrize("side", [32, 40])
def test_windowed_differs_from_global_attention_on_larger_maps(pair, side):
    windowed, global_ = pair
    x = _image(2 * side)
    v = windowed.encode(x)
    assert (v - global_.encode(x)).abs().max() > 1e-3  # measured 4.8e-3 (32) and 6.7e-3 (40)
    with torch.no_grad():
        assert (windowed.decode(v) - global_.decode(v)).abs().max() > 1e-2  # measured 0.14, 0.20


def test_each_window_is_the_global_attention_of_that_crop_groupnorm_included(pair):
    _, global_ = pair
    attn = global_.autoencoder.encoder.mid_block.attentions[0]
    x = torch.randn(2, 64, 40, 37, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.empty_like(x)
        for top in range(0, 40, 16):  # windows of 16, 16, 8 rows and 16, 16, 5 columns
            for left in range(0, 37, 16):
                crop = x[:, :, top:top + 16, left:left + 16].contiguous()
                expected[:, :, top:top + 16, left:left + 16] = attn(crop)
        windowed = WindowedAttnProcessor(attn.processor)(attn, x)
        assert torch.allclose(windowed, expected, atol=1e-5)
        # Normalising over the whole map instead of per window gives another result.
        assert (windowed - attn(x)).abs().max() > 1e-2  # measured 0.17


def test_apply_in_windows_sees_each_tile_once_in_place():
    x = torch.arange(2 * 3 * 21 * 34, dtype=torch.float32).reshape(2, 3, 21, 34)
    seen = []

    def record(tiles: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(tiles.shape))
        return tiles * 2

    assert torch.equal(apply_in_windows(x, record, 16), x * 2)
    assert sorted(seen) == sorted([(4, 3, 16, 16), (2, 3, 16, 2), (4, 3, 5, 16), (2, 3, 5, 2)])


def test_encode_gives_the_posterior_mean_by_default_and_samples_on_request(pair):
    windowed, _ = pair
    x = _image(32)
    with torch.no_grad():
        posterior = windowed.autoencoder.encode(x).latent_dist
    mean = windowed.encode(x)
    assert torch.equal(mean, windowed.encode(x)) and torch.equal(mean, posterior.mean * 0.18215)
    sample = windowed.encode(x, sample=True, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(9))
    std = torch.exp(0.5 * posterior.logvar.clamp(-30.0, 20.0))
    assert torch.allclose(sample, (posterior.mean + std * noise) * 0.18215, atol=1e-6)
    assert (sample - mean).abs().max() > 1e-3
    sampling = build_reference_vae(config=SMALL_VAE, seed=1, posterior="sample")
    assert not torch.equal(sampling.encode(x), sampling.encode(x))
    with pytest.raises(ValueError, match="posterior"):
        build_reference_vae(config=SMALL_VAE, posterior="mode")


def test_encode_and_decode_stay_float32_inside_a_bf16_autocast(pair):
    windowed, _ = pair
    x = _image(32)
    plain = windowed.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = windowed.encode(x)
        with torch.no_grad():
            image = windowed.decode(inside)
    assert torch.equal(inside, plain) and image.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(image, windowed.decode(plain))
