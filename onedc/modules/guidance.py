"""The DMD2 guidance model of the paper's stage II (docs/reference-model.md §10.2): two score UNets and a realism classifier.

::

    latents x (B, 4, h, w) ─ noised: √ᾱ_t·x + √(1−ᾱ_t)·n  (float32, ᾱ = the model's alphas_cumprod)
        ├─ real_unet (frozen, optionally bf16)  ε_real = ε(∅) + s·(ε(text) − ε(∅)),  s = 1.75
        ├─ fake_unet (trained)                  ε_fake = ε(text)
        │     └─ encoder half ─> mid-block output (1280 @ h/8) ─ cls_pred_branch ─> realism logit(s)
        x0_real, x0_fake in float64;  p = x − x0;  g = (p_real − p_fake) / mean_CHW |p_real|,  NaN → 0
        DM loss = 0.5·MSE(x, sg(x − g))            (∂/∂x = g / (B·C·h·w))
        fake loss = mean((ε_fake(sg(x)) − n)²)

``cls_pred_branch`` (§10.2): Conv(C→C, k4, s2, p1), GN(32), SiLU, Conv(C→C, k4, s4, p0), GN(32),
SiLU, 1x1 C→1, on the fake UNet's mid-block output. At 64×64 latents (512 px) it gives one logit
per sample; larger latents give a grid of logits, which the losses average.

State-dict keys are those of the released ``model_2.safetensors`` (``real_unet.*``,
``fake_unet.*``, ``cls_pred_branch.*``, ``alphas_cumprod``); reading that file (bf16
``real_unet``, ``dummy_network.*``, a ``module.`` prefix) is
:func:`onedc.families.reference.released.load_released_guidance`. Every random input
(timesteps, noise) is passed in, so a caller controls all randomness; the methods work with
gradients on and off. Pure torch + diffusers: no Lightning, no configs.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: classifier-free guidance scale of the real score (§10.2: ``real_guidance_scale 1.75``)
REAL_GUIDANCE_SCALE = 1.75
#: timestep ranges of §10.2 (inclusive): the DM loss, and the fake loss / diffusion-GAN
DM_TIMESTEPS = (20, 640)
FAKE_TIMESTEPS = (0, 999)
#: GroupNorm groups of the classifier branch (§10.2)
CLASSIFIER_GROUPS = 32


class DMLoss(NamedTuple):
    """The distribution-matching loss and its normalised direction ``grad`` (float64, as §10.2 computes it)."""

    loss: Tensor
    grad: Tensor


def classifier_branch(width: int, groups: int = CLASSIFIER_GROUPS) -> nn.Sequential:
    """The realism classifier on a ``width``-channel mid-block map (§10.2; indices 0, 1, 3, 4, 6 hold weights).

    ``groups`` falls back to the largest divisor of ``width`` not above it (tiny test UNets).
    """
    while width % groups:
        groups -= 1
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size=4, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
        nn.Conv2d(width, width, kernel_size=4, stride=4, padding=0), nn.GroupNorm(groups, width), nn.SiLU(),
        nn.Conv2d(width, 1, kernel_size=1),
    )


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """√ᾱ_t·x + √(1−ᾱ_t)·n in float32 (diffusers' ``DDPMScheduler.add_noise`` arithmetic, ᾱ given)."""
    alphas = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps.to(latents.device)]
    shape = (-1,) + (1,) * (latents.dim() - 1)
    sqrt_alpha = (alphas ** 0.5).reshape(shape)
    sqrt_one_minus = ((1 - alphas) ** 0.5).reshape(shape)
    return sqrt_alpha * latents.float() + sqrt_one_minus * noise.float()


