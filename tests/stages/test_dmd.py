"""Stage ``dmd`` (the paper's stage II, DMD2): what its update does, its 10:1 schedule, its equality with a
plain two-optimizer loop, DeepSpeed on the CPU, and a smoke run of the pipeline on the tiny preset."""
from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from onedc.coding.checkpoints import read_full_checkpoint
from onedc.stages.dmd import GENERATOR_GROUP, GUIDANCE_GROUP, DMDStage, _base_optimizer, split_batch
from onedc.training import pipeline
from onedc.training.build import build_stage
from onedc.training.config import compose

BASE = ["model=tiny_random", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128",
        "stage=dmd", "stage.lpips.random_backbone=true", "stage.image_every_n_steps=null", "trainer.logger=none"]


def _stage(*overrides: str) -> DMDStage:
    cfg = compose(BASE + list(overrides))
    return build_stage(cfg, cfg.stage)


def _batches(steps: int, seed: int = 7) -> torch.Tensor:
    return torch.rand(steps, 2, 3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _trainer(steps: int, clip: float | None = None, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))


def _trainable(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad and n.startswith(prefix)}


class Snapshots(pl.Callback):
    """Trainable generator and guidance parameters at the start of every step, seeded draws per step."""

    def __init__(self) -> None:
        self.generator: list[dict[str, torch.Tensor]] = []
        self.guidance: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.generator.append(_trainable(pl_module, "generator."))
        self.guidance.append(_trainable(pl_module, "guidance."))
        torch.manual_seed(1000 + trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.on_train_batch_start(trainer, pl_module, None, -1)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- batches and captions
def test_batches_may_be_tensors_or_dicts_with_captions():
    x = torch.zeros(2, 3, 8, 8)
    assert split_batch(x) == (x, None)
    images, captions = split_batch({"image": x, "caption": ["a cat", "a dog"]})
    assert images is x and captions == ["a cat", "a dog"]
    stage = _stage("stage.captions=batch")
    text, uncond = stage.text_embeddings(2, ["a cat", "a dog"])
    assert not torch.equal(text[0], text[1]) and torch.equal(uncond[0], uncond[1])
    assert torch.equal(uncond[0], stage.__dict__["text"]([""])[0])
    with pytest.raises(ValueError, match="captions=batch"):
        stage.text_embeddings(2, None)
    empty = _stage()  # captions=empty: the text embedding is the unconditional one
    text, uncond = empty.text_embeddings(2, ["ignored", "ignored"])
    assert torch.equal(text, uncond)


# --------------------------------------------------------------------------- the DM update's direction
def test_one_dmd_step_moves_the_samples_toward_the_real_score():
    """Synthetic scores with known x0: the real one denoises everything to μ, the fake one to ν. The DM
    direction is then ∝ ν − μ, so one generator step must move its samples toward μ along μ − ν."""
    stage = _stage("stage.generator_every=1", "stage.lr=1e-5", "stage.warmup_steps=1", "stage.gan_weight=0",
                   "stage.pixel_weight=0", "stage.lpips_weight=0", "stage.guidance_lr=0", "stage.grad_clip=null")
    guidance = stage.guidance
    mu, nu = torch.full((1, 4, 1, 1), 1.5), torch.full((1, 4, 1, 1), -0.5)
    mu[:, 1], nu[:, 1] = -1.0, 0.5

    def towards(target):
        def epsilon(noisy, timesteps, *_):
            a = guidance.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
            return (noisy - a.sqrt() * target) / (1 - a).sqrt()
        return epsilon

    guidance.real_epsilon = towards(mu)
    guidance.fake_epsilon = towards(nu)
    x = _batches(1)[0]
    stage.train()
    with torch.no_grad():
        before = stage.generate(x)[0]
    trainer = _trainer(1)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(x[None], batch_size=None))
    with torch.no_grad():
        after = stage.generate(x)[0]
    moved = (after - before).mean(dim=(0, 2, 3))
    direction = (mu - nu).flatten()
    cosine = F.cosine_similarity(moved, direction, dim=0).item()
    print(f"mean move per channel {moved.tolist()}, cosine with mu - nu {cosine:.3f}")
    assert cosine > 0.9
    assert (after - mu).pow(2).mean() < (before - mu).pow(2).mean()


# --------------------------------------------------------------------------- the fake score learns
def test_the_fake_denoising_loss_falls_over_training():
    stage = _stage("stage.generator_every=1000", "stage.guidance_lr=1e-3", "stage.guidance_warmup_steps=1",
                   "stage.guidance_cls_weight=0")
    x = _batches(1)[0]
    gen = torch.Generator().manual_seed(3)

    def fake_loss() -> float:
        gen.manual_seed(3)
        with torch.no_grad():
            latent = stage.generate(x)[0]
            losses = [stage.guidance.fake_denoising_loss(latent, stage.text_embeddings(2, None)[0],
                                                         **stage.draw(latent, (0, 999), gen)._asdict()).item() for _ in range(8)]
        return sum(losses) / len(losses)

    before = fake_loss()
    trainer = _trainer(25)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(x[None].expand(25, -1, -1, -1, -1), batch_size=None))
    after = fake_loss()
    print(f"fake denoising loss {before:.4f} -> {after:.4f}")
    assert after < 0.85 * before, (before, after)  # measured 1.087 -> 0.798


