"""The published OneDC generator ("feedforward model", docs/reference-model.md §5), weight-compatible with ``model.safetensors``.

::

    F (B, 320, H/8, W/8) ─┬─ vae_reduction (GN·SiLU·3x3·GN·SiLU·3x3 + 1x1 shortcut) ─> x_t (B, 4, H/8, W/8)
    (g_s output)          └─ conv_in' 3x3 ─ SD-1.5 UNet (t = 999, context = S tokens) ─> ε
    x0 = (x_t − √(1−ᾱ₉₉₉)·ε) / √ᾱ₉₉₉      in float64, ᾱ from SD-1.5's scaled_linear schedule

The UNet is the diffusers SD-1.5 ``UNet2DConditionModel`` with a peft LoRA (r 64, α 8, so the
adapter output is scaled by 0.125) on the 14 target module types of §5.1, left unmerged like the
released file. :class:`ReferenceGenerator` is an :class:`~onedc.modules.generator.OneStepGenerator`
whose x_t head (``to_xt``) is the ``vae_reduction`` block and whose ε→x0 step runs in float64, so
the rest of onedc (training stages, multi-step baseline, inference) drives it unchanged.

Key layout: the module's state dict is ``unet.<k>`` + ``to_xt.<k>``; the released file is the
bare UNet keys ``<k>`` + ``vae_reduction.<k>``; ``onedc.families.reference.released`` translates
between the two (1252 keys both ways), like every other conversion of the released files.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from onedc.modules.generator import OneStepGenerator

# SD-1.5 UNet2DConditionModel (runwayml/stable-diffusion-v1-5, unet/config.json), §5.1 item 1.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}
# Only ᾱ is used (§5.3): betas = linspace(√β0, √β1, 1000, float32)², ᾱ = cumprod(1 − β) in float32.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
# peft target suffixes of §5.1 item 2 (278 wrapped modules at full size); conv_in stays plain.
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
LORA_RANK = 64
LORA_ALPHA = 8.0
LORA_ADAPTER = "default"
REFERENCE_TIMESTEP = 999
# Released-file prefix of the x_t head and its attribute in OneStepGenerator.
RELEASED_XT_PREFIX = "vae_reduction."
MODULE_XT_PREFIX = "to_xt."
MODULE_UNET_PREFIX = "unet."


class VAEReduction(nn.Module):
    """g_s features -> x_t (§5.1 item 4): ``blocks(F) + short_cut(F)``.

    ``blocks`` = GN(32, 1e-6), SiLU, 3x3 C→C, GN(32, 1e-6), SiLU, 3x3 C→latent; ``short_cut`` =
    1x1 C→latent. The Sequential indices (0, 2, 3, 5 hold weights) give the released key names.
    """

    def __init__(self, channels: int = 320, latent_channels: int = 4, groups: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=1e-6), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels, eps=1e-6), nn.SiLU(), nn.Conv2d(channels, latent_channels, 3, padding=1),
        )
        self.short_cut = nn.Conv2d(channels, latent_channels, 1)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, latent, h, w)."""
        return self.blocks(features) + self.short_cut(features)


def epsilon_to_x0_float64(epsilon: Tensor, x_t: Tensor, alpha_cumprod: Tensor | float) -> Tensor:
    """x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ with x_t, ε and ᾱ cast to float64, returned as float32 (§5.3).

    At t = 999 the factors are ≈ 14.6, so rounding ε or x_t in bf16/fp32 arithmetic would be
    amplified ~15×; in float64 the only rounding left is the final cast.
    """
    alpha = torch.as_tensor(alpha_cumprod).to(device=x_t.device, dtype=torch.float64)
    x0 = (x_t.double() - (1.0 - alpha).sqrt() * epsilon.double()) / alpha.sqrt()
    return x0.float()


