"""Stage 1, ``distill``: semantic distillation + rate-distortion in the latent (docs/architecture.md §3).

::

    x ─VAE─> v ─┐
    x ──────────┴─ codec ─> (ŷ, ẑ) ─> R = bpp(ŷ) + bits(ẑ)
                           ├─ semantic(ẑ) ─ head ─> logits ~ teacher(x↓2).indices   (L_distill)
                           └─ g_s ─> v̂ ~ v                                           (latent MSE)
    loss = λ(t)·R + w_d·L_distill + w_v·MSE(v̂, v),   λ(t) quadratic warm-up

v̂ comes from the codec's light latent head (``latent_hat`` of the codec pass), or, when the
stage is given a ``generator``, from the one-step generator trained jointly with the codec: the
published OneDC has no light head and trains codec and generator together (docs/reference-model.md
§10.1, its stages 1 and 2 fused): its family ``distills_with_generator``, and its checkpoint
decodes through the generator.

The pixel loss of the paper's stage I (§10.1; off unless ``pixel_weight`` or ``lpips_weight`` is
set): v̂ is decoded by the frozen VAE with gradients flowing back through its decoder (optionally
with diffusers' gradient checkpointing), and::

    loss += w_px·L1(x̂₀₁, x₀₁) + w_lp·LPIPS(x̂₀₁, x₀₁),   x₀₁ = x·0.5 + 0.5

The recipe's loss is λ(t)·R + L_distill + L1 + LPIPS (``latent_weight`` 0, ``experiment=onedc_paper``).

The teacher is frozen and deliberately *not* a submodule: it is never in ``state_dict``, the
optimiser, or the DDP/DeepSpeed wrapper; it is moved to the stage's device on use.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onedc.modules.distill import SemanticDistillLoss
from onedc.modules.generator import OneStepGenerator
from onedc.modules.losses import PerceptualLoss
from onedc.modules.teachers import Teacher
from onedc.modules.vae import FrozenVAE
from onedc.families import ModelFamily
from onedc.stages.common import ModelIdentity, OptimizerSpec, StageModule, batch_images, estimated_bpp, quadratic_ramp


class DistillStage(StageModule):
    """LightningModule of stage 1. Receives built modules; reads no config.

    ``generator`` (optional): a one-step generator trained jointly, whose output is v̂ (see the
    module docstring); its trainable parameters (under LoRA: adapter, conv_in, x_t head) join
    the optimiser. Without it v̂ is the codec's light reconstruction ``latent_hat``.

    ``pixel_weight``, ``lpips_weight``: weights of the pixel loss on the decoded v̂ (module
    docstring); 0 and 0 (default) decode nothing. ``perceptual``: the LPIPS, given exactly when
    ``lpips_weight`` > 0, held outside the ``state_dict`` like the teacher.
    ``vae_gradient_checkpointing``: recompute the VAE decoder's activations in backward (diffusers'
    ``enable_gradient_checkpointing``); only used when the pixel loss is on.
    """

    summary_keys = ("bpp", "token_acc", "majority_acc", "distill_ce", "latent_mse", "pixel_l1", "lpips")

    def __init__(
        self,
        *,
        family: ModelFamily,
        vae: FrozenVAE,
        codec: nn.Module,
        teacher: Teacher,
        distill: SemanticDistillLoss,
        optimizer: OptimizerSpec,
        identity: ModelIdentity,
        lmbda: float = 2.0,
        lmbda_warmup_steps: int = 0,
        lmbda_start: float = 0.0,
        lmbda_step0: str = "ramp",
        distill_weight: float = 1.0,
        latent_weight: float = 1.0,
        generator: OneStepGenerator | None = None,
        pixel_weight: float = 0.0,
        lpips_weight: float = 0.0,
        perceptual: PerceptualLoss | None = None,
        vae_gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(identity, family)
        if pixel_weight < 0 or lpips_weight < 0:
            raise ValueError(f"pixel_weight and lpips_weight must be >= 0, got {pixel_weight} and {lpips_weight}")
        if (perceptual is None) != (lpips_weight == 0):
            raise ValueError("give a PerceptualLoss exactly when lpips_weight > 0")
        self.vae = vae
        self.codec = codec
        for part in family.idle_parts(codec, "distill", trains_generator=generator is not None):
            # e.g. the light codec's token norm: the tokens feed only the generator (stage 2+), so
            # it gets no gradient here, and DDP refuses parameters without one.
            part.requires_grad_(False)
        if generator is not None:
            self.generator = generator
        self.distill = distill
        self.__dict__["teacher"] = teacher  # not a submodule: see the module docstring
        self.optimizer_spec = optimizer
        self.lmbda = lmbda
        self.lmbda_warmup_steps = lmbda_warmup_steps
        self.lmbda_start = float(lmbda_start)
        self.lmbda_step0 = str(lmbda_step0)
        quadratic_ramp(0, lmbda, lmbda_warmup_steps, self.lmbda_start, self.lmbda_step0)  # a bad step0 fails here
        self.distill_weight = distill_weight
        self.latent_weight = latent_weight
        self.pixel_weight, self.lpips_weight = float(pixel_weight), float(lpips_weight)
        self.__dict__["perceptual"] = perceptual  # a loss, not model state (PerceptualLoss docstring)
        if self.decodes_pixels and vae_gradient_checkpointing:
            vae.autoencoder.enable_gradient_checkpointing()
        self._val_code_counts: Tensor | None = None

    @property
    def decodes_pixels(self) -> bool:
        """Whether a step decodes v̂ to pixels (the pixel loss is on)."""
        return self.pixel_weight > 0 or self.lpips_weight > 0

    # ------------------------------------------------------------------ helpers
    def current_lambda(self) -> float:
        """λ at the current global step (quadratic warm-up from ``lmbda_start``; see :func:`quadratic_ramp`)."""
        return quadratic_ramp(self.global_step, self.lmbda, self.lmbda_warmup_steps, self.lmbda_start, self.lmbda_step0)

    def _teacher_on_device(self) -> Teacher:
        teacher: Teacher = self.__dict__["teacher"]
        first = next(teacher.parameters(), None)
        if first is not None and first.device != self.device:
            teacher.to(self.device)
        return teacher

    def _step(self, x: Tensor) -> dict[str, Tensor]:
        teacher = self._teacher_on_device()
        v = self.vae.encode(x)
        targets = teacher.targets(x)
        out = self.family.codec_pass(self.codec, x, v)
        bpp = estimated_bpp(self.family, self.codec, out, x.shape[-2] * x.shape[-1]).mean()
        distill = self.distill(out.semantic, targets, teacher.codebook())
        generator = getattr(self, "generator", None)
        latent = out.latent_hat if generator is None else generator(out.features, out.tokens)
        latent_mse = F.mse_loss(latent.float(), v)
        lam = self.current_lambda()
        loss = lam * bpp + self.distill_weight * distill.loss + self.latent_weight * latent_mse
        metrics = {
            "bpp": bpp, "distill": distill.loss, "distill_ce": distill.ce,
            "distill_mse": distill.mse, "token_acc": distill.accuracy, "latent_mse": latent_mse,
        }
        if self.decodes_pixels:
            x_hat = self.vae.decode(latent)  # the frozen decoder, with gradients back to v̂
            metrics["pixel_l1"] = F.l1_loss(x_hat * 0.5 + 0.5, x.float() * 0.5 + 0.5)
            loss = loss + self.pixel_weight * metrics["pixel_l1"]
            perceptual = self.__dict__["perceptual"]
            if perceptual is not None:
                metrics["lpips"] = perceptual.to(self.device)(x_hat, x).mean()
                loss = loss + self.lpips_weight * metrics["lpips"]
        metrics = {"loss": loss, **metrics}
        if targets.indices is not None:
            metrics["_indices"] = targets.indices
        return metrics

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        batch = batch_images(batch)
        metrics = self._step(batch)
        metrics.pop("_indices", None)
        self.log_dict({f"train/{k}": v.detach() for k, v in metrics.items()}, prog_bar=False,
                      batch_size=batch.shape[0])
        self.log("bpp", metrics["bpp"].detach(), prog_bar=True, logger=False, batch_size=batch.shape[0])
        self.log("acc", metrics["token_acc"].detach(), prog_bar=True, logger=False, batch_size=batch.shape[0])
        self.log("train/lambda", self.current_lambda(), batch_size=batch.shape[0])
        return metrics["loss"]

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_code_counts = None

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        batch = batch_images(batch)
        metrics = self._step(batch)
        indices = metrics.pop("_indices", None)
        if indices is not None:
            teacher = self.__dict__["teacher"]
            counts = torch.bincount(indices.flatten(), minlength=teacher.num_codes).float()
            self._val_code_counts = counts if self._val_code_counts is None else self._val_code_counts + counts
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False,
                      batch_size=batch.shape[0], sync_dist=True)
        self.record_val(metrics, batch.shape[0])

    def on_validation_epoch_end(self) -> None:
        if self._val_code_counts is not None:
            counts = self.all_gather(self._val_code_counts)
            counts = counts.sum(0) if counts.dim() > 1 else counts
            # Accuracy of always predicting the most frequent code: the bar token accuracy must beat.
            majority = counts.max() / counts.sum().clamp_min(1)
            self.log("val/majority_acc", majority, sync_dist=False)
            self._val_sums["majority_acc"] = float(majority) * self._val_count
        super().on_validation_epoch_end()

    def configure_optimizers(self) -> Any:
        params = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("vae.")]
        optimizer = self.optimizer_spec.build(params)
        return {"optimizer": optimizer, "lr_scheduler": self.optimizer_spec.scheduler(optimizer)}