# --------------------------------------------------------------------------- the 10:1 schedule
def test_under_ten_to_one_the_generator_moves_only_on_every_tenth_step():
    stage = _stage("stage.generator_every=10", "stage.lr=1e-3", "stage.warmup_steps=1", "stage.guidance_lr=1e-3",
                   "stage.guidance_warmup_steps=1")
    steps = 12
    snaps = Snapshots()
    trainer = _trainer(steps, clip=5.0, callbacks=[snaps])
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(_batches(steps), batch_size=None))
    assert trainer.global_step == steps  # one optimiser step per iteration: global_step counts iterations
    for step in range(steps):  # snapshot `step` is before iteration `step`, `step + 1` after it
        gen_same = _same(snaps.generator[step], snaps.generator[step + 1])
        assert gen_same == (step % 10 != 0), step  # moved on iterations 0 and 10 only, bitwise still otherwise
        assert not _same(snaps.guidance[step], snaps.guidance[step + 1]), step  # the guidance every iteration
    optimizer = _base_optimizer(trainer.optimizers[0])
    steps_of = {g["name"]: float(optimizer.state[g["params"][0]]["step"]) for g in optimizer.param_groups}
    assert steps_of == {GENERATOR_GROUP: 2.0, GUIDANCE_GROUP: float(steps)}
    assert stage.generator_updates() == 2
    # The real score never changes.
    assert all(not p.requires_grad for p in stage.guidance.real_unet.parameters())


# --------------------------------------------------------------------------- one optimizer = two optimizers
EQ_STEPS, EQ_EVERY, EQ_CLIP = 5, 2, 0.05
EQ = ["stage.generator_every=2", "stage.lr=1e-3", "stage.warmup_steps=2", "stage.guidance_lr=3e-3",
      "stage.guidance_betas=[0.5,0.9]", "stage.guidance_weight_decay=0.05", "stage.guidance_warmup_steps=3",
      "stage.lpips_weight=0.1", "stage.gan_weight=0.5", "stage.guidance_cls_weight=0.3"]


def _two_optimizer_loop(stage: DMDStage, batches: torch.Tensor) -> None:
    """DMD2's loop written plainly: two AdamW, both schedulers stepping every iteration; on a generator
    iteration a generator step (its loss against the guidance model before its update, guidance
    gradients discarded), then a guidance step on the image the generator made before its update."""
    spec, gspec = stage.optimizer_spec, stage.guidance_optimizer_spec
    guidance = stage.guidance
    g_params = [p for p in stage.generator.parameters() if p.requires_grad]
    d_params = [p for p in guidance.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(g_params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    opt_d = torch.optim.AdamW(d_params, lr=gspec.lr, betas=gspec.betas, weight_decay=gspec.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: min(1.0, (s + 1) / gspec.warmup_steps))
    perceptual = stage.__dict__["perceptual"]
    stage.train()
    for step, x in enumerate(batches):
        torch.manual_seed(1000 + step)
        uncond = stage.__dict__["text"]([""]).expand(x.shape[0], -1, -1)
        text = uncond
        v = stage.vae.encode(x)
        turn = step % EQ_EVERY == 0
        with torch.set_grad_enabled(turn):
            with torch.no_grad():
                out = stage.family.codec_pass(stage.codec, x, v)
            latent = stage.generator(out.features, out.tokens)
        if turn:
            t_dm, n_dm = torch.randint(20, 641, (2,)), torch.randn(latent.shape)
            t_g, n_g = torch.randint(0, 1000, (2,)), torch.randn(latent.shape)
            dm, _ = guidance.distribution_matching_loss(latent, text, uncond, timesteps=t_dm, noise=n_dm)
            g_adv = F.softplus(-guidance.realism_logits(latent, text, timesteps=t_g, noise=n_g)).mean()
            x_hat = stage.vae.decode(latent)
            loss_g = dm + stage.gan_weight * g_adv + stage.pixel_weight * F.l1_loss(x_hat, x) \
                + stage.lpips_weight * perceptual(x_hat, x).mean()
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(g_params, EQ_CLIP)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)  # DMD2 discards what the GAN term left on the guidance model
        sched_g.step()
        fake = latent.detach()
        t_f, n_f = torch.randint(0, 1000, (2,)), torch.randn(fake.shape)
        t_cf, n_cf = torch.randint(0, 1000, (2,)), torch.randn(fake.shape)
        t_cr, n_cr = torch.randint(0, 1000, (2,)), torch.randn(v.shape)
        loss_d = guidance.fake_denoising_loss(fake, text, timesteps=t_f, noise=n_f) + stage.guidance_cls_weight * (
            F.softplus(guidance.realism_logits(fake, text, timesteps=t_cf, noise=n_cf)).mean()
            + F.softplus(-guidance.realism_logits(v, text, timesteps=t_cr, noise=n_cr)).mean())
        loss_d.backward()
        torch.nn.utils.clip_grad_norm_(d_params, EQ_CLIP)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        sched_d.step()


def test_single_optimizer_step_equals_the_two_optimizer_loop():
    stage = _stage(*EQ)
    classic = copy.deepcopy(stage)
    classic.__dict__["perceptual"] = stage.__dict__["perceptual"]
    initial = _trainable(stage, "generator.")
    batches = _batches(EQ_STEPS, seed=9)
    trainer = _trainer(EQ_STEPS, clip=EQ_CLIP, callbacks=[Snapshots()])
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    _two_optimizer_loop(classic, batches)
    # Both schemes moved both nets by the same amounts (clipping was active: EQ_CLIP is small). The
    # tolerance only allows for another summation order; a joint clip, an Adam state that counts idle
    # steps or a GAN term that reaches the guidance model differ by far more.
    ours, theirs = dict(stage.named_parameters()), dict(classic.named_parameters())
    for name, param in ours.items():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs[name], rtol=0, atol=1e-7, msg=name)
    assert not _same(initial, _trainable(stage, "generator."))


