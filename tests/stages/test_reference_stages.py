"""The published OneDC trains: `stage=latent` / `stage=finetune` with `init_from=` an imported release.

A small-width release in the authors' layout is imported with the real importer (the fixture of
tests/bitstream/test_reference_bundle.py), then trained a few steps through ``pipeline.run``
with ``model=onedc_sd15`` at that width. The reference recipe (REFERENCE.md §10.2): the codec is
frozen, the generator trains its LoRA, the new conv_in and vae_reduction; the VAE comes from
the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import DictConfig, open_dict

from onedc import pipeline
from onedc.build import build_stage
from onedc.cli import main
from onedc.config import compose
from onedc.datamodules import load_image, sample_photo_paths
from onedc.errors import ConfigError, WeightsError
from onedc.stages.latent import LatentStage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bitstream"))
from test_reference_bundle import imported, small_model_config  # noqa: E402,F401  (the small release + its import)

FAST = ["trainer.enable_progress_bar=false", "trainer.logger=none", "data.batch_size=2", "data.crop_size=128"]
LATENT_STEPS = 4
LATENT = ["stage=latent", f"trainer.max_steps={LATENT_STEPS}", "stage.val_every_n_steps=2",
          "stage.checkpoint_every_n_steps=2", "stage.lr=2e-3", "stage.warmup_steps=1", "stage.ema_decay=0.5",
          "stage.image_every_n_steps=null"]


def reference_cfg(overrides: list[str], run_dir: Path, init_from: Path | None) -> DictConfig:
    """``model=onedc_sd15`` at the width of the small release (the model node the import stored)."""
    extra = [f"init_from={init_from}"] if init_from is not None else []
    cfg = compose(["model=onedc_sd15", *FAST, *overrides, f"run_dir={run_dir}", *extra])
    with open_dict(cfg):
        cfg.model = small_model_config()
    return cfg


def trainable(key: str) -> bool:
    """The generator keys the reference trains (§10.2): LoRA A/B, the new conv_in, vae_reduction (to_xt)."""
    return ".lora_" in key or key.startswith(("generator.unet.conv_in.", "generator.to_xt."))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class StartWeights(pl.Callback):
    """Records the generator's trainable weights when training starts (after any resume)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {f"generator.{k}": p.detach().clone() for k, p in pl_module.generator.named_parameters()
                        if p.requires_grad}


@pytest.fixture(scope="module")
def latent_run(imported, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference-latent")
    result = pipeline.run(reference_cfg(LATENT, run_dir, imported))[0]
    return result, run_dir


def test_latent_trains_only_the_lora_conv_in_and_vae_reduction(imported, latent_run):
    result, run_dir = latent_run
    assert result.global_step == LATENT_STEPS
    start, final = _state(imported), _state(result.final_ckpt)
    raw = torch.load(run_dir / "latent" / "checkpoints" / "last.ckpt", map_location="cpu",
                     weights_only=False)["ema"]["training_weights"]
    assert set(final) == set(start)
    assert set(raw) == {k for k in start if trainable(k)} and any(".lora_A." in k for k in raw)
    for key, value in start.items():
        if key in raw:
            assert not torch.equal(raw[key], value), key  # every trained tensor moved (AdamW)
        else:  # codec, VAE and the UNet base weights: bit for bit the imported ones
            assert torch.equal(final[key], value), key


def test_resume_continues_from_the_last_checkpoint(imported, latent_run, monkeypatch):
    _, run_dir = latent_run
    last = torch.load(run_dir / "latent" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (run_dir / "latent" / pipeline.DONE_MARKER).unlink()
    probe = StartWeights()
    original = LatentStage.stage_callbacks
    monkeypatch.setattr(LatentStage, "stage_callbacks", lambda self: original(self) + [probe])
    cfg = reference_cfg(LATENT + [f"trainer.max_steps={LATENT_STEPS + 2}"], run_dir, imported)
    result = pipeline.run(cfg)[0]
    assert result.global_step == LATENT_STEPS + 2
    assert set(probe.weights) == set(last["ema"]["training_weights"])
    for key, value in last["ema"]["training_weights"].items():
        assert torch.equal(probe.weights[key], value), key  # resumed, not re-initialised from init_from


def test_trained_checkpoint_codes_files_with_the_cli(latent_run, tmp_path):
    from PIL import Image

    result, _ = latent_run
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    crop = load_image(sample_photo_paths()["coffee"])[:, :64, :100]
    Image.fromarray(((crop + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(src)
    ckpt = str(result.final_ckpt)
    assert main(["compress", str(src), "-o", str(tmp_path / "bits"), "--ckpt", ckpt]) == 0
    assert main(["decompress", str(tmp_path / "bits" / "a.onedc"), "-o", str(tmp_path / "out"), "--ckpt", ckpt]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (100, 64)
