"""Stage 2 (`latent`) end to end on the tiny preset: init from a real distill run, train, EMA, resume."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from onedc.training import pipeline
from onedc.training.build import build_stage
from onedc.callbacks import EMACallback
from onedc.coding.checkpoints import read_full_checkpoint
from onedc.training.config import compose
from onedc.errors import CheckpointError
from onedc.stages.latent import LatentStage

# The default preset (quick-trained VAE, generator started from the codec's light reconstruction).
SMALL = ["model=tiny", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128"]
DISTILL_STEPS = 60
DISTILL = SMALL + ["stage=distill", f"trainer.max_steps={DISTILL_STEPS}", f"stage.val_every_n_steps={DISTILL_STEPS}",
                   f"stage.checkpoint_every_n_steps={DISTILL_STEPS}", "trainer.logger=none"]
LATENT_STEPS = 96
LATENT = SMALL + ["stage=latent", f"trainer.max_steps={LATENT_STEPS}", "stage.val_every_n_steps=48",
                  f"stage.checkpoint_every_n_steps={LATENT_STEPS}", "stage.lr=5e-4", "stage.warmup_steps=1",
                  "stage.ema_decay=0.5", "stage.image_every_n_steps=48"]


def _codec_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items() if k.startswith("codec.")}


def _generator_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"generator.{k}": v.detach().clone() for k, v in module.generator.state_dict().items()}


class Probe(pl.Callback):
    """Records what the pipeline's own trainer sees: weights at the start/end, losses, the EMA."""

    def __init__(self) -> None:
        self.records: dict = {"val": []}

    @torch.no_grad()
    def on_train_start(self, trainer, pl_module) -> None:
        self.records["codec_start"] = _codec_state(pl_module.state_dict())
        self.records["generator_start"] = _generator_state(pl_module)
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMACallback))
        self.records["shadow_start"] = {k: v.clone() for k, v in ema.shadow.items()}
        pl_module.eval()
        with torch.random.fork_rng(devices=[]):  # leave the run's RNG stream as it would be
            batches = [x.to(pl_module.device) for x in trainer.datamodule.val_dataloader()]
        self.records["val_start"] = torch.stack([pl_module.losses(x)[0]["latent_loss"] for x in batches]).mean().item()
        # MSE of always predicting a zero latent: the bar a generator that uses its input must beat.
        self.records["val_zero"] = torch.stack([pl_module.vae.encode(x).square().mean() for x in batches]).mean().item()
        pl_module.train()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.records["val"].append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_end(self, trainer, pl_module) -> None:  # runs after the EMA copied its weights in
        self.records["codec_end"] = _codec_state(pl_module.state_dict())
        self.records["generator_end"] = _generator_state(pl_module)


def _run_with_probe(monkeypatch, cfg) -> tuple[Probe, list]:
    probe = Probe()
    original = LatentStage.stage_callbacks
    monkeypatch.setattr(LatentStage, "stage_callbacks", lambda self: original(self) + [probe])
    return probe, pipeline.run(cfg)


@pytest.fixture(scope="module")
def distill_ckpt(tmp_path_factory):
    """final.ckpt of a short distill run on the default preset: a light latent head worth starting from."""
    run_dir = tmp_path_factory.mktemp("distill-tiny")
    return pipeline.run(compose(DISTILL + [f"run_dir={run_dir}"]))[0].final_ckpt


