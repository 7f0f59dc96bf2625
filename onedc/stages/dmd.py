"""Stage ``dmd``: the paper's stage II, DMD2 distribution matching with a diffusion-GAN (docs/reference-model.md §10.2).

::

    x ─VAE enc─> v (real latents) ──────────────────────────────────────────────┐
    x ─ codec (frozen, no grad) ─ generator (ONE step) ─> x̂0 (generated latents) ─ VAE dec ─> x̂
    captions | "" ─ CLIP (frozen) ─> text, uncond
    generator (every ratio-th step):  L_G = w_dm·DM(x̂0) + w_gan·softplus(−D(x̂0)) + w_pix·(L1(x̂, x) + LPIPS(x̂, x))
    guidance  (every step):           L_φ = fake ε-MSE(sg(x̂0)) + w_cls·[softplus(D(sg(x̂0))) + softplus(−D(v))]

``DM`` is :meth:`~onedc.modules.guidance.DMDGuidance.distribution_matching_loss` (t ~ U{20..640},
real CFG 1.75 vs fake, x0 in float64), ``D`` the realism logits of the fake UNet's mid block
(t ~ U{0..999}). No rate term (λ = 0): the codec is frozen.

**The schedule, and what a step is.** The recipe (DMD2's ``dfake_gen_update_ratio``, 10 in the
paper) updates the guidance model every iteration and the generator on every ratio-th one
(iterations 0, 10, 20, ...), with both LR schedules advancing every iteration. Here one iteration
is ONE optimiser step of ONE AdamW with two parameter groups (``generator``, ``guidance``), so
Lightning's ``global_step`` counts iterations exactly as the recipe does: ``max_steps``, the
warm-ups, the logged ``step``, ``val_every_n_steps`` and the ``step=*.ckpt`` names all count
iterations; ``train/generator_updates`` counts generator updates. (With manual optimisation and
two optimizers Lightning's ``global_step`` would count every ``optimizer.step()``, Lightning
#17958; one optimizer avoids the question and keeps DeepSpeed, which takes a single optimizer.)

**One backward equals the two-optimizer loop.** As in the finetune stage, the loss is
``[generator turn] L_G(guidance called with gradients off for its parameters) + L_φ(on sg(x̂0))``:
L_G reaches only the generator, L_φ only the guidance model, both at the parameters before the
step, which is what DMD2's alternation computes (the generator step first, then the guidance
step on the image the generator made before its update; DMD2 zeroes the guidance gradient the
generator's GAN term leaves). Gradient norms are clipped per group, as two optimizers would.
On the other iterations the generator runs without gradients, receives exactly-zero gradients
(``0·Σθ``: DDP and ZeRO expect one for every trainable parameter), and its group is held still:
lr and weight decay 0 for that step and its AdamW state restored afterwards, so its Adam step
count is the number of generator updates, as with its own optimizer.
``tests/stages/test_dmd.py`` checks the parameters against a plain two-optimizer loop.

Under DeepSpeed the engine clips the global norm over both groups (the equivalence then holds
while clipping is inactive); ZeRO-3 is not supported.
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onedc.eval.pixels import psnr
from onedc.families import ModelFamily
from onedc.modules.generator import OneStepGenerator
from onedc.modules.guidance import DM_TIMESTEPS, FAKE_TIMESTEPS, DMDGuidance
from onedc.modules.losses import PerceptualLoss
from onedc.modules.text import TextEncoder
from onedc.modules.vae import FrozenVAE
from onedc.stages.common import ModelIdentity, OptimizerSpec
from onedc.stages.latent import LatentStage

GENERATOR_GROUP, GUIDANCE_GROUP = "generator", "guidance"
CAPTION_SOURCES = ("batch", "empty")


class Draw(NamedTuple):
    """The random inputs of one guidance evaluation."""

    timesteps: Tensor
    noise: Tensor


def split_batch(batch: Any) -> tuple[Tensor, list[str] | None]:
    """(images, captions or None) of a batch: a tensor, or a dict with ``image`` and optional ``caption``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        images = batch.get("image", batch.get("images"))
        if not isinstance(images, Tensor):
            raise ValueError(f"a dict batch needs an 'image' tensor; it has {sorted(batch)}")
        captions = batch.get("caption", batch.get("captions"))
        return images, (list(captions) if captions is not None else None)
    raise ValueError(f"a batch must be an image tensor or a dict with 'image' (and 'caption'), got {type(batch).__name__}")


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Lightning's and DeepSpeed's wrappers (whose param groups are shared)."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class DMDStage(LatentStage):
    """LightningModule of the DMD stage. Receives built modules; reads no config.

    Args:
        vae, codec, generator: as in :class:`~onedc.stages.latent.LatentStage` (the codec is frozen).
        guidance: the :class:`~onedc.modules.guidance.DMDGuidance` (real UNet frozen; fake UNet and
            classifier trained).
        text: the frozen CLIP text encoder (not a submodule: never in checkpoints or optimisers).
        perceptual: LPIPS, or None when ``lpips_weight`` is 0.
        optimizer: AdamW + warm-up of the generator group; guidance_optimizer: of the guidance group.
        captions: ``batch`` (the batch's ``caption`` strings) or ``empty`` (the empty prompt for every image).
        generator_every: ``dfake_gen_update_ratio``: the generator updates on iterations 0, k, 2k, ...
        dm_weight, gan_weight, guidance_cls_weight, pixel_weight, lpips_weight: loss weights (§10.2:
            1, 1e-3, 1e-2, 0.625, 0.625).
        dm_timesteps, gan_timesteps, fake_timesteps: inclusive timestep ranges of the DM loss, the
            generator's and the guidance's realism terms, and the fake denoising loss.
    """

    summary_keys = ("pixel_l1", "psnr", "lpips", "fake_loss", "dm_loss")

    def __init__(
        self,
        *,
        family: ModelFamily,
        vae: FrozenVAE,
        codec: nn.Module,
        generator: OneStepGenerator,
        guidance: DMDGuidance,
        text: TextEncoder,
        perceptual: PerceptualLoss | None,
        optimizer: OptimizerSpec,
        guidance_optimizer: OptimizerSpec,
        identity: ModelIdentity,
        captions: str = "empty",
        generator_every: int = 10,
        dm_weight: float = 1.0,
        gan_weight: float = 1e-3,
        guidance_cls_weight: float = 1e-2,
        pixel_weight: float = 0.625,
        lpips_weight: float = 0.625,
        dm_timesteps: Sequence[int] = DM_TIMESTEPS,
        gan_timesteps: Sequence[int] = FAKE_TIMESTEPS,
        fake_timesteps: Sequence[int] = FAKE_TIMESTEPS,
        ema_decay: float | None = None,
        image_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(family=family, vae=vae, codec=codec, generator=generator, optimizer=optimizer, identity=identity,
                         train_codec=False, lmbda=0.0, latent_loss="mse", ema_decay=ema_decay,
                         image_every_n_steps=image_every_n_steps)
        if captions not in CAPTION_SOURCES:
            raise ValueError(f"captions must be one of {CAPTION_SOURCES}, got '{captions}'")
        if int(generator_every) < 1:
            raise ValueError(f"generator_every must be >= 1, got {generator_every}")
        if (perceptual is None) != (lpips_weight == 0):
            raise ValueError("give a PerceptualLoss exactly when lpips_weight > 0")
        if guidance.latent_channels != generator.latent_channels:
            raise ValueError(f"the guidance UNets take {guidance.latent_channels}-channel latents, the generator "
                             f"makes {generator.latent_channels}")
        if text.width != int(guidance.fake_unet.config.cross_attention_dim):
            raise ValueError(f"the text encoder gives {text.width}-d embeddings, the guidance UNets attend to "
                             f"{guidance.fake_unet.config.cross_attention_dim}-d context")
        self.guidance = guidance
        self.__dict__["text"] = text  # frozen, not model state (as the distill stage's teacher)
        self.__dict__["perceptual"] = perceptual
        self.guidance_optimizer_spec = guidance_optimizer
        self.captions = captions
        self.generator_every = int(generator_every)
        self.dm_weight, self.gan_weight = float(dm_weight), float(gan_weight)
        self.guidance_cls_weight = float(guidance_cls_weight)
        self.pixel_weight, self.lpips_weight = float(pixel_weight), float(lpips_weight)
        self.dm_timesteps = tuple(int(t) for t in dm_timesteps)
        self.gan_timesteps = tuple(int(t) for t in gan_timesteps)
        self.fake_timesteps = tuple(int(t) for t in fake_timesteps)
        self._uncond: Tensor | None = None

    # ------------------------------------------------------------------ schedule
    def generator_turn(self, step: int | None = None) -> bool:
        """Whether iteration ``step`` (default: the current one) updates the generator."""
        step = self.global_step if step is None else int(step)
        return step % self.generator_every == 0

    def generator_updates(self, step: int | None = None) -> int:
        """Generator updates made before iteration ``step`` (default: the current one)."""
        step = self.global_step if step is None else int(step)
        return -(-step // self.generator_every)

    # ------------------------------------------------------------------ text
    def _text(self) -> TextEncoder:
        text: TextEncoder = self.__dict__["text"]
        if next(text.parameters()).device != self.device:
            text.to(self.device)
            self._uncond = None
        return text

    def text_embeddings(self, batch: int, captions: list[str] | None) -> tuple[Tensor, Tensor]:
        """(text, unconditional) embeddings of a batch: its captions (``captions=batch``) or "" for all."""
        text = self._text()
        if self._uncond is None:
            self._uncond = text([""])
        uncond = self._uncond.expand(batch, -1, -1)
        if self.captions == "empty":
            return uncond, uncond
        if captions is None:
            raise ValueError("stage.captions=batch but the batch has no 'caption' strings: use a captioned dataset "
                             "or stage.captions=empty")
        if len(captions) != batch:
            raise ValueError(f"{len(captions)} captions for {batch} images")
        return text(captions), uncond

    # ------------------------------------------------------------------ random draws
    @staticmethod
    def draw(latents: Tensor, timesteps: Sequence[int], generator: torch.Generator | None = None) -> Draw:
        """t ~ U{lo..hi} per sample and Gaussian noise like ``latents`` (global RNG unless ``generator``)."""
        lo, hi = timesteps
        t = torch.randint(lo, hi + 1, (latents.shape[0],), device=latents.device, generator=generator)
        noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32, generator=generator)
        return Draw(t, noise)

    def _guidance_still(self) -> "_NoGuidanceGrad":
        return _NoGuidanceGrad(self.guidance)

    # ------------------------------------------------------------------ losses
    def generator_losses(self, x: Tensor, latent: Tensor, text: Tensor, uncond: Tensor,
                         draws: tuple[Draw, Draw]) -> dict[str, Tensor]:
        """L_G and its terms; the guidance model's parameters get no gradient from it."""
        dm_draw, gan_draw = draws
        with self._guidance_still():
            dm = self.guidance.distribution_matching_loss(latent, text, uncond, timesteps=dm_draw.timesteps,
                                                          noise=dm_draw.noise)
            logits = self.guidance.realism_logits(latent, text, timesteps=gan_draw.timesteps, noise=gan_draw.noise)
        g_adv = F.softplus(-logits.float()).mean()
        x_hat = self.vae.decode(latent)
        pixel = F.l1_loss(x_hat, x)
        loss = self.dm_weight * dm.loss + self.gan_weight * g_adv + self.pixel_weight * pixel
        metrics = {"dm_loss": dm.loss, "g_adv": g_adv, "pixel": pixel}
        if self.__dict__["perceptual"] is not None:
            metrics["lpips"] = self.__dict__["perceptual"].to(self.device)(x_hat, x).mean()
            loss = loss + self.lpips_weight * metrics["lpips"]
        metrics["generator_loss"] = loss
        return metrics

    def guidance_losses(self, real: Tensor, fake: Tensor, text: Tensor,
                        draws: tuple[Draw, Draw, Draw]) -> dict[str, Tensor]:
        """L_φ and its terms, on the DETACHED generated latents and the real VAE latents."""
        fake_draw, cls_fake_draw, cls_real_draw = draws
        fake = fake.detach()
        fake_loss = self.guidance.fake_denoising_loss(fake, text, timesteps=fake_draw.timesteps, noise=fake_draw.noise)
        logits_fake = self.guidance.realism_logits(fake, text, timesteps=cls_fake_draw.timesteps,
                                                   noise=cls_fake_draw.noise)
        logits_real = self.guidance.realism_logits(real.detach(), text, timesteps=cls_real_draw.timesteps,
                                                   noise=cls_real_draw.noise)
        cls = F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
        return {"fake_loss": fake_loss, "guidance_cls": cls, "guidance_loss": fake_loss + self.guidance_cls_weight * cls,
                "d_real_acc": (logits_real > 0).float().mean(), "d_fake_acc": (logits_fake < 0).float().mean()}

    def training_losses(self, x: Tensor, captions: list[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(the one loss to backpropagate, metrics) of this iteration (module docstring).

        Random draws in a fixed order: [generator turn: DM, GAN], fake loss, realism on fake, on real.
        """
        gen_turn = self.generator_turn()
        text, uncond = self.text_embeddings(x.shape[0], captions)
        v = self.vae.encode(x)
        with torch.set_grad_enabled(gen_turn and torch.is_grad_enabled()):
            with torch.no_grad():
                out = self.family.codec_pass(self.codec, x, v)
            latent = self.generator(out.features, out.tokens)
        metrics: dict[str, Tensor] = {}
        if gen_turn:
            draws = (self.draw(latent, self.dm_timesteps), self.draw(latent, self.gan_timesteps))
            metrics.update(self.generator_losses(x, latent, text, uncond, draws))
            total = metrics["generator_loss"]
        else:
            total = 0.0 * sum(p.sum() for p in self._generator_params())
        draws3 = (self.draw(latent, self.fake_timesteps), self.draw(latent, self.gan_timesteps),
                  self.draw(v, self.gan_timesteps))
        metrics.update(self.guidance_losses(v, latent, text, draws3))
        return total + metrics["guidance_loss"], metrics

    def _generator_params(self) -> list[nn.Parameter]:
        return [p for p in self.generator.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, captions = split_batch(batch)
        loss, metrics = self.training_losses(x, captions)
        metrics["generator_updates"] = torch.tensor(float(self.generator_updates() + int(self.generator_turn())))
        self.log_dict({f"train/{k}": v.detach() for k, v in metrics.items()}, batch_size=x.shape[0])
        self.log("fake", metrics["fake_loss"].detach(), prog_bar=True, logger=False, batch_size=x.shape[0])
        return loss

    def reconstruct(self, x: Tensor) -> Tensor:
        return super().reconstruct(split_batch(x)[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """The generator's pixel metrics, and the guidance losses with a fixed draw per batch (comparable across runs)."""
        x, captions = split_batch(batch)
        text, uncond = self.text_embeddings(x.shape[0], captions)
        latent, v, _ = self.generate(x)
        x_hat = self.vae.decode(latent)
        metrics = {"pixel": F.l1_loss(x_hat, x), "pixel_l1": F.l1_loss(x_hat.clamp(-1, 1), x),
                   "psnr": psnr(x_hat, x).mean()}
        loss = self.pixel_weight * metrics["pixel"]
        if self.__dict__["perceptual"] is not None:
            metrics["lpips"] = self.__dict__["perceptual"].to(self.device)(x_hat, x).mean()
            loss = loss + self.lpips_weight * metrics["lpips"]
        metrics["loss"] = loss
        gen = torch.Generator(device=x.device).manual_seed(int(batch_idx))
        dm_draw = self.draw(latent, self.dm_timesteps, gen)
        metrics["dm_loss"] = self.guidance.distribution_matching_loss(latent, text, uncond, timesteps=dm_draw.timesteps,
                                                                      noise=dm_draw.noise).loss
        draws = (self.draw(latent, self.fake_timesteps, gen), self.draw(latent, self.gan_timesteps, gen),
                 self.draw(v, self.gan_timesteps, gen))
        metrics.update(self.guidance_losses(v, latent, text, draws))
        self.log_dict({f"val/{k}": val for k, val in metrics.items()}, batch_size=x.shape[0], sync_dist=True)
        self.record_val(metrics, x.shape[0])

    def configure_optimizers(self) -> Any:
        """ONE AdamW with a ``generator`` and a ``guidance`` group, each with its lr, betas, weight decay and a
        warm-up counted in iterations (both of DMD2's schedulers step every iteration)."""
        trainable = {name: p for name, p in self.named_parameters() if p.requires_grad}
        gen = [p for name, p in trainable.items() if name.startswith("generator.")]
        guid = [p for name, p in trainable.items() if name.startswith("guidance.")]
        stray = sorted(name for name in trainable if not name.startswith(("generator.", "guidance.")))
        if stray:
            raise RuntimeError(f"trainable parameters outside the generator/guidance groups: {stray}")
        spec, gspec = self.optimizer_spec, self.guidance_optimizer_spec
        groups = [{"params": gen, "name": GENERATOR_GROUP, "lr": spec.lr, "betas": tuple(spec.betas),
                   "weight_decay": spec.weight_decay},
                  {"params": guid, "name": GUIDANCE_GROUP, "lr": gspec.lr, "betas": tuple(gspec.betas),
                   "weight_decay": gspec.weight_decay}]
        optimizer = spec.build(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [spec.lr_lambda(), gspec.lr_lambda()])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Off the generator's turn, hold its group still: lr and weight decay 0 for this step, AdamW state restored."""
        if self.generator_turn():
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        base = _base_optimizer(optimizer)
        group = next(g for g in base.param_groups if g.get("name") == GENERATOR_GROUP)
        saved = {id(p): copy.deepcopy(base.state[p]) for p in group["params"] if p in base.state}
        lr, decay = group["lr"], group["weight_decay"]
        group["lr"], group["weight_decay"] = 0.0, 0.0
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            group["lr"], group["weight_decay"] = lr, decay
            for p in group["params"]:
                if id(p) in saved:
                    base.state[p] = saved[id(p)]
                else:
                    base.state.pop(p, None)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the gradient norm of each parameter group separately (as DMD2's two optimizers are)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if not gradient_clip_val or isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return
        if gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for group in optimizer.param_groups:
            grads = [p for p in group["params"] if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, float(gradient_clip_val))


class _NoGuidanceGrad:
    """Context: the guidance model's trainable parameters take no gradient (the generator's terms)."""

    def __init__(self, guidance: nn.Module) -> None:
        self.params = [p for p in guidance.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)
