"""GAN parts of the finetune stage: loss objects, adaptive weight, both critics, and LPIPS loading."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from onedc.training.build import build_discriminator
from onedc.training.config import compose, group_options, to_dict
from onedc.errors import ConfigError, WeightsError
from onedc.modules.discriminators import DiffusionDiscriminator, build_diffusion_discriminator, build_patch_discriminator
from onedc.modules.losses import (ALEXNET_FILE, HingeLoss, NonSaturatingLoss, PerceptualLoss, adaptive_gan_weight,
                                  alexnet_weights_path, build_gan_loss, discriminator_accuracy)

REAL = torch.tensor([2.0, -1.0, 0.5])
FAKE = torch.tensor([-3.0, 0.25])


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_non_saturating_loss_values():
    loss = NonSaturatingLoss()
    assert loss.generator_loss(FAKE).item() == pytest.approx((_softplus(3.0) + _softplus(-0.25)) / 2, rel=1e-6)
    want = (_softplus(-2.0) + _softplus(1.0) + _softplus(-0.5)) / 3 + (_softplus(-3.0) + _softplus(0.25)) / 2
    assert loss.discriminator_loss(REAL, FAKE).item() == pytest.approx(want, rel=1e-6)


def test_hinge_loss_values():
    loss = HingeLoss()
    assert loss.generator_loss(FAKE).item() == pytest.approx(-(-3.0 + 0.25) / 2)
    # relu(1 - real) = [0, 2, 0.5]; relu(1 + fake) = [0, 1.25]
    assert loss.discriminator_loss(REAL, FAKE).item() == pytest.approx(2.5 / 3 + 1.25 / 2)


def test_gan_loss_by_name_and_unknown_name():
    assert isinstance(build_gan_loss("softplus"), NonSaturatingLoss)
    assert isinstance(build_gan_loss("hinge"), HingeLoss)
    with pytest.raises(ConfigError, match="softplus.*hinge"):
        build_gan_loss("wasserstein")


def test_discriminator_accuracy_counts_correct_sides():
    real_acc, fake_acc = discriminator_accuracy(REAL, FAKE)
    assert real_acc.item() == pytest.approx(2 / 3) and fake_acc.item() == pytest.approx(1 / 2)


def test_adaptive_weight_is_the_grad_norm_ratio_at_the_last_layer():
    layer = torch.nn.Linear(3, 2)
    out = layer(torch.tensor([[1.0, 2.0, -1.0]]))
    rec, adv = out.square().sum(), 0.1 * out.sum()
    weight = adaptive_gan_weight(rec, adv, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, layer.weight, retain_graph=True)[0]
    assert weight.item() == pytest.approx((g_rec.norm() / (g_adv.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad and layer.weight.grad is None  # nothing accumulated
    assert adaptive_gan_weight(rec, 1e-12 * out.sum(), layer.weight, max_weight=7.0).item() == 7.0


# ------------------------------------------------------------------ critics
@pytest.fixture(scope="module")
def diffusion_cfg() -> dict:
    return to_dict(compose(["discriminator=diffusion"]).discriminator)


def test_diffusion_critic_sees_the_latent_only_through_the_noise_schedule(diffusion_cfg):
    critic = build_discriminator(diffusion_cfg, latent_channels=4)
    assert isinstance(critic, DiffusionDiscriminator) and critic.input_domain == "latent"
    v = torch.randn(2, 4, 16, 16)
    draw = critic.draw(v)
    logits = critic(v, **draw)
    assert logits.shape == (2, 1, 8, 8)
    assert torch.equal(critic(v, **draw), logits)  # a given draw is deterministic
    assert not torch.allclose(critic(v, draw["timesteps"], torch.randn_like(v)), logits)
    # add_noise(v, ε, t) = sqrt(ᾱ_t)·v + sqrt(1-ᾱ_t)·ε: shifting v by c and ε by -c·sqrt(ᾱ/(1-ᾱ))
    # leaves the noised latent, hence the logits, unchanged.
    t = torch.tensor([400, 400])
    alpha = critic.scheduler.alphas_cumprod[400]
    shift = 0.7
    same = critic(v + shift, t, draw["noise"] - shift * (alpha / (1 - alpha)).sqrt())
    assert torch.allclose(same, critic(v, t, draw["noise"]), atol=1e-4)
    # timesteps are drawn per sample in [t_min, t_max]
    narrow = build_diffusion_discriminator(latent_channels=4, unet_config=diffusion_cfg["unet"], t_min=5, t_max=6)
    drawn = narrow.draw(torch.zeros(64, 4, 8, 8))["timesteps"]
    assert set(drawn.tolist()) == {5, 6}


def test_diffusion_critic_on_a_cross_attention_unet_learns_its_null_context():
    unet = {"sample_size": 16, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 8, "attention_head_dim": 4}
    critic = build_diffusion_discriminator(latent_channels=4, unet_class="UNet2DConditionModel", unet_config=unet)
    critic(torch.randn(2, 4, 16, 16)).mean().backward()
    assert critic.null_context.shape == (1, 1, 8) and critic.null_context.grad.abs().sum() > 0


def test_diffusion_critic_reuses_a_pretrained_unet_encoder(tmp_path, diffusion_cfg):
    from diffusers import UNet2DModel

    unet = UNet2DModel(in_channels=4, **diffusion_cfg["unet"])
    unet.save_pretrained(tmp_path / "unet")
    critic = build_diffusion_discriminator(latent_channels=4, pretrained=tmp_path)  # an SD-style dir with unet/
    assert torch.equal(critic.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(critic.mid_block.resnets[0].conv1.weight, unet.mid_block.resnets[0].conv1.weight)
    assert not any(name.startswith(("up_blocks", "conv_out")) for name, _ in critic.named_parameters())
    with pytest.raises(WeightsError, match="weights not found at .*critic"):
        build_diffusion_discriminator(latent_channels=4, pretrained=tmp_path / "missing")
    with pytest.raises(WeightsError, match="takes 4 channels"):
        build_diffusion_discriminator(latent_channels=16, pretrained=tmp_path)


def test_patchgan_critic_gives_patch_logits_without_batch_statistics():
    critic = build_discriminator({"kind": "patchgan", "channels": 8, "layers": 3, "seed": 1}, latent_channels=4)
    assert critic.input_domain == "pixel" and list(critic.buffers()) == []
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert critic(x).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    # each logit depends on its own image only (no batch coupling)
    assert torch.allclose(critic(x[:1]), critic(x)[:1], atol=1e-6)
    again = build_patch_discriminator(channels=8, layers=3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(critic.parameters(), again.parameters()))


@pytest.mark.parametrize("option", group_options("discriminator"))
def test_every_discriminator_option_builds_and_scores_its_domain(option):
    critic = build_discriminator(compose([f"discriminator={option}"]).discriminator, latent_channels=4)
    x = torch.randn(1, 4, 16, 16) if critic.input_domain == "latent" else torch.rand(1, 3, 64, 64) * 2 - 1
    logits = critic(x, **critic.draw(x))
    assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()


def test_unknown_critic_kind_is_refused():
    with pytest.raises(ConfigError, match="diffusion | patchgan"):
        build_discriminator({"kind": "stylegan"}, latent_channels=4)


# ------------------------------------------------------------------ LPIPS
def test_random_backbone_lpips_is_labelled_and_behaves_like_a_distance(caplog):
    with caplog.at_level(logging.WARNING, logger="onedc"):
        lpips = PerceptualLoss(random_backbone=True)
    assert "LPIPS with RANDOM backbone (tests only)" in caplog.text
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    distance = lpips(y, x)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert y.grad.abs().sum() > 0 and not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # dropout in the heads stays off


def test_missing_alexnet_weights_say_which_file_goes_where(tmp_path):
    with pytest.raises(WeightsError) as err:
        PerceptualLoss(tmp_path)
    message = str(err.value)
    assert ALEXNET_FILE in message and str(tmp_path / ALEXNET_FILE) in message
    assert "stage.lpips.weights" in message
    # null = torch hub's cache (TORCH_HOME points at a temp dir in the tests)
    with pytest.raises(WeightsError, match=str(torch.hub.get_dir())):
        alexnet_weights_path(None)


def test_alexnet_backbone_loads_from_a_torch_hub_dir(tmp_path):
    reference = PerceptualLoss(random_backbone=True, seed=5).lpips.net
    # torchvision's AlexNet keys: features.<index>.*; lpips splits them into slice1..slice5.
    state = {f"features.{key.split('.', 1)[1]}": torch.randn_like(value) for key, value in reference.state_dict().items()}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / ALEXNET_FILE)
    lpips = PerceptualLoss(tmp_path)
    loaded = lpips.lpips.net.state_dict()
    assert torch.equal(loaded["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], state["features.10.bias"])
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="is not torchvision's AlexNet"):
        PerceptualLoss(tmp_path / "broken.pth")
