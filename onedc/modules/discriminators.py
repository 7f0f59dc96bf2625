"""GAN critics of the finetune stage: a diffusion-GAN critic on noised latents, and a pixel PatchGAN.

Both map a batch to *patch logits* ``(B, 1, h, w)`` (real > 0) and expose the same two calls:

* ``draw(x, generator=None) -> dict``: the random inputs of one evaluation (timesteps and noise
  for the diffusion critic, nothing for the PatchGAN), so that a caller can evaluate the critic
  twice on the same draw (the finetune stage's generator and critic terms, the equivalence test);
* ``forward(x, **draw) -> logits``.

``input_domain`` says what the critic looks at: ``"latent"`` (the scaled VAE latent v / v̂) or
``"pixel"`` (images in [-1, 1]). Neither has batch-statistics buffers (GroupNorm, no BatchNorm):
the critic's output depends only on its parameters and input, which the single-optimizer GAN
update (the critic called functionally with detached parameters) relies on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from onedc.errors import WeightsError
from onedc.modules.blocks import group_norm
from onedc.modules.unet import UNET_CLASSES, load_unet



class DiffusionDiscriminator(nn.Module):
    """Diffusion-GAN critic (the OneDC reference design): the encoder half of a diffusion UNet
    plus a conv head, applied to latents noised to a random timestep.

    ::

        v (B,C,h,w) ─ DDPMScheduler.add_noise(v, ε, t),  t ~ U{t_min..t_max} per sample
                    ─ conv_in ─ down blocks ─ mid block ─ head (GN, SiLU, conv3x3, SiLU, conv1x1) ─> logits
        t ─ time_proj ─ time_embedding ─────┘   (cross-attention blocks see a learned null context)

    Noising both real and generated latents (Diffusion-GAN, Wang et al. 2023) makes the two
    distributions overlap, which keeps the critic's gradients informative; with a pretrained
    UNet (e.g. the SD UNet) the critic starts from features that already understand noised latents.
    The up blocks and ``conv_out`` of the UNet are dropped.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (random or pretrained);
            its ``in_channels`` must be the latent channels.
        scheduler_config: ``DDPMScheduler`` kwargs (the noise schedule of ``add_noise``).
        t_min, t_max: the range of the random timesteps (inclusive).
        null_context_tokens: length of the learned context of cross-attention UNets.
    """

    input_domain = "latent"

    def __init__(self, unet: nn.Module, *, scheduler_config: Mapping[str, Any] | None = None, t_min: int = 0,
                 t_max: int = 999, null_context_tokens: int = 1) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        name = type(unet).__name__
        if name not in UNET_CLASSES:
            raise ValueError(f"the diffusion critic needs one of {UNET_CLASSES}, got {name}")
        config = unet.config
        if getattr(unet, "class_embedding", None) is not None or getattr(unet, "add_embedding", None) is not None:
            raise ValueError("the diffusion critic supports UNets without class/added embeddings (no SDXL-style UNets)")
        if unet.mid_block is None:
            raise ValueError("the diffusion critic reads the UNet's mid block: build the UNet with a mid block")
        if any(hasattr(block, "skip_conv") for block in unet.down_blocks):
            raise ValueError("skip down blocks (AttnSkipDownBlock2D, SkipDownBlock2D) are not supported")
        self.scheduler = DDPMScheduler(**dict(scheduler_config or {}))
        num_train = int(self.scheduler.config.num_train_timesteps)
        if not 0 <= int(t_min) <= int(t_max) < num_train:
            raise ValueError(f"need 0 <= t_min <= t_max < {num_train}, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.in_channels = int(config.in_channels)
        self.unet_class = name

        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        width = int(config.block_out_channels[-1])
        self.head = nn.Sequential(
            group_norm(width, eps=1e-5), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 1, 1),
        )
        cross_dim = getattr(config, "cross_attention_dim", None)
        self.null_context = (nn.Parameter(torch.zeros(1, int(null_context_tokens), int(cross_dim)))
                             if name == "UNet2DConditionModel" else None)

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random timesteps (B,) and noise (like ``x``) for one evaluation on ``x``."""
        timesteps = torch.randint(self.t_min, self.t_max + 1, (x.shape[0],), device=x.device, generator=generator)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return {"timesteps": timesteps, "noise": noise}

    def forward(self, x: Tensor, timesteps: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Latent (B,C,h,w) -> patch logits (B,1,h',w'); draws t and ε when not given."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the critic expects {self.in_channels}-channel latents, got {x.shape[1]}")
        if timesteps is None or noise is None:
            draw = self.draw(x)
            timesteps = draw["timesteps"] if timesteps is None else timesteps
            noise = draw["noise"] if noise is None else noise
        sample = self.scheduler.add_noise(x, noise.to(x.dtype), timesteps)
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        context = None
        if self.null_context is not None:
            context = self.null_context.expand(x.shape[0], -1, -1)
        sample = self.conv_in(sample.to(dtype))
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, encoder_hidden_states=context)
        else:
            sample = self.mid_block(sample, emb)
        return self.head(sample).float()


