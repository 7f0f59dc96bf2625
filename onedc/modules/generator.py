"""The one-step generator of OneDC (Xue et al., NeurIPS 2025, §3.2): a diffusion UNet run ONCE.

::

    features (B, gs, H/8, W/8) ─┬─ new conv_in ─ UNet2DConditionModel(t = T, context = tokens) ─> pred
    (g_s output of the codec)   └─ to_xt (1x1 or 3x3) ─> x_t (B, C_vae, H/8, W/8)
    tokens (B, L, d_cross) ─────── cross-attention context (replaces the text embedding)

    x0 = (x_t - sqrt(1 - ᾱ_T)·ε) / sqrt(ᾱ_T)        prediction_type = epsilon
    x0 = sqrt(ᾱ_T)·x_t - sqrt(1 - ᾱ_T)·v            prediction_type = v_prediction
    x0 = pred                                        prediction_type = sample

The UNet is a diffusers ``UNet2DConditionModel`` (reference: the SD-1.5 layout initialised from a
one-step-distilled DMD2 checkpoint) whose ``conv_in`` is replaced by a new convolution from the
codec's g_s features. ᾱ_T comes from a diffusers ``DDPMScheduler`` config, so the conversion
matches the schedule the pretrained UNet was trained with.

What is the "noisy sample" x_t? In OneDC the UNet input is the codec features, not a noisy
latent, yet the ε/v → x0 conversions need one. We define x_t as a learned 1x1 projection of the
features to the latent channels (``to_xt``): the generator then has a skip path in latent space
(x0 = x_t/sqrt(ᾱ) + UNet correction), and a pretrained ε-predicting UNet keeps its meaning
("remove the noise from x_t"). ``to_xt`` and ``conv_in`` are new layers and always train, LoRA
or not.

A generator trained from scratch (the tiny preset) can start from the codec's own light latent
reconstruction instead of noise: :meth:`OneStepGenerator.start_from_latent_head` copies the
codec's stage-1 latent head into ``to_xt`` (scaled so that a zero prediction gives exactly that
reconstruction) and zeroes the UNet's ``conv_out``. At T = 999 an ε-prediction is multiplied by
sqrt(1-ᾱ)/sqrt(ᾱ) ≈ 14.6 on its way to x0, so a random UNet starts 30-50x worse than predicting
zero; started this way it can only learn a correction (measured on the tiny preset, 200 latent
steps: validation latent MSE 55 -> 0.71 from random, 0.314 -> 0.279 from the light head).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from onedc.errors import WeightsError
from onedc.modules.unet import load_unet

log = logging.getLogger("onedc")

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Parameters that are new in OneStepGenerator (not in any pretrained UNet): they train even under LoRA.
NEW_LAYERS = ("unet.conv_in.", "to_xt.")


class OneStepGenerator(nn.Module):
    """g_s features + semantic tokens -> clean scaled VAE latent, with one UNet evaluation.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (pretrained or random); its ``conv_in`` is
            replaced by a new conv from ``gs_channels`` to ``block_out_channels[0]``.
        gs_channels: width of the codec's g_s features (the new ``conv_in`` input).
        scheduler_config: ``DDPMScheduler`` kwargs; its ``alphas_cumprod`` convert the
            prediction to x0 (and ``multi_step`` builds a DDIM scheduler from it).
        timestep: the fixed diffusion timestep T of the single step.
        prediction_type: what the UNet predicts: ``epsilon``, ``v_prediction`` or ``sample``.
        token_dim: width of the codec tokens; must equal ``unet.config.cross_attention_dim``.
        xt_kernel_size: kernel of ``to_xt`` (1, or 3 to match the codec's 3x3 latent head for
            :meth:`start_from_latent_head`).
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        gs_channels: int,
        scheduler_config: Mapping[str, Any] | None = None,
        timestep: int = 999,
        prediction_type: str = "epsilon",
        token_dim: int | None = None,
        xt_kernel_size: int = 1,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{prediction_type}'")
        self.cross_attention_dim = int(unet.config.cross_attention_dim)
        if token_dim is not None and int(token_dim) != self.cross_attention_dim:
            raise ValueError(
                f"the codec's tokens are {token_dim}-d but the UNet's cross-attention expects "
                f"{self.cross_attention_dim}-d context: set the codec's token_dim to {self.cross_attention_dim} "
                "(or use a UNet whose cross_attention_dim matches)"
            )
        scheduler = DDPMScheduler(**dict(scheduler_config or {}))
        num_train = int(scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < num_train:
            raise ValueError(f"timestep must be in [0, {num_train - 1}] for this scheduler, got {timestep}")
        self.scheduler_config = dict(scheduler.config)
        self.timestep = int(timestep)
        self.prediction_type = prediction_type
        self.gs_channels = int(gs_channels)
        self.latent_channels = int(unet.config.out_channels)

        self.unet = unet
        width = int(unet.config.block_out_channels[0])
        old = unet.conv_in
        unet.conv_in = nn.Conv2d(gs_channels, width, kernel_size=old.kernel_size, padding=old.padding,
                                 device=old.weight.device, dtype=old.weight.dtype)
        # Keep the UNet's own config truthful: save_pretrained of this UNet must describe its conv_in.
        unet.register_to_config(in_channels=int(gs_channels))
        if int(xt_kernel_size) not in (1, 3):
            raise ValueError(f"xt_kernel_size must be 1 or 3, got {xt_kernel_size}")
        self.to_xt = nn.Conv2d(gs_channels, self.latent_channels, kernel_size=int(xt_kernel_size),
                               padding=int(xt_kernel_size) // 2, device=old.weight.device, dtype=old.weight.dtype)
        # Derived from the scheduler config, so not persistent: checkpoints hold weights only.
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(torch.float32).clone(), persistent=False)

    # ------------------------------------------------------------------ configuration
    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str], dropout: float = 0.0) -> None:
        """Attach a LoRA adapter to the UNet via diffusers' peft integration.

        peft freezes every base weight of the UNet; the new ``conv_in`` and ``to_xt`` have no
        pretrained value and are re-enabled. LoRA B matrices start at zero (``gaussian`` init
        draws A only), so the adapter does not change the output at step 0.
        """
        from peft import LoraConfig

        config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(target_modules),
                            lora_dropout=float(dropout), init_lora_weights="gaussian")
        self.unet.add_adapter(config)
        self.unet.conv_in.requires_grad_(True)
        self.to_xt.requires_grad_(True)

    @torch.no_grad()
    def start_from_latent_head(self, head: nn.Conv2d) -> None:
        """Start from the codec's light latent reconstruction: x0 = ``head(features)`` at step 0.

        ``to_xt`` becomes ``head`` scaled by sqrt(ᾱ_T) (ε-prediction) or 1/sqrt(ᾱ_T)
        (v-prediction), and the UNet's ``conv_out`` is zeroed, so the prediction is 0 and x0 equals
        the head's output; training then learns the UNet's correction (the module docstring says
        why). ``head`` must have ``to_xt``'s shape.
        """
        if self.prediction_type == "sample":
            raise ValueError("start_from_latent_head needs prediction_type epsilon or v_prediction: with "
                             "'sample' the UNet output is x0 itself and x_t plays no part")
        if head.weight.shape != self.to_xt.weight.shape or head.padding != self.to_xt.padding:
            raise ValueError(f"the latent head has weight {tuple(head.weight.shape)} (padding {head.padding}) but "
                             f"to_xt has {tuple(self.to_xt.weight.shape)} (padding {self.to_xt.padding}): set "
                             f"model.generator.xt_kernel_size to {head.kernel_size[0]}")
        alpha = self.alphas_cumprod[self.timestep].double()
        scale = float(alpha.sqrt() if self.prediction_type == "epsilon" else 1.0 / alpha.sqrt())
        self.to_xt.weight.copy_(head.weight * scale)
        self.to_xt.bias.copy_(head.bias * scale if head.bias is not None else 0.0)
        self.unet.conv_out.weight.zero_()
        if self.unet.conv_out.bias is not None:
            self.unet.conv_out.bias.zero_()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in the UNet (recompute activations in backward)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ the step
    def prediction_to_x0(self, prediction: Tensor, x_t: Tensor, timestep: int | None = None) -> Tensor:
        """Turn the UNet output at ``timestep`` (default: the fixed T) into the clean latent x0."""
        t = self.timestep if timestep is None else int(timestep)
        alpha = self.alphas_cumprod[t].to(prediction.dtype)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
        if self.prediction_type == "v_prediction":
            return alpha.sqrt() * x_t - (1 - alpha).sqrt() * prediction
        return prediction

    def _check_context(self, features: Tensor, tokens: Tensor) -> None:
        if tokens.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"tokens are {tokens.shape[-1]}-d, the UNet's cross-attention expects "
                             f"{self.cross_attention_dim}-d context (codec token_dim must match)")
        if features.shape[1] != self.gs_channels:
            raise ValueError(f"features have {features.shape[1]} channels, conv_in expects {self.gs_channels}")

    def _unet(self, features: Tensor, timestep: int | Tensor, tokens: Tensor) -> Tensor:
        # The UNet runs in its weights' dtype (bf16 after a fast-decode cast); its prediction comes
        # back float32 so the x0 step keeps its own precision (float64 in the reference generator).
        dtype = self.unet.conv_in.weight.dtype
        t = torch.as_tensor(timestep, device=features.device).long().reshape(-1).expand(features.shape[0])
        out = self.unet(features.to(dtype), t, encoder_hidden_states=tokens.to(dtype)).sample
        return out if dtype == features.dtype else out.float()

    def forward(self, features: Tensor, tokens: Tensor) -> Tensor:
        """(g_s features (B,gs,h,w), tokens (B,L,d)) -> clean scaled VAE latent (B,C_vae,h,w)."""
        self._check_context(features, tokens)
        x_t = self.to_xt(features)
        return self.prediction_to_x0(self._unet(features, self.timestep, tokens), x_t)

    @torch.no_grad()
    def multi_step(self, features: Tensor, tokens: Tensor, steps: int, scheduler_name: str = "ddim") -> Tensor:
        """Multi-step decoding baseline: a diffusers scheduler from x_t at T down to 0.

        A *compute* baseline for the speed comparison, not a second trained sampler: the
        UNet's ``conv_in`` input stays the codec features at every step (the UNet has no input
        slot for the evolving sample), only the timestep changes, and the scheduler (DDIM,
        deterministic, eta=0, built from the same alphas) updates x_t from each prediction.
        With T = the last training timestep (999) and ``steps=1`` it equals :meth:`forward`.
        For a smaller T the schedule is truncated img2img-style: it starts at the schedule's
        nearest timestep <= T.
        """
        if scheduler_name != "ddim":
            raise ValueError(f"unknown multi-step scheduler '{scheduler_name}' (supported: ddim)")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self._check_context(features, tokens)
        scheduler, timesteps = self.baseline_schedule(steps)
        sample = self.to_xt(features)
        for t in timesteps:
            sample = scheduler.step(self._unet(features, t, tokens), int(t), sample).prev_sample
        return sample

    def baseline_schedule(self, steps: int) -> tuple[Any, list[int]]:
        """The DDIM scheduler and the ``steps`` timesteps (from <= T down) of :meth:`multi_step`."""
        from diffusers import DDIMScheduler

        num_train = int(self.scheduler_config["num_train_timesteps"])
        # trailing spacing puts the first step at num_train-1 (= T in the reference); the last
        # step lands on ᾱ = 1 (set_alpha_to_one) so the result is a clean latent. Latents are not
        # bounded to [-1, 1]: no clipping.
        scheduler = DDIMScheduler.from_config(self.scheduler_config, prediction_type=self.prediction_type,
                                              timestep_spacing="trailing", set_alpha_to_one=True,
                                              clip_sample=False, thresholding=False)
        total = steps if self.timestep == num_train - 1 else -(-steps * num_train // (self.timestep + 1))
        scheduler.set_timesteps(min(total, num_train))
        timesteps = [int(t) for t in scheduler.timesteps if int(t) <= self.timestep][:steps]
        return scheduler, timesteps


def build_generator(
    *,
    gs_channels: int,
    token_dim: int | None = None,
    pretrained: str | Path | None = None,
    unet_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    timestep: int = 999,
    prediction_type: str = "epsilon",
    scheduler_config: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    xt_kernel_size: int = 1,
    device: str | torch.device | None = None,
) -> OneStepGenerator:
    """Build the one-step generator from a local diffusers UNet dir or random weights.

    ``pretrained`` is a ``UNet2DConditionModel.save_pretrained`` directory (or an SD model dir
    with a ``unet/`` subfolder), or a UNet state-dict file (``.bin``/``.pt``/``.safetensors``,
    e.g. DMD2's SD-1.5 ``pytorch_model.bin``) of the UNet that ``unet_config`` describes, loaded
    strictly; with ``pretrained=None`` the UNet comes from ``unet_config``
    (diffusers kwargs) with weights drawn from ``seed``. The new ``conv_in`` and ``to_xt`` are
    drawn from ``seed`` in a separate forked RNG, so they are the same whether the UNet was
    loaded or drawn and the global RNG is untouched. ``lora`` = ``{rank, alpha, target_modules
    [, dropout]}`` attaches a LoRA adapter (base UNet frozen); ``device="meta"`` builds shapes
    only (parameter counting).
    """
    from diffusers import UNet2DConditionModel

    meta = str(device) == "meta"
    if pretrained is not None:
        unet = load_unet(pretrained, unet_config, what="the generator UNet (model.generator.unet)")
    elif unet_config is None:
        raise WeightsError("build_generator needs `pretrained` (a local UNet dir) or a `unet_config`")
    elif meta:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**dict(unet_config))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**dict(unet_config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = OneStepGenerator(unet, gs_channels=gs_channels, scheduler_config=scheduler_config,
                                     timestep=timestep, prediction_type=prediction_type, token_dim=token_dim,
                                     xt_kernel_size=xt_kernel_size)
        if lora:
            generator.add_lora(int(lora["rank"]), float(lora.get("alpha", lora["rank"])),
                               list(lora["target_modules"]), float(lora.get("dropout", 0.0)))
    if gradient_checkpointing:
        generator.enable_gradient_checkpointing(True)
    if device is not None and not meta:
        generator.to(device)
    return generator
