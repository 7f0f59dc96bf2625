"""Stage 3 (`finetune`): the single-optimizer GAN update, pixel fidelity, DDP and DeepSpeed on the CPU.

The equivalence test compares the stage's one-optimizer / one-backward update (run by a real
Lightning Trainer) with an independent classic two-optimizer loop. The L1 test compares the
latent stage's checkpoint and the finetuned one, decoded the same way, on the same images.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from onedc.training import pipeline
from onedc.training.build import build_datamodule, build_stage
from onedc.training.config import compose
from onedc.datamodules.image_folder import sample_photo_paths
from onedc.stages.finetune import DISCRIMINATOR_GROUP, FinetuneStage, _base_optimizer

REPO = Path(__file__).resolve().parents[2]
BASE = ["model=tiny_random", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128", "stage=finetune",
        "stage.lpips.random_backbone=true", "stage.image_every_n_steps=null"]


def _critic_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.discriminator.state_dict().items()}


def _generator_params(module: FinetuneStage) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if p.requires_grad and n.startswith(("generator.", "codec."))]


# --------------------------------------------------------------------------- gradient separation
@pytest.mark.parametrize("critic", [["discriminator=diffusion", "stage.gan_loss=softplus"],
                                    ["discriminator=patchgan", "discriminator.channels=8", "stage.gan_loss=hinge"]],
                         ids=["diffusion", "patchgan"])
def test_adversarial_terms_reach_only_their_own_network(critic):
    cfg = compose(BASE + critic + ["stage.gan_start_step=0"])
    stage = build_stage(cfg, cfg.stage).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = stage.forward_pass(x)
    real, fake = stage.critic_inputs(x, out)
    draw_fake, draw_real = stage.discriminator.draw(fake), stage.discriminator.draw(real)

    g_adv, _ = stage.generator_adversarial_loss(fake, draw_fake)
    g_adv.backward()
    assert all(p.grad is None for p in stage.discriminator.parameters())  # the generator term: G only
    assert stage.generator.unet.conv_out.weight.grad.abs().sum() > 0

    stage.zero_grad(set_to_none=True)
    d_loss, _, _ = stage.critic_loss(real, fake, draw_real, draw_fake)
    d_loss.backward()
    assert all(p.grad is None for p in _generator_params(stage))  # the critic term: D only
    assert all(p.grad is not None for p in stage.discriminator.parameters())

    # Before gan_start_step the critic gets exactly-zero gradients (DDP and ZeRO see every parameter).
    stage.zero_grad(set_to_none=True)
    stage.gan_start_step = 10
    loss, metrics = stage.training_losses(x)
    loss.backward()
    assert "d_loss" not in metrics
    assert all(p.grad is not None and not p.grad.any() for p in stage.discriminator.parameters())

    # The adaptive weight (VQGAN) rescales the adversarial term through the functional critic call.
    stage.zero_grad(set_to_none=True)
    stage.gan_start_step, stage.adaptive_gan_weight = 0, True
    loss, metrics = stage.training_losses(x)
    loss.backward()
    assert 0 < metrics["gan_weight"].item() != pytest.approx(stage.gan_weight)
    assert all(p.grad is not None for p in stage.discriminator.parameters())


def test_without_gan_and_lpips_a_trained_codec_adds_the_rate():
    cfg = compose(BASE + ["stage.gan_weight=0", "stage.lpips_weight=0", "stage.train_codec=true", "stage.lmbda=3.0",
                          "stage.pixel_loss=mse", "stage.latent_weight=0.5", "stage.pixel_weight=2.0"])
    stage = build_stage(cfg, cfg.stage).train()
    assert stage.discriminator is None
    groups = stage.configure_optimizers()["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["generator"] and any(p is stage.codec.g_s[0].weight for p in groups[0]["params"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    loss, metrics = stage.training_losses(x)
    assert torch.allclose(loss, 2.0 * metrics["pixel"] + 0.5 * metrics["latent_loss"] + 3.0 * metrics["bpp"])


def test_perceptual_network_is_not_model_state():
    cfg = compose(BASE)
    stage = build_stage(cfg, cfg.stage)
    assert not any("lpips" in key for key in stage.state_dict())
    assert {g["name"] for g in stage.configure_optimizers()["optimizer"].param_groups} == {"generator", DISCRIMINATOR_GROUP}


# --------------------------------------------------------------------------- single vs two optimizers
EQ_STEPS, EQ_GAN_START, EQ_CLIP = 5, 2, 0.05
EQ = BASE + ["stage.lpips_weight=0.1", "stage.gan_weight=0.5", f"stage.gan_start_step={EQ_GAN_START}",
             "stage.lr=1e-3", "stage.warmup_steps=2", "stage.disc_lr=3e-3", "stage.disc_betas=[0.5,0.9]",
             "stage.disc_weight_decay=0.05", "stage.disc_warmup_steps=2", "stage.ema_decay=null"]


class SeedEachStep(pl.Callback):
    """Same random draws per step in both schemes; records the critic at the start of each step."""

    def __init__(self) -> None:
        self.critic_at_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.critic_at_step.append(_critic_state(pl_module))
        torch.manual_seed(1000 + trainer.global_step)


def _classic_alternation(stage: FinetuneStage, batches: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The reference: two AdamW optimizers; per step a G step with D frozen (against D before its
    update) and a D step on fake.detach(); D's optimizer is created at gan_start_step."""
    spec, dspec = stage.optimizer_spec, stage.disc_optimizer_spec
    critic = stage.discriminator
    g_params, d_params = _generator_params(stage), list(critic.parameters())
    opt_g = torch.optim.AdamW(g_params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
    opt_d = sched_d = None
    critic_at_step = []
    stage.train()
    for step, x in enumerate(batches):
        critic_at_step.append(_critic_state(stage))
        torch.manual_seed(1000 + step)
        out = stage.forward_pass(x)
        g_loss = stage.reconstruction_losses(x, out)["loss"]
        if step >= EQ_GAN_START:
            if opt_d is None:
                opt_d = torch.optim.AdamW(d_params, lr=dspec.lr, betas=dspec.betas, weight_decay=dspec.weight_decay)
                sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: min(1.0, (s + 1) / dspec.warmup_steps))
            real, fake = out.target, out.latent  # the diffusion critic looks at latents
            draw_fake, draw_real = critic.draw(fake), critic.draw(real)
            critic.requires_grad_(False)
            g_loss = g_loss + stage.gan_weight * stage.gan_loss.generator_loss(critic(fake, **draw_fake))
            g_loss.backward()
            critic.requires_grad_(True)
            d_loss = stage.gan_loss.discriminator_loss(critic(real, **draw_real), critic(fake.detach(), **draw_fake))
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(d_params, EQ_CLIP)
        else:
            g_loss.backward()
        torch.nn.utils.clip_grad_norm_(g_params, EQ_CLIP)
        for opt, sched in ((opt_g, sched_g), (opt_d, sched_d)):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
    return critic_at_step


