"""Stage 2, ``latent``: latent-domain pretraining of the one-step generator (docs/architecture.md §3).

::

    x ─VAE─> v ─┐
    x ──────────┴─ codec (from stage 1; frozen unless train_codec) ─> (ŷ, ẑ) ─> R
                      └─ features (1/8), tokens ─ generator (ONE UNet step) ─> v̂
    loss = L_latent(v̂, v)  [+ λ·R when the codec trains],   L_latent = MSE | L1

The codec is initialised from the distill checkpoint (``init_from``). Frozen, it is in eval mode
(exact rounding, as at decode time), has no gradients and stays out of the optimiser; it is
kept in eval even when Lightning switches the module to training. An EMA of the generator
(:class:`onedc.callbacks.EMACallback`) is validated, checkpointed and exported in ``final.ckpt``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from onedc.callbacks import EMACallback, ImageGridCallback
from onedc.eval.pixels import psnr  # val/psnr: the 8-bit convention of onedc eval and rd/psnr
from onedc.modules.generator import OneStepGenerator
from onedc.modules.vae import FrozenVAE
from onedc.families import CodecPass, ModelFamily
from onedc.stages.common import ModelIdentity, OptimizerSpec, StageModule, batch_images, estimated_bpp, freeze

LATENT_LOSSES = ("mse", "l1")


class LatentStage(StageModule):
    """LightningModule of stage 2. Receives built modules; reads no config.

    Args:
        vae, codec, generator: the built modules (``codec`` already holds stage-1 weights when
            the pipeline initialised it): either codec family (driven through ``family``)
            and a :class:`OneStepGenerator`, whose trainable parameters (under LoRA: the adapter,
            the new conv_in and x_t head) are the ones the optimiser and the EMA see.
        optimizer: AdamW + warm-up spec for the trainable parameters.
        identity: what checkpoints record about the model.
        train_codec: train the codec too (rate term λ·R added) instead of freezing it.
        lmbda: rate weight λ (used only when the codec trains).
        latent_loss: ``mse`` or ``l1`` between the generated and the VAE latent.
        ema_decay: EMA decay of the generator (None: no EMA).
        image_every_n_steps: TensorBoard image-grid period (None: no grids).
    """

    summary_keys = ("latent_loss", "psnr", "bpp")

    def __init__(
        self,
        *,
        family: ModelFamily,
        vae: FrozenVAE,
        codec: nn.Module,
        generator: OneStepGenerator,
        optimizer: OptimizerSpec,
        identity: ModelIdentity,
        train_codec: bool = False,
        lmbda: float = 2.0,
        latent_loss: str = "mse",
        ema_decay: float | None = 0.999,
        image_every_n_steps: int | None = 100,
    ) -> None:
        super().__init__(identity, family)
        if latent_loss not in LATENT_LOSSES:
            raise ValueError(f"latent_loss must be one of {LATENT_LOSSES}, got '{latent_loss}'")
        self.vae = vae
        self.codec = codec
        self.generator = generator
        self.optimizer_spec = optimizer
        self.train_codec = bool(train_codec)
        self.lmbda = float(lmbda)
        self.latent_loss = latent_loss
        self.ema_decay = ema_decay
        self.image_every_n_steps = image_every_n_steps
        if self.train_codec:
            # Parts the family leaves idle here (the light codec's stage-1 latent head): frozen, so DDP sees no unused parameter.
            for part in family.idle_parts(codec, "latent", trains_generator=True):
                part.requires_grad_(False)
        else:
            freeze(self.codec)

    def train(self, mode: bool = True) -> "LatentStage":
        # Lightning calls .train() on the whole module; a frozen codec must keep eval-mode rounding.
        super().train(mode)
        if not self.train_codec:
            self.codec.eval()
        return self

    # ------------------------------------------------------------------ computation
    def generate(self, x: Tensor) -> tuple[Tensor, Tensor, CodecPass]:
        """Image in [-1,1] -> (generated latent v̂, VAE latent v, codec output)."""
        v = self.vae.encode(x)
        with torch.set_grad_enabled(self.train_codec and torch.is_grad_enabled()):
            out = self.family.codec_pass(self.codec, x, v)
        return self.generator(out.features, out.tokens), v, out

    def reconstruct(self, x: Tensor) -> Tensor:
        """Image in [-1,1] -> decoded image through codec, one-step generator and VAE decoder."""
        latent, _, _ = self.generate(x)
        return self.vae.decode(latent).clamp(-1, 1)

    def _distance(self, latent: Tensor, v: Tensor) -> Tensor:
        if self.latent_loss == "mse":
            return F.mse_loss(latent.float(), v)
        return F.l1_loss(latent.float(), v)

    def losses(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Image batch -> ({loss, latent_loss, bpp}, generated latent) with the current weights."""
        latent, v, out = self.generate(x)
        bpp = estimated_bpp(self.family, self.codec, out, x.shape[-2] * x.shape[-1]).mean()
        latent_loss = self._distance(latent, v)
        loss = latent_loss + self.lmbda * bpp if self.train_codec else latent_loss
        return {"loss": loss, "latent_loss": latent_loss, "bpp": bpp}, latent

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        batch = batch_images(batch)
        metrics, _ = self.losses(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in metrics.items()}, batch_size=batch.shape[0])
        self.log("latent", metrics["latent_loss"].detach(), prog_bar=True, logger=False, batch_size=batch.shape[0])
        return metrics["loss"]

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        batch = batch_images(batch)
        metrics, latent = self.losses(batch)
        metrics["psnr"] = psnr(self.vae.decode(latent), batch).mean()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=batch.shape[0], sync_dist=True)
        self.record_val(metrics, batch.shape[0])

    def configure_optimizers(self) -> Any:
        params = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("vae.")]
        optimizer = self.optimizer_spec.build(params)
        return {"optimizer": optimizer, "lr_scheduler": self.optimizer_spec.scheduler(optimizer)}

    def stage_callbacks(self) -> list[Callback]:
        """The stage's own callbacks, EMA then image grids; the pipeline places them after the RD
        evaluation (:func:`onedc.callbacks.training_callbacks`)."""
        callbacks: list[Callback] = []
        if self.ema_decay is not None:
            # A trained codec is averaged too: the EMA generator was fitted to a moving codec.
            modules = ("generator", "codec") if self.train_codec else ("generator",)
            callbacks.append(EMACallback(float(self.ema_decay), modules=modules))
        if self.image_every_n_steps:
            callbacks.append(ImageGridCallback(int(self.image_every_n_steps)))
        return callbacks
