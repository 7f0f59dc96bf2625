"""The pixel loss of the paper's stage I in the fused distill stage (docs/reference-model.md §10.1).

``model=onedc_sd15`` at test width (the small release's model node), random weights, the VGG LPIPS
(piq's, average pooling) with a random backbone: v̂ from the generator is decoded by the frozen
VAE with gradients flowing back through its decoder, and the loss is
λ·bpp + L_distill + L1(x̂₀₁, x₀₁) + LPIPS(x̂₀₁, x₀₁), x₀₁ = x·0.5 + 0.5.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from onedc.datamodules import load_image, sample_photo_paths
from onedc.training.build import build_stage
from onedc.training.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bitstream"))
from test_reference_bundle import small_model_config  # noqa: E402

PAPER_LOSS = ["stage.pixel_weight=1.0", "stage.lpips_weight=1.0", "stage.latent_weight=0.0",
              "stage.lpips.backbone=vgg", "stage.lpips.random_backbone=true"]


def _stage(tmp_path: Path, overrides: list[str], model: str = "onedc_sd15"):
    cfg = compose([f"model={model}", "stage=distill", "tokenizer=vq_tiny", "tokenizer.pretrained=null",
                   "stage.lmbda=2.0", "stage.lmbda_warmup_steps=0", f"run_dir={tmp_path}", *overrides])
    if model == "onedc_sd15":
        with open_dict(cfg):
            cfg.model = small_model_config()
    return build_stage(cfg, cfg.stage).train()


def _photos() -> torch.Tensor:
    photos = sample_photo_paths()
    return torch.stack([load_image(photos[name])[:, :128, :128] for name in ("astronaut", "chelsea")])


def _recording_decode(monkeypatch, vae) -> list[torch.Tensor]:
    decoded: list[torch.Tensor] = []
    original = vae.decode

    def decode(v):
        decoded.append(original(v))
        return decoded[-1]

    monkeypatch.setattr(vae, "decode", decode)
    return decoded


@pytest.fixture(scope="module")
def paper_stage(tmp_path_factory):
    return _stage(tmp_path_factory.mktemp("distill-pixel"), PAPER_LOSS)


def test_the_loss_adds_l1_and_lpips_of_the_decoded_image_on_0_1_values(paper_stage, monkeypatch):
    stage, x = paper_stage, _photos()
    decoded = _recording_decode(monkeypatch, stage.vae)
    torch.manual_seed(0)
    metrics = stage._step(x)
    assert len(decoded) == 1 and decoded[0].shape == x.shape
    x_hat = decoded[0]
    with torch.no_grad():
        l1_01 = F.l1_loss(x_hat * 0.5 + 0.5, x * 0.5 + 0.5)
        lpips = stage.__dict__["perceptual"](x_hat, x).mean()
    torch.testing.assert_close(metrics["pixel_l1"].detach(), l1_01)
    torch.testing.assert_close(metrics["pixel_l1"].detach(), 0.5 * F.l1_loss(x_hat, x).detach())  # not [-1, 1]'s
    torch.testing.assert_close(metrics["lpips"].detach(), lpips)
    want = 2.0 * metrics["bpp"] + metrics["distill"] + metrics["pixel_l1"] + metrics["lpips"]  # latent_weight 0
    torch.testing.assert_close(metrics["loss"], want)
    assert metrics["latent_mse"] > 0 and metrics["lpips"] > 0  # measured, not trained on


def test_pixel_gradients_reach_the_generator_and_the_codec_through_the_frozen_decoder(paper_stage):
    stage = paper_stage
    stage.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    metrics = stage._step(_photos())
    (metrics["pixel_l1"] + metrics["lpips"]).backward()  # only the pixel terms: no latent MSE, no rate
    lora = [p for name, p in stage.generator.named_parameters() if ".lora_B." in name]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert stage.codec.enc.pix_emb.weight.grad.abs().sum() > 0  # through the generator's input
    assert all(p.grad is None for p in stage.vae.parameters()) and not any(p.requires_grad for p in stage.vae.parameters())
    stage.zero_grad(set_to_none=True)


def test_the_vae_decoder_is_checkpointed_with_the_same_gradients(paper_stage):
    """diffusers' gradient checkpointing: the decoder's up blocks run again in backward; gradients agree
    (measured: bit-identical, native and ATEN default + oneDNN SSE4.1 kernels; the bar 1e-4 of each tensor's
    largest gradient leaves room for kernels that reorder sums)."""
    stage, x = paper_stage, _photos()
    decoder = stage.vae.autoencoder.decoder
    calls = []
    hook = decoder.up_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))  # recomputation may stop early

    def grads() -> dict[str, torch.Tensor]:
        stage.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        metrics = stage._step(x)
        metrics["loss"].backward()
        return {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}

    try:
        assert decoder.gradient_checkpointing
        checkpointed, runs_checkpointed = grads(), len(calls)
        stage.vae.autoencoder.disable_gradient_checkpointing()
        calls.clear()
        plain, runs_plain = grads(), len(calls)
    finally:
        hook.remove()
        stage.vae.autoencoder.enable_gradient_checkpointing()
        stage.zero_grad(set_to_none=True)
    assert (runs_checkpointed, runs_plain) == (2, 1)
    assert checkpointed.keys() == plain.keys() and any(k.startswith("generator.") for k in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=name)


def test_by_default_nothing_is_decoded(tmp_path, monkeypatch):
    stage = _stage(tmp_path, [], model="tiny_random")
    decoded = _recording_decode(monkeypatch, stage.vae)
    metrics = stage._step(_photos()[:, :, :64, :64])
    assert not decoded and "pixel_l1" not in metrics and "lpips" not in metrics
    assert not stage.vae.autoencoder.decoder.gradient_checkpointing and stage.__dict__["perceptual"] is None
    with pytest.raises(ValueError, match="exactly when lpips_weight > 0"):
        type(stage)(family=stage.family, vae=stage.vae, codec=stage.codec, teacher=stage.__dict__["teacher"],
                    distill=stage.distill, optimizer=stage.optimizer_spec, identity=stage.identity, lpips_weight=1.0)


class _Weights(pl.Callback):
    """The generator's LoRA B weights at the start of training and after each optimiser step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def _record(self, module) -> None:
        self.seen.append({n: p.detach().clone() for n, p in module.generator.named_parameters() if ".lora_B." in n})

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)