def test_single_optimizer_step_equals_two_optimizer_alternation():
    cfg = compose(EQ)
    stage = build_stage(cfg, cfg.stage)
    classic = copy.deepcopy(stage)
    initial_to_xt = stage.generator.to_xt.weight.detach().clone()
    batches = torch.rand(EQ_STEPS, 2, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1

    seeder = SeedEachStep()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=EQ_STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=EQ_CLIP,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[seeder])
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    classic_critic_at_step = _classic_alternation(classic, batches)

    # The idle critic is bitwise still before gan_start_step, in both schemes.
    start = seeder.critic_at_step[0]
    for key, value in start.items():
        assert torch.equal(seeder.critic_at_step[EQ_GAN_START][key], value), key
        assert torch.equal(classic_critic_at_step[EQ_GAN_START][key], value), key
    # Both schemes moved both nets by the same amounts (clipping was active: EQ_CLIP is small). On
    # this CPU they are bitwise equal; the tolerance only allows for another summation order, while
    # joint clipping, a missing Adam restart or an undetached critic call differ by > 1e-6.
    ours, theirs = dict(stage.named_parameters()), dict(classic.named_parameters())
    for name, param in ours.items():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs[name], rtol=0, atol=1e-8, msg=name)
    assert not torch.equal(ours["discriminator.conv_in.weight"], start["conv_in.weight"])
    assert not torch.equal(ours["generator.to_xt.weight"], initial_to_xt)
    # D's Adam restarted at gan_start_step: its step count is the number of GAN steps.
    optimizer = _base_optimizer(trainer.optimizers[0])
    group = next(g for g in optimizer.param_groups if g["name"] == DISCRIMINATOR_GROUP)
    assert float(optimizer.state[group["params"][0]]["step"]) == EQ_STEPS - EQ_GAN_START


