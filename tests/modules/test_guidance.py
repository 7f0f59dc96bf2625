"""The DMD2 guidance model (docs/reference-model.md §10.2) against independent formulae, on a small SD-layout UNet.

Every expected value below is recomputed here from the published equations with separate UNet
calls (no batching, no helper of the module under test), so a wrong CFG order, a float32 x0, a
missing normalisation or a detached realism path fails.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from onedc.dmd import DMDGuidance
from onedc.errors import WeightsError
from onedc.families.reference.released import (
    guidance_shapes,
    import_guidance,
    save_released_guidance,
    sd15_alphas_cumprod,
)
from onedc.modules.guidance import build_guidance, unet_mid_block_output
from reference_testdata import read_key_list

# SD-1.5 layout at small width: cross-attention down/up blocks, a cross-attention mid block; the
# mid block is at 1/2 of the latent, so 16x16 latents give the classifier an 8x8 map (-> 1 logit).
TINY_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 8,
}
B, L, D = 2, 7, 32


@pytest.fixture(scope="module")
def guidance() -> DMDGuidance:
    model = build_guidance(TINY_UNET, alphas_cumprod=sd15_alphas_cumprod(), seed=3)
    with torch.no_grad():  # the fake UNet differs from the real one, as after training
        gen = torch.Generator().manual_seed(5)
        for param in model.fake_unet.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def _inputs(size: int = 16, seed: int = 0, t_range=(20, 640)):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, 4, size, size, generator=gen)
    text = torch.randn(B, L, D, generator=gen)
    uncond = torch.randn(1, L, D, generator=gen).expand(B, L, D)
    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    return latents, text, uncond, t, noise


def _expected_grad(model, latents, text, uncond, t, noise, scale=1.75):
    """g of §10.2 from separate UNet calls, x0 in float64."""
    ac = model.alphas_cumprod
    a = ac[t].reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # float32
    with torch.no_grad():
        e_text = model.real_unet(noisy, t, encoder_hidden_states=text).sample
        e_unc = model.real_unet(noisy, t, encoder_hidden_states=uncond).sample
        e_real = e_unc + scale * (e_text - e_unc)
        e_fake = model.fake_unet(noisy, t, encoder_hidden_states=text).sample
    a64 = ac.double()[t].reshape(-1, 1, 1, 1)
    x0_real = (noisy.double() - (1 - a64).sqrt() * e_real.double()) / a64.sqrt()
    x0_fake = (noisy.double() - (1 - a64).sqrt() * e_fake.double()) / a64.sqrt()
    p_real, p_fake = latents.double() - x0_real, latents.double() - x0_fake
    return (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)


def _close(actual, expected, rel=1e-5):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.abs().max().item(), (err, expected.abs().max().item())


def test_dm_direction_is_the_normalised_cfg_score_difference(guidance):
    latents, text, uncond, t, noise = _inputs()
    loss, grad = guidance.distribution_matching_loss(latents, text, uncond, timesteps=t, noise=noise)
    expected = _expected_grad(guidance, latents, text, uncond, t, noise)
    assert grad.dtype == torch.float64 and grad.shape == latents.shape
    _close(grad, expected)
    # The test can tell: without CFG (scale 1) or with the halves swapped the direction differs.
    no_cfg = _expected_grad(guidance, latents, text, uncond, t, noise, scale=1.0)
    swapped = _expected_grad(guidance, latents, uncond, text, t, noise)
    for other in (no_cfg, swapped):
        assert (other - expected).abs().max() > 100 * 1e-5 * expected.abs().max()
    # loss = 0.5·mean(g²) over all B·C·H·W (x − sg(x − g) = g up to the float32 rounding of the target)
    assert loss.item() == pytest.approx(0.5 * expected.pow(2).mean().item(), rel=1e-5)


def test_dm_loss_gradient_is_grad_over_the_element_count(guidance):
    latents, text, uncond, t, noise = _inputs(seed=1)
    x = latents.clone().requires_grad_(True)
    loss, grad = guidance.distribution_matching_loss(x, text, uncond, timesteps=t, noise=noise)
    loss.backward()
    _close(x.grad, grad / latents.numel(), rel=1e-6)
    assert all(p.grad is None for p in guidance.parameters())  # the scores never keep a graph


def test_x0_is_computed_in_float64(guidance, monkeypatch):
    # Near t = 999 the x0 factors are ~15: an x0 in float32 is off by ~1e-6 relative, float64 by ~1e-15.
    # The scores are fixed tensors here, so only the arithmetic after them is compared.
    latents, text, uncond, _, noise = _inputs(seed=2)
    t = torch.tensor([999, 990])
    gen = torch.Generator().manual_seed(11)
    e_real, e_fake = torch.randn(latents.shape, generator=gen), torch.randn(latents.shape, generator=gen)
    monkeypatch.setattr(type(guidance), "real_epsilon", lambda self, *args: e_real)
    monkeypatch.setattr(type(guidance), "fake_epsilon", lambda self, *args: e_fake)
    _, grad = guidance.distribution_matching_loss(latents, text, uncond, timesteps=t, noise=noise)

    def direction(dtype):
        a = guidance.alphas_cumprod.to(dtype)[t].reshape(-1, 1, 1, 1)
        af = guidance.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noisy = (af.sqrt() * latents + (1 - af).sqrt() * noise).to(dtype)
        p_real = latents.to(dtype) - (noisy - (1 - a).sqrt() * e_real.to(dtype)) / a.sqrt()
        p_fake = latents.to(dtype) - (noisy - (1 - a).sqrt() * e_fake.to(dtype)) / a.sqrt()
        return ((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)).double()

    exact, single = direction(torch.float64), direction(torch.float32)
    scale = exact.abs().max().item()
    assert (grad - exact).abs().max().item() < 1e-12 * scale
    assert (single - exact).abs().max().item() > 1e-8 * scale  # float32 would be visibly off


def test_nan_directions_become_zero(guidance, monkeypatch):
    latents, text, uncond, t, noise = _inputs(seed=3)
    _, clean = guidance.distribution_matching_loss(latents, text, uncond, timesteps=t, noise=noise)
    original = type(guidance).real_epsilon

    def nan_first(self, noisy, timesteps, text_embedding, uncond_embedding):
        eps = original(self, noisy, timesteps, text_embedding, uncond_embedding).clone()
        eps[0] = float("nan")
        return eps

    monkeypatch.setattr(type(guidance), "real_epsilon", nan_first)
    loss, grad = guidance.distribution_matching_loss(latents, text, uncond, timesteps=t, noise=noise)
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and torch.equal(grad[1], clean[1])
    assert torch.isfinite(loss)


def test_fake_denoising_loss_trains_the_fake_score_on_detached_latents(guidance):
    latents, text, _, t, noise = _inputs(seed=4, t_range=(0, 999))
    x = latents.clone().requires_grad_(True)
    loss = guidance.fake_denoising_loss(x, text, timesteps=t, noise=noise)
    a = guidance.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        eps = guidance.fake_unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample
    assert loss.item() == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert x.grad is None
    assert guidance.fake_unet.conv_in.weight.grad is not None
    assert all(p.grad is None for p in guidance.real_unet.parameters())
    guidance.zero_grad(set_to_none=True)


def test_realism_logits_read_the_fake_mid_block_and_pass_gradients_to_the_latents(guidance):
    latents, text, _, t, noise = _inputs(seed=5, t_range=(0, 999))
    x = latents.clone().requires_grad_(True)
    logits = guidance.realism_logits(x, text, timesteps=t, noise=noise)
    assert logits.shape == (B, 1)
    # Independent: the mid-block output from a hook on the UNet's full forward, then the branch.
    seen = {}
    hook = guidance.fake_unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    a = guidance.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        guidance.fake_unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, encoder_hidden_states=text)
    hook.remove()
    expected = guidance.cls_pred_branch(seen["mid"]).reshape(B, 1)
    _close(logits.detach(), expected, rel=1e-6)
    F.softplus(-logits).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    guidance.zero_grad(set_to_none=True)
    # Larger latents give a grid of logits.
    big = _inputs(size=32, seed=6)
    assert guidance.realism_logits(big[0], big[1], timesteps=big[3], noise=big[4]).shape == (B, 1, 2, 2)


def test_every_method_gives_the_same_values_with_gradients_on_and_off(guidance):
    latents, text, uncond, t, noise = _inputs(seed=7)
    with torch.no_grad():
        off = (guidance.distribution_matching_loss(latents, text, uncond, timesteps=t, noise=noise),
               guidance.fake_denoising_loss(latents, text, timesteps=t, noise=noise),
               guidance.realism_logits(latents, text, timesteps=t, noise=noise))
    x = latents.clone().requires_grad_(True)
    on = (guidance.distribution_matching_loss(x, text, uncond, timesteps=t, noise=noise),
          guidance.fake_denoising_loss(x, text, timesteps=t, noise=noise),
          guidance.realism_logits(x, text, timesteps=t, noise=noise))
    assert on[0].loss.requires_grad and not off[0].loss.requires_grad
    assert torch.equal(on[0].grad, off[0].grad) and torch.equal(on[0].loss.detach(), off[0].loss)
    assert torch.equal(on[1].detach(), off[1]) and torch.equal(on[2].detach(), off[2])
    guidance.zero_grad(set_to_none=True)


def test_mid_block_helper_matches_the_full_forward_hook(guidance):
    latents, text, _, t, _ = _inputs(seed=8)
    seen = {}
    hook = guidance.fake_unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        guidance.fake_unet(latents, t, encoder_hidden_states=text)
        ours = unet_mid_block_output(guidance.fake_unet, latents, t, text)
    hook.remove()
    assert torch.equal(ours, seen["mid"])


# --------------------------------------------------------------------------- the released file
def test_from_released_reads_the_authors_layout(guidance, tmp_path):
    path = tmp_path / "model_2.safetensors"
    save_released_guidance(guidance, path, real_bf16=True, wrapper_prefix=True, dummy_network=True)
    raw = load_file(str(path))
    assert raw["module.real_unet.conv_in.weight"].dtype == torch.bfloat16 and "module.dummy_network.fc.weight" in raw
    loaded = DMDGuidance.from_released(path, unet_config=TINY_UNET)
    assert isinstance(loaded, DMDGuidance)
    state, original = loaded.state_dict(), guidance.state_dict()
    assert set(state) == set(original)
    for key, value in original.items():
        assert state[key].dtype == torch.float32, key
        want = value.to(torch.bfloat16).float() if key.startswith("real_unet.") else value
        assert torch.equal(state[key], want), key
    assert not any(p.requires_grad for p in loaded.real_unet.parameters())
    assert all(p.requires_grad for p in loaded.fake_unet.parameters())
    # The loaded model computes what the original computes with the bf16-rounded real UNet.
    latents, text, uncond, t, noise = _inputs(seed=9)
    _, grad = loaded.distribution_matching_loss(latents, text, uncond, timesteps=t, noise=noise)
    _close(grad, _expected_grad(loaded, latents, text, uncond, t, noise))
    # Plain layout (no prefix, no dummy, fp32) reads the same; import-reference writes module keys.
    plain = tmp_path / "plain.safetensors"
    save_released_guidance(guidance, plain, real_bf16=False, dummy_network=False)
    assert torch.equal(DMDGuidance.from_released(plain, unet_config=TINY_UNET).real_unet.conv_in.weight,
                       guidance.real_unet.conv_in.weight)
    out = import_guidance(path, tmp_path / "guidance.safetensors", unet_config=TINY_UNET)
    assert set(load_file(str(out))) == set(original)


def test_a_file_that_does_not_fit_is_one_line(guidance, tmp_path):
    path = tmp_path / "model_2.safetensors"
    save_released_guidance(guidance, path)
    with pytest.raises(WeightsError) as err:
        DMDGuidance.from_released(path)  # the SD-1.5 size expected, a small file given
    assert "\n" not in str(err.value) and "model_2.safetensors" in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        DMDGuidance.from_released(tmp_path / "missing.safetensors")


def test_the_full_size_key_set_is_the_released_one():
    expected = read_key_list("guidance.txt")
    assert len(expected) == 1385
    shapes = guidance_shapes()  # SD-1.5 on the meta device
    ignored = {k for k in expected if k.startswith("dummy_network.")}
    assert set(shapes) == set(expected) - ignored
    for key, shape in shapes.items():
        assert tuple(shape) == expected[key][0], key
    elements = sum(torch.Size(s).numel() for s, _ in expected.values())
    assert elements == 1_771_480_722
    cls = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("cls_pred_branch."))
    assert cls == 52_437_761
