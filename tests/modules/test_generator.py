"""OneStepGenerator: shapes, the x0 conversion, LoRA, weight loading, config checks, full-size count."""
from __future__ import annotations

import math

import pytest
import torch

from onedc.training.build import generator_from_config
from onedc.training.config import compose, to_dict
from onedc.errors import ConfigError, WeightsError
from onedc.modules.generator import OneStepGenerator

SD15_UNET_PARAMS = 859_520_964  # diffusers SD-1.5 UNet2DConditionModel (conv_in 4 -> 320)
LORA = {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}


@pytest.fixture(scope="module")
def tiny_model() -> dict:
    return to_dict(compose(["model=tiny_random"]).model)


def _inputs(model: dict, batch: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(batch, model["codec"]["gs_channels"], size, size, generator=gen)
    tokens = torch.randn(batch, (size // 8) ** 2, model["codec"]["token_dim"], generator=gen)
    return features, tokens


def test_output_is_a_latent_on_the_feature_grid(tiny_model):
    generator = generator_from_config(tiny_model).eval()
    features, tokens = _inputs(tiny_model)
    with torch.no_grad():
        latent = generator(features, tokens)
    assert latent.shape == (2, 4, 16, 16)
    assert latent.device == features.device and latent.dtype == torch.float32
    assert torch.isfinite(latent).all()
    assert generator.unet.conv_in.in_channels == tiny_model["codec"]["gs_channels"]
    assert generator.unet.config.in_channels == tiny_model["codec"]["gs_channels"]


def test_x0_conversion_matches_the_formula_by_hand(tiny_model):
    generator = generator_from_config(tiny_model).eval()
    features, tokens = _inputs(tiny_model)
    # ᾱ_999 of SD's scaled_linear schedule, computed without diffusers.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha = torch.cumprod(1 - betas, 0)[999].item()
    assert generator.alphas_cumprod[999].item() == pytest.approx(alpha, rel=1e-5)
    with torch.no_grad():
        eps = generator.unet(features, torch.full((2,), 999), encoder_hidden_states=tokens).sample
        x_t = generator.to_xt(features)
        expected = (x_t - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
        assert torch.allclose(generator(features, tokens), expected, atol=1e-4, rtol=1e-4)

    ones = torch.ones(1, 4, 2, 2)
    a500 = torch.cumprod(1 - betas, 0)[500].item()
    generator.prediction_type = "v_prediction"
    v_x0 = generator.prediction_to_x0(ones, 2 * ones, timestep=500)
    assert torch.allclose(v_x0, torch.full_like(ones, 2 * math.sqrt(a500) - math.sqrt(1 - a500)), atol=1e-6)
    generator.prediction_type = "sample"
    assert torch.equal(generator.prediction_to_x0(ones, 2 * ones, timestep=500), ones)


def test_multi_step_runs_the_unet_once_per_step_from_T(tiny_model):
    generator = generator_from_config(tiny_model).eval()
    features, tokens = _inputs(tiny_model)
    calls: list[int] = []
    hook = generator.unet.register_forward_hook(lambda module, args, out: calls.append(int(args[1][0])))
    with torch.no_grad():
        one = generator(features, tokens)
        assert torch.allclose(generator.multi_step(features, tokens, steps=1), one, atol=1e-6)
        calls.clear()
        four = generator.multi_step(features, tokens, steps=4)
    hook.remove()
    assert calls == [999, 749, 499, 249]
    assert four.shape == one.shape and torch.isfinite(four).all()
    assert not torch.allclose(four, one)

    # A smaller fixed T: the DDIM schedule is truncated to start at or below it.
    generator.timestep = 500
    assert generator.baseline_schedule(4)[1] == [499, 374, 249, 124]


def test_lora_trains_only_adapters_and_new_layers(tiny_model):
    plain = generator_from_config(tiny_model)
    lora_model = dict(tiny_model, generator=dict(tiny_model["generator"], lora=LORA))
    generator = generator_from_config(lora_model)
    features, tokens = _inputs(tiny_model)
    trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert {"unet.conv_in.weight", "to_xt.weight"} <= trainable
    assert all("lora_" in n or n.startswith(("unet.conv_in.", "to_xt.")) for n in trainable)
    # LoRA B starts at zero: same output as the generator without adapters (same seeds).
    with torch.no_grad():
        assert torch.allclose(generator(features, tokens), plain(features, tokens), atol=1e-5)

    before = {n: p.detach().clone() for n, p in generator.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=1e-2)
    generator(features, tokens).square().mean().backward()
    optimizer.step()
    after = dict(generator.named_parameters())
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n or "conv_in" in n)


def test_pretrained_unet_dir_loads_to_identical_outputs(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    gen_cfg = tiny_model["generator"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gen_cfg["seed"])
        UNet2DConditionModel(**gen_cfg["unet"]).save_pretrained(tmp_path / "sd" / "unet")
    drawn = generator_from_config(tiny_model).eval()
    for where in (tmp_path / "sd", tmp_path / "sd" / "unet"):  # SD model dir, or the UNet dir itself
        loaded = generator_from_config(dict(tiny_model, generator=dict(gen_cfg, pretrained=str(where)))).eval()
        features, tokens = _inputs(tiny_model)
        with torch.no_grad():
            assert torch.equal(loaded(features, tokens), drawn(features, tokens))

    with pytest.raises(WeightsError, match="nowhere"):
        generator_from_config(dict(tiny_model, generator=dict(gen_cfg, pretrained=str(tmp_path / "nowhere"))))


def test_token_width_must_match_cross_attention(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny_model["generator"]["unet"])
    with pytest.raises(ValueError, match="cross-attention expects 32-d"):
        OneStepGenerator(unet, gs_channels=32, token_dim=16)
    generator = OneStepGenerator(unet, gs_channels=32, token_dim=32)
    features, tokens = _inputs(tiny_model)
    with pytest.raises(ValueError, match="tokens are 16-d"):
        generator(features, tokens[..., :16])
    with pytest.raises(ConfigError, match="token_dim=16"):
        generator_from_config(compose(["model=tiny_random", "model.codec.token_dim=16"]).model)


def test_sd15_preset_unet_has_the_reference_size():
    generator = generator_from_config(compose(["model=sd15"]).model, device="meta")
    unet = generator.unet
    assert unet.config.cross_attention_dim == 768 and unet.conv_in.in_channels == 320
    base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    # Our conv_in reads 320-ch g_s features; the reference counts SD's 4-ch conv_in.
    conv_in = sum(p.numel() for p in unet.conv_in.parameters())
    reference_layout = base - conv_in + (4 * 320 * 9 + 320)
    assert reference_layout == SD15_UNET_PARAMS
    assert abs(base / SD15_UNET_PARAMS - 1) < 0.02, f"UNet with the new conv_in: {base / 1e6:.2f}M"
    assert 40e6 < lora < 60e6  # rank-64 LoRA on attention + resnet convs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_generator_started_from_the_latent_head_reproduces_it(prediction_type):
    """model=tiny's init: residual: at step 0 the generator's x0 is the codec's light latent reconstruction."""
    model = to_dict(compose(["model=tiny", f"model.generator.prediction_type={prediction_type}"]).model)
    generator = generator_from_config(model).eval()
    features, tokens = _inputs(model)
    head = torch.nn.Conv2d(model["codec"]["gs_channels"], 4, 3, padding=1)
    with torch.no_grad():
        before = generator(features, tokens)
        generator.start_from_latent_head(head)
        after, light = generator(features, tokens), head(features)
    assert not torch.allclose(before, light, atol=1e-2)
    assert torch.allclose(after, light, atol=1e-5, rtol=1e-5), (after - light).abs().max()
    assert generator.unet.conv_out.weight.abs().sum() == 0  # the UNet learns the correction from zero


def test_latent_head_start_is_refused_where_it_cannot_hold(tiny_model):
    with pytest.raises(ValueError, match="set model.generator.xt_kernel_size to 3"):
        generator_from_config(tiny_model).start_from_latent_head(torch.nn.Conv2d(tiny_model["codec"]["gs_channels"], 4, 3, padding=1))
    sample = to_dict(compose(["model=tiny", "model.generator.prediction_type=sample"]).model)
    with pytest.raises(ValueError, match="needs prediction_type epsilon or v_prediction"):
        generator_from_config(sample).start_from_latent_head(torch.nn.Conv2d(sample["codec"]["gs_channels"], 4, 3, padding=1))