# --------------------------------------------------------------------------- a run from the latent stage
FT_STEPS = 24


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory) -> Path:
    """Two sample photos at 128x128: training crops and validation crops are the whole images."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("grace_hopper", "motorcycle_right"):
        ImageOps.fit(Image.open(sample_photo_paths()[name]).convert("RGB"), (128, 128)).save(folder / f"{name}.png")
    return folder


def _photo_data(folder: Path) -> list[str]:
    return ["data=folder", f"data.root={folder}", f"data.val_root={folder}", "data.val_fraction=0",
            "data.crop_size=128", "data.val_crop_size=128", "data.num_workers=0", "data.repeat=8"]


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_validation_end(self, trainer, pl_module) -> None:
        self.metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


@pytest.fixture(scope="module")
def finetune_run(latent_ckpt, small_photos, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finetune")
    cfg = compose(BASE + _photo_data(small_photos) + [
        f"run_dir={run_dir}", f"init_from={latent_ckpt}", "trainer.logger=none", f"trainer.max_steps={FT_STEPS}",
        f"stage.val_every_n_steps={FT_STEPS}", f"stage.checkpoint_every_n_steps={FT_STEPS}", "stage.lr=1e-3",
        "stage.warmup_steps=1", "stage.disc_warmup_steps=1", "stage.gan_start_step=4", "stage.ema_decay=0.5",
        # The tiny preset's VAE is random: the reference weights (latent 1.0, LPIPS 0.625) let the
        # latent term and a random-backbone LPIPS dominate; the pixel term leads here.
        "stage.latent_weight=0.05", "stage.lpips_weight=0.05"])
    probe = Probe()
    with pytest.MonkeyPatch.context() as monkeypatch:
        original = FinetuneStage.stage_callbacks
        monkeypatch.setattr(FinetuneStage, "stage_callbacks", lambda self: original(self) + [probe])
        result = pipeline.run(cfg)[0]
    return cfg, result, probe.metrics


def _val_pixel_l1(cfg, ckpt: Path) -> float:
    """Pixel L1 on the validation images of ``ckpt``'s codec + generator, decoded by the frozen VAE."""
    stage = build_stage(cfg, cfg.stage)
    pipeline.load_init_weights(stage, ckpt, cfg)
    stage.eval()
    datamodule = build_datamodule(cfg.data, seed=int(cfg.seed))
    datamodule.setup("fit")
    total, count = 0.0, 0
    with torch.no_grad():
        for x in datamodule.val_dataloader():
            total += F.l1_loss(stage.reconstruct(x), x, reduction="sum").item() / x[0].numel()
            count += x.shape[0]
    return total / count


def test_finetune_lowers_pixel_l1_below_the_latent_checkpoint(finetune_run, latent_ckpt):
    cfg, result, _ = finetune_run
    assert result.global_step == FT_STEPS
    latent_l1, finetuned_l1 = _val_pixel_l1(cfg, latent_ckpt), _val_pixel_l1(cfg, result.final_ckpt)
    print(f"val pixel L1: latent checkpoint {latent_l1:.4f} -> finetuned {finetuned_l1:.4f}")
    assert finetuned_l1 < latent_l1 - 0.005, (latent_l1, finetuned_l1)
    history = json.loads((result.run_dir / "val_history.json").read_text())
    # The step-0 validation is the latent checkpoint decoded the same way; the last is final.ckpt (EMA).
    assert history[0]["pixel_l1"] == pytest.approx(latent_l1, abs=1e-5)
    assert history[-1]["pixel_l1"] == pytest.approx(finetuned_l1, abs=1e-5)