def x0_from_epsilon(noisy: Tensor, epsilon: Tensor, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """x0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t with x_t, ε and ᾱ in float64 (the result stays float64)."""
    alphas = alphas_cumprod.to(device=noisy.device, dtype=torch.float64)[timesteps.to(noisy.device)]
    alphas = alphas.reshape((-1,) + (1,) * (noisy.dim() - 1))
    return (noisy.double() - (1 - alphas) ** 0.5 * epsilon.double()) / alphas ** 0.5


def unet_mid_block_output(unet: nn.Module, sample: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
    """The mid-block output of a diffusers ``UNet2DConditionModel`` (its encoder half only).

    The same operations as the first half of the UNet's own forward (time embedding, conv_in,
    down blocks, mid block) for a UNet without class/added embeddings, attention masks or input
    centring: the up blocks are not run. ``tests/modules/test_guidance.py`` checks it against a
    forward hook on the full forward.
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    hidden = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(hidden, emb, encoder_hidden_states=context)
    return unet.mid_block(hidden, emb)


def _check_plain_unet(unet: nn.Module, name: str) -> None:
    config = unet.config
    if (getattr(unet, "class_embedding", None) is not None or getattr(unet, "add_embedding", None) is not None
            or getattr(unet, "time_embed_act", None) is not None or getattr(unet, "encoder_hid_proj", None) is not None
            or bool(getattr(config, "center_input_sample", False))):
        raise ValueError(f"the {name} must be an SD-1.5-style UNet2DConditionModel (no class/added embeddings, "
                         "no encoder projection, no input centring)")
    if unet.mid_block is None:
        raise ValueError(f"the {name} has no mid block: the realism classifier reads it")


class DMDGuidance(nn.Module):
    """The stage-II guidance model (§10.2): real and fake score UNets plus the realism classifier.

    Args:
        real_unet: the frozen teacher score UNet (SD-1.5); kept frozen here, in its own dtype
            (bf16 for training as the authors store it; float32 is the exact definition).
        fake_unet: the trained score UNet; None = a copy of ``real_unet`` in float32 (§10.2:
            both start from the same weights).
        alphas_cumprod: ᾱ of the noise schedule (1000 values, float32).
        guidance_scale: CFG scale of the real score (1.75).
        classifier: the realism branch; None = :func:`classifier_branch` of the mid-block width.
    """

    def __init__(self, real_unet: nn.Module, fake_unet: nn.Module | None = None, *, alphas_cumprod: Tensor,
                 guidance_scale: float = REAL_GUIDANCE_SCALE, classifier: nn.Module | None = None) -> None:
        super().__init__()
        _check_plain_unet(real_unet, "real UNet")
        if fake_unet is None:
            fake_unet = copy.deepcopy(real_unet).float()
        _check_plain_unet(fake_unet, "fake UNet")
        if real_unet.config.in_channels != fake_unet.config.in_channels:
            raise ValueError("the real and fake UNets must take the same latent channels")
        self.real_unet = real_unet
        self.fake_unet = fake_unet
        width = int(fake_unet.config.block_out_channels[-1])
        if classifier is None:
            device = fake_unet.conv_in.weight.device
            classifier = classifier_branch(width).to(device)
        self.cls_pred_branch = classifier
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone())
        self.guidance_scale = float(guidance_scale)
        self.real_unet.requires_grad_(False)
        self.real_unet.eval()

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "DMDGuidance":
        super().train(mode)
        self.real_unet.eval()  # frozen teacher (no dropout in SD-1.5, but say it)
        return self

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the UNets take."""
        return int(self.fake_unet.config.in_channels)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the fake UNet's activations in backward (the real UNet never keeps a graph)."""
        self.fake_unet.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ noise
    def noised(self, latents: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        """The latents noised to ``timesteps`` (float32, differentiable w.r.t. ``latents``)."""
        return add_noise(latents, noise, timesteps, self.alphas_cumprod)

    def real_epsilon(self, noisy: Tensor, timesteps: Tensor, text_embedding: Tensor,
                     uncond_embedding: Tensor) -> Tensor:
        """The CFG noise prediction of the real UNet: ε(∅) + s·(ε(text) − ε(∅)), in the real UNet's dtype.

        One batched call on ``[∅; text]`` as the authors make it.
        """
        dtype = self.real_unet.conv_in.weight.dtype
        batch = noisy.shape[0]
        prediction = self.real_unet(torch.cat([noisy, noisy]).to(dtype), torch.cat([timesteps, timesteps]),
                                    encoder_hidden_states=torch.cat([uncond_embedding, text_embedding]).to(dtype)).sample
        uncond, text = prediction[:batch], prediction[batch:]
        return uncond + self.guidance_scale * (text - uncond)

    def fake_epsilon(self, noisy: Tensor, timesteps: Tensor, text_embedding: Tensor) -> Tensor:
        """The fake UNet's noise prediction, text-conditioned, without CFG (float32)."""
        dtype = self.fake_unet.conv_in.weight.dtype
        return self.fake_unet(noisy.to(dtype), timesteps, encoder_hidden_states=text_embedding.to(dtype)).sample.float()

    # ------------------------------------------------------------------ the three losses' parts
    def distribution_matching_loss(self, latents: Tensor, text_embedding: Tensor, uncond_embedding: Tensor, *,
                                   timesteps: Tensor, noise: Tensor) -> DMLoss:
        """(DM loss, normalised direction g) of §10.2 for generated ``latents`` (B, C, h, w).

        The scores are evaluated without gradients; the loss 0.5·mean((x − sg(x − g))²) over all
        B·C·h·w elements is differentiable w.r.t. ``latents`` when they require grad (then
        ``loss.backward()`` gives ∂loss/∂x = g/(B·C·h·w)). ``g`` is float64.
        """
        with torch.no_grad():
            x = latents.detach()
            noisy = self.noised(x, timesteps, noise)
            x0_fake = x0_from_epsilon(noisy, self.fake_epsilon(noisy, timesteps, text_embedding),
                                      self.alphas_cumprod, timesteps)
            x0_real = x0_from_epsilon(noisy, self.real_epsilon(noisy, timesteps, text_embedding, uncond_embedding),
                                      self.alphas_cumprod, timesteps)
            p_real = x - x0_real
            p_fake = x - x0_fake
            grad = (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
            grad = torch.nan_to_num(grad)
            target = (x - grad).float()
        loss = 0.5 * F.mse_loss(latents.float(), target, reduction="mean")
        return DMLoss(loss, grad)

    def fake_denoising_loss(self, latents: Tensor, text_embedding: Tensor, *, timesteps: Tensor,
                            noise: Tensor) -> Tensor:
        """mean((ε_fake(x_t) − n)²) on DETACHED ``latents``: trains the fake score only."""
        noisy = self.noised(latents.detach(), timesteps, noise)
        epsilon = self.fake_epsilon(noisy, timesteps, text_embedding)
        return torch.mean((epsilon - noise.float()) ** 2)

    def realism_logits(self, latents: Tensor, text_embedding: Tensor, *, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Realism logits of ``latents`` noised to ``timesteps`` (NOT detached: gradients reach them).

        The fake UNet's encoder half (text-conditioned, same t) gives the mid-block map, and the
        classifier branch maps it to logits: (B, 1) when the map reduces to 1×1 (64×64 latents of
        SD-1.5), else a (B, 1, h', w') grid. Latents must be at least 8·2^(down blocks − 1) wide.
        """
        noisy = self.noised(latents, timesteps, noise)
        dtype = self.fake_unet.conv_in.weight.dtype
        features = unet_mid_block_output(self.fake_unet, noisy.to(dtype), timesteps, text_embedding.to(dtype))
        logits = self.cls_pred_branch(features.float())
        return logits.squeeze(dim=[2, 3]) if logits.shape[-2:] == (1, 1) else logits


def build_guidance(unet_config: Mapping[str, Any], *, alphas_cumprod: Tensor, real_pretrained: str | None = None,
                   fake_pretrained: str | None = None, real_dtype: torch.dtype = torch.float32,
                   guidance_scale: float = REAL_GUIDANCE_SCALE, seed: int = 0, gradient_checkpointing: bool = False,
                   device: str | torch.device | None = None) -> DMDGuidance:
    """Build the guidance model: the real UNet from ``real_pretrained`` (diffusers dir or state-dict file
    of ``unet_config``) or random from ``seed``; the fake UNet a float32 copy of it, or from
    ``fake_pretrained``; the classifier drawn from ``seed``. The global RNG is untouched;
    ``device="meta"`` builds shapes only."""
    from diffusers import UNet2DConditionModel

    from onedc.modules.unet import load_unet

    meta = str(device) == "meta"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if real_pretrained is not None and not meta:
            real = load_unet(real_pretrained, unet_config, what="the real score UNet (guidance.real_pretrained)",
                             setting="guidance.real_pretrained")
        elif meta:
            with torch.device("meta"):
                real = UNet2DConditionModel(**dict(unet_config))
        else:
            real = UNet2DConditionModel(**dict(unet_config))
        fake = None
        if fake_pretrained is not None and not meta:
            fake = load_unet(fake_pretrained, unet_config, what="the fake score UNet (guidance.fake_pretrained)",
                             setting="guidance.fake_pretrained").float()
        if meta:
            with torch.device("meta"):
                guidance = DMDGuidance(real, fake, alphas_cumprod=alphas_cumprod, guidance_scale=guidance_scale)
        else:
            guidance = DMDGuidance(real, fake, alphas_cumprod=alphas_cumprod, guidance_scale=guidance_scale)
    if guidance.real_unet.conv_in.weight.dtype != real_dtype:
        guidance.real_unet.to(dtype=real_dtype)
    if gradient_checkpointing:
        guidance.enable_gradient_checkpointing()
    if device is not None and not meta:
        guidance.to(device)
    return guidance