class PatchDiscriminator(nn.Module):
    """Pixel PatchGAN critic (pix2pix / taming's ``NLayerDiscriminator``) with GroupNorm.

    ::

        x (B,3,H,W) ─ conv4x4/2, LReLU ─ [conv4x4/2, GN, LReLU] x (layers-1) ─ conv4x4/1, GN, LReLU ─ conv4x4/1 ─> logits

    Each logit sees a ``70x70`` patch for ``layers=3`` (the classic setting). GroupNorm replaces
    BatchNorm: no running statistics, and the same behaviour under DDP without SyncBN.

    Args:
        in_channels: image channels.
        channels: width of the first layer (doubles per layer, capped at 8x).
        layers: number of stride-2 convolutions.
    """

    input_domain = "pixel"

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), group_norm(out, eps=1e-5), nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.in_channels = int(in_channels)

    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Nothing random: an empty draw."""
        return {}

    def forward(self, x: Tensor) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> patch logits (B,1,h,w)."""
        return self.net(x).float()


def build_diffusion_discriminator(*, latent_channels: int, unet_class: str = "UNet2DModel",
                                  unet_config: Mapping[str, Any] | None = None, pretrained: str | Path | None = None,
                                  scheduler_config: Mapping[str, Any] | None = None, t_min: int = 0,
                                  t_max: int = 999, seed: int = 0) -> DiffusionDiscriminator:
    """The diffusion critic from a local diffusers UNet dir (encoder half reused) or random weights.

    ``pretrained`` wins over ``unet_class``/``unet_config`` (its ``config.json`` names the class).
    Random weights (UNet and head) are drawn from ``seed`` without touching the global RNG.
    """
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretrained is not None:
            unet = load_unet(pretrained, classes=UNET_CLASSES, what="the critic's UNet", setting="discriminator.pretrained")
        else:
            if unet_class not in UNET_CLASSES:
                raise ValueError(f"unet_class must be one of {UNET_CLASSES}, got '{unet_class}'")
            kwargs = dict(unet_config or {})
            kwargs["in_channels"] = int(latent_channels)
            unet = getattr(diffusers, unet_class)(**kwargs)
        if int(unet.config.in_channels) != int(latent_channels):
            raise WeightsError(f"the critic UNet takes {unet.config.in_channels} channels but the VAE latent has "
                               f"{latent_channels}")
        return DiffusionDiscriminator(unet, scheduler_config=scheduler_config, t_min=t_min, t_max=t_max)


def build_patch_discriminator(*, in_channels: int = 3, channels: int = 64, layers: int = 3,
                              seed: int = 0) -> PatchDiscriminator:
    """A PatchGAN critic with weights drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PatchDiscriminator(in_channels=in_channels, channels=channels, layers=layers)