def test_finetune_logs_gan_metrics_and_saves_the_critic(finetune_run):
    _, result, metrics = finetune_run
    for key in ("train/g_adv", "train/d_loss", "train/d_real_acc", "train/d_fake_acc", "train/pixel", "train/lpips",
                "val/d_real_acc", "val/d_fake_acc", "val/pixel_l1", "val/psnr", "val/loss"):
        assert key in metrics, key
    assert 0.0 <= metrics["train/d_real_acc"] <= 1.0 and metrics["train/gan_weight"] == pytest.approx(1e-3)
    state = torch.load(result.final_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("discriminator.") for k in state) and not any("lpips" in k for k in state)


# --------------------------------------------------------------------------- DDP and DeepSpeed
@pytest.mark.slow
def test_finetune_under_ddp_with_two_cpu_processes(latent_ckpt, tmp_path, free_master_port):
    args = ["model=tiny_random", "stage=finetune", f"init_from={latent_ckpt}", "trainer=ddp", "trainer.devices=2", f"run_dir={tmp_path}",
            "trainer.logger=none", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128", "data.val_crop_size=128",
            "trainer.max_steps=3", "stage.gan_start_step=1", "stage.val_every_n_steps=3",
            "stage.checkpoint_every_n_steps=3", "stage.lpips.random_backbone=true", "stage.image_every_n_steps=null",
            "discriminator=patchgan", "discriminator.channels=16"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdir = tmp_path / "finetune"
    assert json.loads((sdir / "DONE.json").read_text())["global_step"] == 3
    last = torch.load(sdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3
    final = torch.load(sdir / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    init = torch.load(latent_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.equal(final["generator.to_xt.weight"], init["generator.to_xt.weight"])
    assert "discriminator.net.0.weight" in final
    assert [e["step"] for e in json.loads((sdir / "val_history.json").read_text())] == [0, 3]



class OptimizerProbe(pl.Callback):
    """Critic weights at each step's start; Adam step counts per group after each step."""

    def __init__(self) -> None:
        self.critic_at_step: list[dict[str, torch.Tensor]] = []
        self.adam_steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.critic_at_step.append(_critic_state(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        optimizer = _base_optimizer(trainer.optimizers[0])
        self.adam_steps.append({g["name"]: float(optimizer.state[g["params"][0]]["step"]) for g in optimizer.param_groups})


@pytest.mark.slow
def test_finetune_under_deepspeed_zero2_on_cpu(latent_ckpt, tmp_path, isolated_distributed, monkeypatch):
    from deepspeed_cpu import CPUDeepSpeedStrategy

    cfg = compose(BASE + [f"run_dir={tmp_path}", "trainer.logger=none", "trainer.max_steps=3", "stage.gan_start_step=1",
                          "stage.val_every_n_steps=3", "stage.checkpoint_every_n_steps=3", "data.val_crop_size=128",
                          "stage.ema_decay=0.5"])
    probe = OptimizerProbe()
    original = FinetuneStage.stage_callbacks
    monkeypatch.setattr(FinetuneStage, "stage_callbacks", lambda self: original(self) + [probe])
    result = pipeline.run_stage(cfg, cfg.stage, init_from=latent_ckpt, strategy=CPUDeepSpeedStrategy(stage=2))

    assert result.global_step == 3
    assert json.loads((result.run_dir / "DONE.json").read_text())["global_step"] == 3
    # ZeRO turns the idle critic's missing gradients into zeros; lr 0 and weight decay 0 keep it still,
    # and its Adam state restarts at gan_start_step (flat ZeRO partitions: one state per group).
    for key, value in probe.critic_at_step[0].items():
        assert torch.equal(probe.critic_at_step[1][key], value), key
    assert probe.adam_steps == [{"generator": 1.0, DISCRIMINATOR_GROUP: 1.0}, {"generator": 2.0, DISCRIMINATOR_GROUP: 1.0},
                                {"generator": 3.0, DISCRIMINATOR_GROUP: 2.0}]
    # Checkpoints are DeepSpeed folders; the pipeline converts them for the next stage.
    assert result.final_ckpt.is_dir() and (result.run_dir / "checkpoints" / "last.ckpt").is_dir()
    converted = pipeline.read_checkpoint(result.final_ckpt)
    state = converted["state_dict"]
    assert converted["onedc"]["stage"] == "finetune"
    assert any(k.startswith("discriminator.") for k in state) and "generator.to_xt.weight" in state
    assert not torch.equal(state["discriminator.conv_in.weight"], probe.critic_at_step[0]["conv_in.weight"])