# --------------------------------------------------------------------------- the pipeline: smoke run and DeepSpeed
SMOKE_STEPS = 4


def test_dmd_smoke_run_from_the_latent_stage(latent_ckpt, tmp_path):
    cfg = compose(BASE + [f"run_dir={tmp_path}", f"init_from={latent_ckpt}", f"trainer.max_steps={SMOKE_STEPS}",
                          "stage.generator_every=2", f"stage.val_every_n_steps={SMOKE_STEPS}",
                          f"stage.checkpoint_every_n_steps={SMOKE_STEPS}", "data.val_crop_size=128", "stage.lr=1e-4"])
    result = pipeline.run(cfg)[0]
    assert result.global_step == SMOKE_STEPS
    assert json.loads((result.run_dir / "DONE.json").read_text())["global_step"] == SMOKE_STEPS
    assert (result.run_dir / "checkpoints" / f"step={SMOKE_STEPS:06d}.ckpt").is_file()  # names count iterations
    history = json.loads((result.run_dir / "val_history.json").read_text())
    assert [e["step"] for e in history] == [0, SMOKE_STEPS] and "fake_loss" in history[-1]
    final = torch.load(result.final_ckpt, map_location="cpu", weights_only=False)
    assert final["onedc"]["stage"] == "dmd"
    # Trainable-only: the frozen codec is named by its source (the latent file) and read back from it (the latent
    # file names the distill file in turn).
    assert final["onedc"]["frozen"]["codec"]["source"] == f"init_from:{latent_ckpt.resolve()}"
    state = read_full_checkpoint(result.final_ckpt)["state_dict"]
    init = read_full_checkpoint(latent_ckpt)["state_dict"]
    assert not torch.equal(state["generator.to_xt.weight"], init["generator.to_xt.weight"])
    codec_keys = [k for k in init if k.startswith("codec.") and "gaussian_conditional" not in k]
    assert codec_keys and all(torch.equal(state[k], init[k]) for k in codec_keys)  # frozen codec
    assert any(k.startswith("guidance.fake_unet.") for k in state)
    # The result decodes like any generator checkpoint.
    from onedc.coding.bundle import OneDCCodec

    codec = OneDCCodec.from_checkpoint(result.final_ckpt)
    assert codec is not None



@pytest.mark.slow
def test_dmd_under_deepspeed_zero2_on_cpu(latent_ckpt, tmp_path, isolated_distributed, monkeypatch):
    from deepspeed_cpu import CPUDeepSpeedStrategy

    cfg = compose(BASE + [f"run_dir={tmp_path}", "trainer.max_steps=3", "stage.generator_every=2",
                          "stage.val_every_n_steps=3", "stage.checkpoint_every_n_steps=3", "data.val_crop_size=128",
                          "stage.lr=1e-3", "stage.warmup_steps=1", "stage.guidance_lr=1e-3",
                          "stage.guidance_warmup_steps=1"])
    snaps = Snapshots()
    original = DMDStage.stage_callbacks
    monkeypatch.setattr(DMDStage, "stage_callbacks", lambda self: original(self) + [snaps])
    result = pipeline.run_stage(cfg, cfg.stage, init_from=latent_ckpt, strategy=CPUDeepSpeedStrategy(stage=2))
    assert result.global_step == 3
    # ZeRO-2 flat partitions: the generator moved on iterations 0 and 2 and was bitwise still on 1.
    assert not _same(snaps.generator[0], snaps.generator[1])
    assert _same(snaps.generator[1], snaps.generator[2])
    assert not _same(snaps.generator[2], snaps.generator[3])
    assert all(not _same(snaps.guidance[i], snaps.guidance[i + 1]) for i in range(3))
    converted = pipeline.read_checkpoint(result.final_ckpt)
    assert converted["onedc"]["stage"] == "dmd" and "generator.to_xt.weight" in converted["state_dict"]
