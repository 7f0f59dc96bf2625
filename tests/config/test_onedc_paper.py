"""``experiment=onedc_paper``: the paper's stage I + stage II with every hyperparameter of
docs/reference-model.md §10, checked key by key, and its full-size modules built on the meta device."""
from __future__ import annotations

import pytest
import torch

from onedc.stages.common import quadratic_ramp
from onedc.training.build import build_guidance_model, generator_from_config, vae_from_config
from onedc.training.config import compose, to_dict

# (config key, §10 value): one row per hyperparameter of the recipe.
SECTION_10 = [
    # §10.1 stage I
    ("model.name", "onedc_sd15"), ("tokenizer.name", "maskgit_vqgan"), ("stage.chain", ["distill", "dmd"]),
    ("stage.distill.max_steps", 400_000), ("stage.distill.lmbda", 4.6), ("stage.distill.lmbda_start", 1e-4),
    ("stage.distill.lmbda_warmup_steps", 4000), ("stage.distill.lmbda_step0", "final"),
    ("stage.distill.lr", 5e-5), ("stage.distill.betas", [0.9, 0.999]), ("stage.distill.weight_decay", 0.01),
    ("stage.distill.warmup_steps", 500), ("stage.distill.grad_clip", 5.0),
    ("tokenizer.head.loss_weight", 1e-3), ("tokenizer.head.mse_weight", 0.01), ("stage.distill.distill_weight", 1.0),
    ("model.generator.lora", {"rank": 64, "alpha": 8.0}), ("model.generator.timestep", 999),
    ("data.batch_size", 8), ("trainer.devices", 4), ("trainer.global_batch_size", 32), ("trainer.strategy", "ddp"),
    ("trainer.precision", "bf16-mixed"), ("data.crop_size", 512),
    # §10.2 stage II
    ("stage.dmd.max_steps", 1_000_100), ("stage.dmd.generator_every", 10), ("stage.dmd.dm_weight", 1.0),
    ("stage.dmd.gan_weight", 1e-3), ("stage.dmd.guidance_cls_weight", 1e-2), ("stage.dmd.pixel_weight", 0.625),
    ("stage.dmd.lpips_weight", 0.625), ("stage.dmd.dm_timesteps", [20, 640]), ("stage.dmd.gan_timesteps", [0, 999]),
    ("stage.dmd.fake_timesteps", [0, 999]), ("stage.dmd.lr", 1e-6), ("stage.dmd.guidance_lr", 1e-6),
    ("stage.dmd.betas", [0.9, 0.999]), ("stage.dmd.guidance_betas", [0.9, 0.999]),
    ("stage.dmd.weight_decay", 0.01), ("stage.dmd.guidance_weight_decay", 0.01), ("stage.dmd.warmup_steps", 500),
    ("stage.dmd.guidance_warmup_steps", 500), ("stage.dmd.grad_clip", 5.0), ("stage.dmd.captions", "batch"),
    ("guidance.guidance_scale", 1.75), ("guidance.real_dtype", "bfloat16"), ("guidance.unet.block_out_channels",
                                                                             [320, 640, 1280, 1280]),
    ("guidance.unet.cross_attention_dim", 768), ("guidance.text.max_length", 77),
    ("guidance.scheduler.beta_schedule", "scaled_linear"),
]


def _select(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.fixture(scope="module")
def paper() -> dict:
    return to_dict(compose(["experiment=onedc_paper"]))


@pytest.mark.parametrize("key,value", SECTION_10, ids=[k for k, _ in SECTION_10])
def test_the_resolved_config_is_section_10(paper, key, value):
    assert _select(paper, key) == value


@pytest.mark.parametrize("lmbda", [0.6, 1.8, 2.9, 4.6, 7.4, 12.2])
def test_ladder_presets_set_lambda_and_the_run_dir(lmbda):
    cfg = compose(["experiment=onedc_paper", f"ladder=lmbda_{lmbda}"])
    assert cfg.stage.distill.lmbda == lmbda and cfg.run_dir == f"runs/onedc_paper-lmbda{lmbda}"


def test_the_lambda_ramp_and_its_step_zero_quirk(paper):
    distill = paper["stage"]["distill"]
    ramp = lambda s: quadratic_ramp(s, distill["lmbda"], distill["lmbda_warmup_steps"], distill["lmbda_start"],
                                    distill["lmbda_step0"])
    assert ramp(0) == 4.6  # the authors' quirk: step 0 uses λ_end
    assert ramp(1) == pytest.approx(1e-4 + (1 / 4000) ** 2 * (4.6 - 1e-4), rel=1e-12)
    assert ramp(2000) == pytest.approx(1e-4 + 0.25 * (4.6 - 1e-4), rel=1e-12)
    assert ramp(4000) == ramp(10 ** 6) == 4.6
    assert quadratic_ramp(0, 4.6, 4000, 1e-4, "ramp") == 1e-4


def test_the_full_size_modules_build_on_meta(paper):
    vae = vae_from_config(paper["model"], device="meta")
    generator = generator_from_config(paper["model"], device="meta")
    guidance = build_guidance_model(paper["guidance"], device="meta")

    def count(module, trainable=None):
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    assert count(vae) == 83_653_863 and count(generator) == 928_619_276
    assert count(guidance) == 1_771_480_722 - 1000 - 33  # the file's elements minus alphas_cumprod and dummy_network
    assert count(guidance.real_unet, trainable=True) == 0 and guidance.real_unet.conv_in.weight.dtype == torch.bfloat16
    assert count(guidance.fake_unet, trainable=False) == 0
