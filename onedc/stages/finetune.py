"""Stage 3, ``finetune``: joint pixel + latent fine-tuning with perceptual and adversarial losses (docs/architecture.md §3).

::

    x ─VAE enc─> v ─┐
    x ──────────────┴─ codec (frozen unless train_codec) ─ generator (ONE step) ─> v̂ ─VAE dec (frozen)─> x̂
    L_G = w_pix·(L1|MSE)(x̂, x) + w_lpips·LPIPS(x̂, x) + w_lat·L_latent(v̂, v) [+ λ·R] + w_gan·ℓ_G(D(v̂ or x̂))
    L_D = ℓ_D(D(v or x), D(sg(v̂ or x̂)))           the adversarial terms start at gan_start_step

The critic D is the diffusion-GAN critic on noised latents (v̂ vs v) or a pixel PatchGAN (x̂ vs x).

**One optimizer, one backward.** Lightning's DeepSpeed strategy accepts a single optimizer, so
the stage has one AdamW with two parameter groups (``generator``: generator + trained codec;
``discriminator``: D, its own lr/betas/weight decay/warm-up) and minimises in ONE backward::

    loss = L_G[D called functionally with DETACHED parameters] + L_D[on sg(fake)]

so ``∂loss/∂θ_G = ∂L_G/∂θ_G`` (L_D sees only the detached fake) and ``∂loss/∂θ_D = ∂L_D/∂θ_D``
(L_G's critic call holds no graph to θ_D): exactly the gradients of the classic alternation
"G step with D frozen, D step on fake.detach()", both taken at the parameters *before* the
step (G's adversarial term is evaluated against D before D's update, and D sees the fake of G
before G's update). AdamW is elementwise, so one optimizer with two groups is two optimizers;
gradient norms are clipped per group (:meth:`configure_gradient_clipping`), as two optimizers
would. ``tests/stages/test_finetune.py`` checks the parameters against a two-optimizer loop.

**Before gan_start_step** D receives exactly zero gradients (``0·Σθ_D``: DDP's reducer and
ZeRO expect a gradient for every trainable parameter, and ZeRO turns a missing one into zero
anyway), its group's lr is 0 (scheduler) and its weight decay 0, so it stays bitwise constant.
Its Adam state is cleared before every step up to and including gan_start_step: otherwise
Adam's step counter would count the idle steps and its bias correction of the second moment
would be off, making D's first real updates up to ~sqrt(1000/k) times too large. D's first
real step is thus Adam's step 1, as with a D optimizer created at gan_start_step.

Under DeepSpeed the engine clips the global gradient norm over both groups (it owns clipping),
so there the equivalence holds while clipping is inactive. ZeRO-3 is not supported (the
functional critic call needs whole parameters; the EMA refuses sharded ones too).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onedc.eval.pixels import psnr
from onedc.modules.generator import OneStepGenerator
from onedc.modules.losses import GANLoss, PerceptualLoss, adaptive_gan_weight, discriminator_accuracy
from onedc.modules.vae import FrozenVAE
from onedc.families import CodecPass, ModelFamily
from onedc.stages.common import ModelIdentity, OptimizerSpec, batch_images, estimated_bpp
from onedc.stages.latent import LatentStage

PIXEL_LOSSES = ("l1", "mse")
GENERATOR_GROUP, DISCRIMINATOR_GROUP = "generator", "discriminator"


class FinetuneOutputs(NamedTuple):
    """One forward pass of the codec + generator + VAE decoder."""

    latent: Tensor  # generated latent v̂
    target: Tensor  # VAE latent v of the input
    x_hat: Tensor  # decoded image (unclamped)
    codec: CodecPass


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Lightning's and DeepSpeed's wrappers (whose param groups are shared)."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # DeepSpeedZeroOptimizer -> the client AdamW (flat fp32 partitions)
    return optimizer


def _gated_warmup(start: int, steps: int):
    return lambda step: 0.0 if step < start else min(1.0, (step - start + 1) / max(1, steps))


class FinetuneStage(LatentStage):
    """LightningModule of stage 3. Receives built modules; reads no config.

    A :class:`~onedc.stages.latent.LatentStage` (same codec handling, generator EMA, image
    grids, ``generate``/``reconstruct``) that also decodes to pixels and trains a critic.

    Args:
        vae, codec, generator: the built modules (initialised from the latent stage by the pipeline).
        discriminator: the critic (``input_domain`` "latent" or "pixel"), or None: no GAN.
        perceptual: LPIPS, or None when ``lpips_weight`` is 0.
        gan_loss: the GAN objective (non-saturating or hinge).
        optimizer: AdamW + warm-up of the generator group.
        disc_optimizer: AdamW + warm-up of the critic group (its warm-up starts at gan_start_step).
        identity: what checkpoints record about the model.
        train_codec, lmbda, latent_loss, ema_decay, image_every_n_steps: as in LatentStage.
        pixel_loss: ``l1`` or ``mse`` in pixels ([-1, 1] images).
        pixel_weight, lpips_weight, latent_weight, gan_weight: loss weights.
        gan_start_step: first optimiser step with adversarial terms.
        adaptive_gan_weight: scale ``gan_weight`` by VQGAN's gradient-norm ratio at the last generator layer.
    """

    summary_keys = ("pixel_l1", "psnr", "lpips", "latent_loss", "bpp", "d_real_acc", "d_fake_acc")

    def __init__(
        self,
        *,
        family: ModelFamily,
        vae: FrozenVAE,
        codec: nn.Module,
        generator: OneStepGenerator,
        discriminator: nn.Module | None,
        perceptual: PerceptualLoss | None,
        gan_loss: GANLoss,
        optimizer: OptimizerSpec,
        disc_optimizer: OptimizerSpec,
        identity: ModelIdentity,
        train_codec: bool = False,
        lmbda: float = 2.0,
        latent_loss: str = "mse",
        pixel_loss: str = "l1",
        pixel_weight: float = 0.625,
        lpips_weight: float = 0.625,
        latent_weight: float = 1.0,
        gan_weight: float = 1e-3,
        gan_start_step: int = 0,
        adaptive_gan_weight: bool = False,
        ema_decay: float | None = 0.999,
        image_every_n_steps: int | None = 100,
    ) -> None:
        super().__init__(family=family, vae=vae, codec=codec, generator=generator, optimizer=optimizer, identity=identity,
                         train_codec=train_codec, lmbda=lmbda, latent_loss=latent_loss, ema_decay=ema_decay,
                         image_every_n_steps=image_every_n_steps)
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got '{pixel_loss}'")
        if (perceptual is None) != (lpips_weight == 0):
            raise ValueError("give a PerceptualLoss exactly when lpips_weight > 0")
        if (discriminator is None) != (gan_weight == 0):
            raise ValueError("give a discriminator exactly when gan_weight > 0")
        if discriminator is not None and getattr(discriminator, "input_domain", None) not in ("latent", "pixel"):
            raise ValueError("the discriminator must say its input_domain: 'latent' or 'pixel'")
        self.discriminator = discriminator
        self.__dict__["perceptual"] = perceptual  # a loss, not model state: kept out of state_dict (see PerceptualLoss)
        self.gan_loss = gan_loss
        self.disc_optimizer_spec = disc_optimizer
        self.pixel_loss = pixel_loss
        self.pixel_weight = float(pixel_weight)
        self.lpips_weight = float(lpips_weight)
        self.latent_weight = float(latent_weight)
        self.gan_weight = float(gan_weight)
        self.gan_start_step = int(gan_start_step)
        self.adaptive_gan_weight = bool(adaptive_gan_weight)

    # ------------------------------------------------------------------ computation
    def gan_active(self) -> bool:
        """Whether this optimiser step has adversarial terms."""
        return self.discriminator is not None and self.global_step >= self.gan_start_step

    def forward_pass(self, x: Tensor) -> FinetuneOutputs:
        """Image in [-1,1] -> generated latent, VAE latent, decoded image (differentiable w.r.t. v̂), codec output."""
        latent, v, out = self.generate(x)
        return FinetuneOutputs(latent, v, self.vae.decode(latent), out)

    def _perceptual_on_device(self) -> PerceptualLoss:
        return self.__dict__["perceptual"].to(self.device)  # not a submodule: Lightning does not move it

    def reconstruction_losses(self, x: Tensor, out: FinetuneOutputs) -> dict[str, Tensor]:
        """The generator's non-adversarial terms and their weighted sum ``loss``."""
        pixel = F.l1_loss(out.x_hat, x) if self.pixel_loss == "l1" else F.mse_loss(out.x_hat, x)
        latent_loss = self._distance(out.latent, out.target)
        bpp = estimated_bpp(self.family, self.codec, out.codec, x.shape[-2] * x.shape[-1]).mean()
        loss = self.pixel_weight * pixel + self.latent_weight * latent_loss
        metrics = {"pixel": pixel, "latent_loss": latent_loss, "bpp": bpp}
        if self.__dict__["perceptual"] is not None:
            metrics["lpips"] = self._perceptual_on_device()(out.x_hat, x).mean()
            loss = loss + self.lpips_weight * metrics["lpips"]
        if self.train_codec:
            loss = loss + self.lmbda * bpp
        metrics["loss"] = loss
        return metrics

    def critic_inputs(self, x: Tensor, out: FinetuneOutputs) -> tuple[Tensor, Tensor]:
        """(real, fake) in the critic's domain: (v, v̂) for a latent critic, (x, x̂) for a pixel one."""
        assert self.discriminator is not None
        if self.discriminator.input_domain == "latent":
            return out.target, out.latent
        return x, out.x_hat

    def generator_adversarial_loss(self, fake: Tensor, draw: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(ℓ_G, logits) with the critic called on DETACHED parameters: no gradient can reach θ_D."""
        assert self.discriminator is not None
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logits = torch.func.functional_call(self.discriminator, frozen, (fake,), draw)
        return self.gan_loss.generator_loss(logits), logits

    def critic_loss(self, real: Tensor, fake: Tensor, draw_real: dict[str, Tensor],
                    draw_fake: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(ℓ_D, real logits, fake logits) on the DETACHED fake: no gradient can reach the generator."""
        assert self.discriminator is not None
        real_logits = self.discriminator(real.detach(), **draw_real)
        fake_logits = self.discriminator(fake.detach(), **draw_fake)
        return self.gan_loss.discriminator_loss(real_logits, fake_logits), real_logits, fake_logits

    def last_generator_layer(self) -> Tensor:
        """The weight the adaptive GAN weight measures gradients at: the UNet's conv_out (else the x_t
        head's last weight: a 1x1 conv, or ``vae_reduction``'s shortcut in the reference generator)."""
        conv_out = self.generator.unet.conv_out.weight
        if conv_out.requires_grad:
            return conv_out
        weights = [p for name, p in self.generator.to_xt.named_parameters() if name.endswith("weight")]
        return weights[-1]

    def training_losses(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(the single loss to backpropagate, metrics) for this optimiser step; see the module docstring.

        Random draws happen in a fixed order: the critic's draw for the fake, then for the real.
        """
        out = self.forward_pass(x)
        metrics = self.reconstruction_losses(x, out)
        total = metrics["loss"]
        critic = self.discriminator
        if critic is None:
            return total, metrics
        if not self.gan_active():
            return total + 0.0 * sum(p.sum() for p in critic.parameters()), metrics
        real, fake = self.critic_inputs(x, out)
        draw_fake, draw_real = critic.draw(fake), critic.draw(real)
        g_adv, _ = self.generator_adversarial_loss(fake, draw_fake)
        weight = torch.tensor(self.gan_weight, device=x.device)
        if self.adaptive_gan_weight:
            weight = weight * adaptive_gan_weight(metrics["loss"], g_adv, self.last_generator_layer())
        d_loss, real_logits, fake_logits = self.critic_loss(real, fake, draw_real, draw_fake)
        metrics["d_real_acc"], metrics["d_fake_acc"] = discriminator_accuracy(real_logits, fake_logits)
        metrics.update(g_adv=g_adv, d_loss=d_loss, gan_weight=weight)
        return total + weight * g_adv + d_loss, metrics

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        batch = batch_images(batch)
        loss, metrics = self.training_losses(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in metrics.items()}, batch_size=batch.shape[0])
        self.log(self.pixel_loss, metrics["pixel"].detach(), prog_bar=True, logger=False, batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Metrics of the (EMA) generator: ``loss`` is the reconstruction objective (no GAN term:
        the critic changes, so adversarial values are not comparable across validations);
        ``pixel_l1`` and ``psnr`` are on the clamped decoded image."""
        batch = batch_images(batch)
        out = self.forward_pass(batch)
        metrics = self.reconstruction_losses(batch, out)
        metrics["pixel_l1"] = F.l1_loss(out.x_hat.clamp(-1, 1), batch)
        metrics["psnr"] = psnr(out.x_hat, batch).mean()
        if self.discriminator is not None:
            # A fixed draw per batch: the critic metrics of successive validations are comparable.
            generator = torch.Generator(device=batch.device).manual_seed(int(batch_idx))
            real, fake = self.critic_inputs(batch, out)
            draw_fake = self.discriminator.draw(fake, generator=generator)
            draw_real = self.discriminator.draw(real, generator=generator)
            d_loss, real_logits, fake_logits = self.critic_loss(real, fake, draw_real, draw_fake)
            metrics["d_real_acc"], metrics["d_fake_acc"] = discriminator_accuracy(real_logits, fake_logits)
            metrics.update(d_loss=d_loss, g_adv=self.gan_loss.generator_loss(fake_logits))
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=batch.shape[0], sync_dist=True)
        self.record_val(metrics, batch.shape[0])

    def configure_optimizers(self) -> Any:
        """ONE AdamW: a ``generator`` group and a ``discriminator`` group (own lr, betas, weight
        decay, and a warm-up that starts at gan_start_step with lr 0 before it)."""
        trainable = {name: p for name, p in self.named_parameters() if p.requires_grad}
        gen = [p for name, p in trainable.items() if name.startswith(("generator.", "codec."))]
        disc = [p for name, p in trainable.items() if name.startswith("discriminator.")]
        stray = sorted(name for name in trainable if not name.startswith(("generator.", "codec.", "discriminator.")))
        if stray:
            raise RuntimeError(f"trainable parameters outside the generator/codec/discriminator groups: {stray}")
        spec, dspec = self.optimizer_spec, self.disc_optimizer_spec
        groups: list[dict[str, Any]] = [{"params": gen, "name": GENERATOR_GROUP, "lr": spec.lr, "betas": tuple(spec.betas),
                                         "weight_decay": spec.weight_decay}]
        lambdas = [spec.lr_lambda()]
        if disc:
            groups.append({"params": disc, "name": DISCRIMINATOR_GROUP, "lr": dspec.lr, "betas": tuple(dspec.betas),
                           "weight_decay": dspec.weight_decay})
            lambdas.append(_gated_warmup(self.gan_start_step, dspec.warmup_steps))
        optimizer = spec.build(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Keep the idle critic still (weight decay 0; lr 0 comes from the scheduler) and give it a
        # fresh Adam state up to its first real step (module docstring).
        if self.discriminator is None:
            return
        base = _base_optimizer(optimizer)
        group = next(g for g in base.param_groups if g.get("name") == DISCRIMINATOR_GROUP)
        active = self.global_step >= self.gan_start_step
        group["weight_decay"] = self.disc_optimizer_spec.weight_decay if active else 0.0
        if self.global_step <= self.gan_start_step:
            for param in group["params"]:
                base.state.pop(param, None)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the gradient norm of each parameter group separately (as two optimizers would)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if not gradient_clip_val or isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return  # DeepSpeed clips inside its engine (global norm)
        if gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # elementwise: per group alike
            return
        for group in optimizer.param_groups:
            grads = [p for p in group["params"] if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, float(gradient_clip_val))