class ReferenceGenerator(OneStepGenerator):
    """The §5 generator: a :class:`OneStepGenerator` with ``vae_reduction`` as x_t and a float64 x0.

    Args:
        unet: an SD-1.5-layout ``UNet2DConditionModel`` (its ``conv_in`` is replaced by a fresh
            ``gs_channels`` → 320 3x3 conv, as in the reference).
        gs_channels: width of the codec's g_s features (320 in the reference).
        lora: attach the reference LoRA (adapter ``default``, B = 0 at init); ``False`` for a
            UNet whose LoRA was merged into the base weights (:func:`merge_lora_state_dict`).
        lora_rank, lora_alpha: r and α; the reference has 64 and 8 (scale α/r = 0.125). Tests use
            a smaller r with the same scale.
    """

    def __init__(self, unet: nn.Module, *, gs_channels: int = 320, lora: bool = True,
                 lora_rank: int = LORA_RANK, lora_alpha: float = LORA_ALPHA,
                 scheduler_config: Mapping[str, Any] | None = None) -> None:
        schedule = dict(scheduler_config or SD15_SCHEDULER_CONFIG)
        super().__init__(unet, gs_channels=gs_channels, scheduler_config=schedule, timestep=REFERENCE_TIMESTEP,
                         prediction_type="epsilon")
        weight = unet.conv_in.weight
        groups = int(unet.config.norm_num_groups)
        self.to_xt = VAEReduction(gs_channels, self.latent_channels, groups).to(device=weight.device,
                                                                               dtype=weight.dtype)
        # ᾱ is derived, not loaded: keep it real even when built on the meta device, so a meta
        # build that takes its weights by load_state_dict(assign=True) runs without a fix-up.
        from diffusers import DDPMScheduler

        with torch.device("cpu"):
            alphas = DDPMScheduler(**schedule).alphas_cumprod.to(torch.float32)
        self.register_buffer("alphas_cumprod", alphas.clone(), persistent=False)
        if lora:
            self.add_reference_lora(lora_rank, lora_alpha)

    def add_reference_lora(self, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> None:
        """Wrap the 14 target types with peft LoRA as the reference does (default init: B = 0).

        peft's default init (Kaiming-uniform A, zero B) is the one the reference trains from;
        the base UNet is frozen, the new ``conv_in`` and ``vae_reduction`` stay trainable.
        """
        from peft import LoraConfig

        config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(LORA_TARGETS),
                            lora_dropout=0.0, init_lora_weights=True)
        self.unet.add_adapter(config, adapter_name=LORA_ADAPTER)
        self.unet.conv_in.requires_grad_(True)
        self.to_xt.requires_grad_(True)

    def prediction_to_x0(self, prediction: Tensor, x_t: Tensor, timestep: int | None = None) -> Tensor:
        """ε at ``timestep`` (default 999) -> x0 by :func:`epsilon_to_x0_float64` (float32 out)."""
        t = self.timestep if timestep is None else int(timestep)
        return epsilon_to_x0_float64(prediction, x_t, self.alphas_cumprod[t])


def build_reference_generator(*, unet_config: Mapping[str, Any] | None = None, gs_channels: int = 320,
                              lora: bool = True, lora_rank: int = LORA_RANK, lora_alpha: float = LORA_ALPHA,
                              seed: int = 0, gradient_checkpointing: bool = False, pretrained: str | None = None,
                              device: str | torch.device | None = None) -> ReferenceGenerator:
    """Build the §5 generator with random weights (the released file supplies real ones).

    ``unet_config`` (diffusers kwargs) defaults to :data:`SD15_UNET_CONFIG`; a smaller one keeps
    the layout for tests. Weights are drawn from ``seed`` in a forked RNG (the global RNG is
    untouched); ``device="meta"`` builds shapes only (parameter counts, key lists).
    ``pretrained`` loads the UNet first, before the new conv_in and the LoRA, as the reference's
    stage I loads DMD2's one-step SD-1.5 UNet (§10.1): a UNet state-dict file of ``unet_config``
    (e.g. DMD2's ``pytorch_model.bin``, strict) or a diffusers UNet dir, read by
    :func:`onedc.modules.generator.build_generator`'s loader; conv_in, vae_reduction and LoRA A
    are still drawn from ``seed``. ``gradient_checkpointing`` recomputes UNet activations in backward.
    """
    from diffusers import UNet2DConditionModel

    config = dict(unet_config or SD15_UNET_CONFIG)
    meta = str(device) == "meta"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretrained is not None and not meta:
            from onedc.modules.unet import load_unet

            unet = load_unet(pretrained, config, what="the generator UNet (model.generator.unet)")
            generator = ReferenceGenerator(unet, gs_channels=gs_channels, lora=lora, lora_rank=lora_rank,
                                           lora_alpha=lora_alpha)
        elif meta:
            with torch.device("meta"):
                unet = UNet2DConditionModel(**config)
                generator = ReferenceGenerator(unet, gs_channels=gs_channels, lora=lora, lora_rank=lora_rank,
                                               lora_alpha=lora_alpha)
        else:
            unet = UNet2DConditionModel(**config)
            generator = ReferenceGenerator(unet, gs_channels=gs_channels, lora=lora, lora_rank=lora_rank,
                                           lora_alpha=lora_alpha)
    if gradient_checkpointing:
        generator.enable_gradient_checkpointing(True)
    if device is not None and not meta:
        generator.to(device)
    return generator