@pytest.fixture(scope="module")
def latent_run(distill_ckpt, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("latent")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cfg = compose(LATENT + [f"run_dir={run_dir}", f"init_from={distill_ckpt}", "trainer.logger=tensorboard"])
        probe, results = _run_with_probe(monkeypatch, cfg)
    return probe.records, results[0], run_dir


def test_codec_starts_from_distill_and_stays_frozen(distill_ckpt, latent_run):
    records, result, _ = latent_run
    distill = _codec_state(torch.load(distill_ckpt, map_location="cpu", weights_only=False)["state_dict"])
    assert result.global_step == LATENT_STEPS
    assert set(records["codec_start"]) == set(distill)
    for key, value in distill.items():
        assert torch.equal(records["codec_start"][key], value), key
        assert torch.equal(records["codec_end"][key], value), key
    # final.ckpt is trainable-only: it names the frozen codec by its source (the distill file) and the reader
    # puts the distill weights back.
    stored = torch.load(result.final_ckpt, map_location="cpu", weights_only=False)
    assert stored["onedc"]["frozen"]["codec"]["source"] == f"init_from:{Path(distill_ckpt).resolve()}"
    assert not any(k in stored["state_dict"] for k in stored["onedc"]["frozen"]["codec"]["keys"])
    final = read_full_checkpoint(result.final_ckpt)["state_dict"]
    assert all(torch.equal(final[k], v) for k, v in distill.items())


def test_validation_latent_loss_keeps_its_start_and_beats_zero(latent_run):
    """The generator starts at the codec's light latent reconstruction (model.generator.init:
    residual), keeps it through training, and ends far below the zero predictor on the held-out
    photos.

    Spread (benchmarks/learning_spread.py --figures latent; native AVX2 and ATEN default +
    oneDNN SSE4.1 kernels, seeds 0 and 1, each kernel set with its own quick-trained VAE and
    teacher):
    - start / zero predictor 0.38 .. 0.49: the light head of the 60-step distill run;
    - end / start 0.998, 0.897, 0.885, 0.809 (mean 0.897, sd 0.078): 96 steps improve on the
      start by 0 .. 19 %, so a drop is not asserted; the bar of 1.15 (3.2 sd above the mean)
      catches a stage that wrecks its start (a random UNet at T = 999 starts 30-50 x worse);
    - end / zero predictor 0.34 .. 0.42 (mean 0.39, sd 0.034; bar 0.6, 6 sd above the mean).
    The same runs on 256 px centre crops of the five training photos: end / start 0.74 .. 0.97
    (mean 0.87, sd 0.096), no more robust a drop. Before the residual start, 24 steps from a
    random UNet ended at 1.1 x the zero predictor. That the stage trains at all is asserted on
    the weights: the generator moved from its start.
    """
    records, _, _ = latent_run
    moved = [k for k, v in records["generator_start"].items() if not torch.equal(v, records["generator_end"][k])]
    assert len(moved) > len(records["generator_start"]) // 2, moved
    end = records["val"][-1]
    assert end["val/latent_loss"] < 1.15 * records["val_start"], (records["val_start"], records["val"])
    assert end["val/latent_loss"] < 0.6 * records["val_zero"], (records["val_zero"], records["val"])
    assert torch.isfinite(torch.tensor([end["val/psnr"], end["val/bpp"]])).all()


def test_final_checkpoint_holds_the_ema_weights(latent_run):
    records, result, run_dir = latent_run
    final = torch.load(result.final_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    last = torch.load(run_dir / "latent" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    raw = last["ema"]["training_weights"]
    assert set(raw) == {k for k in final if k.startswith("generator.")}  # no LoRA: every weight trains
    for key in raw:
        # final.ckpt and last.ckpt's state_dict both hold the EMA; the raw weights differ from it.
        assert torch.equal(final[key], records["generator_end"][key])
        assert torch.equal(last["state_dict"][key], final[key])
    assert any(not torch.equal(raw[k], final[k]) for k in raw)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "latent" / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("images/reconstruction")] == [48, 96]


def test_resume_restores_ema_and_training_weights(latent_run, distill_ckpt, monkeypatch):
    _, result, run_dir = latent_run
    last = torch.load(run_dir / "latent" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (run_dir / "latent" / pipeline.DONE_MARKER).unlink()
    cfg = compose(LATENT + [f"run_dir={run_dir}", f"trainer.max_steps={LATENT_STEPS + 1}",
                            "trainer.logger=none", "stage.val_every_n_steps=100"])
    probe, results = _run_with_probe(monkeypatch, cfg)
    assert results[0].global_step == LATENT_STEPS + 1
    for key, raw in last["ema"]["training_weights"].items():
        assert torch.equal(probe.records["generator_start"][key], raw), key
        assert torch.equal(probe.records["shadow_start"][key], last["state_dict"][key]), key


def test_init_reports_missing_and_unexpected_keys(distill_ckpt, tmp_path, caplog):
    checkpoint = torch.load(distill_ckpt, map_location="cpu", weights_only=False)
    removed = "codec.h_sem.0.weight"
    del checkpoint["state_dict"][removed]
    checkpoint["state_dict"]["codec.extra_head.weight"] = torch.zeros(3)
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    cfg = compose(LATENT + [f"run_dir={tmp_path}", "trainer.logger=none"])
    module = build_stage(cfg, cfg.stage)
    with caplog.at_level(logging.WARNING, logger="onedc"):
        report = pipeline.load_init_weights(module, edited, cfg)
    assert report["missing"] == [removed] and report["unexpected"] == ["codec.extra_head.weight"]
    assert removed in caplog.text and "codec.extra_head.weight" in caplog.text
    assert torch.equal(module.state_dict()["codec.h_a.0.weight"], checkpoint["state_dict"]["codec.h_a.0.weight"])

    # A frozen codec stays in eval (exact rounding) when Lightning switches the module to train.
    module.train()
    assert not module.codec.training and module.generator.training
    assert not any(p.requires_grad for p in module.codec.parameters())


def test_checkpoint_from_another_model_config_is_refused(distill_ckpt, tmp_path):
    cfg = compose(LATENT + [f"run_dir={tmp_path}", f"init_from={distill_ckpt}", "model.codec.y_channels=16",
                            "trainer.logger=none"])
    with pytest.raises(CheckpointError, match="different model.codec.*y_channels"):
        pipeline.run(cfg)


def test_trainable_codec_adds_the_rate_term(tmp_path):
    cfg = compose(LATENT + [f"run_dir={tmp_path}", "trainer.logger=none", "stage.train_codec=true", "stage.lmbda=3.0"])
    module = build_stage(cfg, cfg.stage).train()
    assert module.codec.training and not module.codec.to_latent.weight.requires_grad
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(module.codec.g_s[0].weight) in optimised and id(module.codec.to_latent.weight) not in optimised
    metrics, _ = module.losses(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert torch.allclose(metrics["loss"], metrics["latent_loss"] + 3.0 * metrics["bpp"])
    metrics["loss"].backward()
    assert module.codec.g_a_y[1].weight.grad is not None  # the rate and latent terms reach the encoder