def test_a_paper_stage_one_run_validates_on_pixels_and_its_step_zero_moves_nothing(tmp_path, monkeypatch):
    """Through Lightning: diffusers' constant_with_warmup gives lr 0 at step 0, so AdamW (weight decay
    included) leaves every weight as it was, and step 1 moves them; validation reports the pixel terms."""
    import json

    from onedc.stages.distill import DistillStage
    from onedc.training import pipeline

    cfg = compose(["model=onedc_sd15", "stage=distill", "tokenizer=vq_tiny", "tokenizer.pretrained=null",
                   "trainer.enable_progress_bar=false", "trainer.logger=none", "data.batch_size=2",
                   "data.crop_size=128", "data.val_crop_size=128", "trainer.max_steps=2", "stage.val_every_n_steps=2",
                   "stage.checkpoint_every_n_steps=2", "stage.warmup_start=zero", "stage.warmup_steps=2",
                   *PAPER_LOSS, f"run_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.model = small_model_config()
    probe = _Weights()
    monkeypatch.setattr(DistillStage, "stage_callbacks", lambda self: [probe])
    result = pipeline.run(cfg)[0]
    assert result.global_step == 2 and len(probe.seen) == 3
    start, after_step0, after_step1 = probe.seen
    assert all(torch.equal(after_step0[k], start[k]) for k in start)
    assert all(not torch.equal(after_step1[k], start[k]) for k in start)
    history = json.loads((result.run_dir / "val_history.json").read_text())
    assert all(entry["pixel_l1"] > 0 and entry["lpips"] > 0 for entry in history)
