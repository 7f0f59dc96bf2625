"""Analysis transform g_a of the reference codec (docs/reference-model.md §4.1), keys ``enc.*``.

::

    x (3, 1)  --pix_emb 8x8/8-->  192 @1/8 ┐
    v (4, 1/8) ─────────────────────────────┴─[pix, v]─ pix_fusion 1x1 ─> 320 @1/8
      ─> UNet2DModel trunk (t = 999; conv_in = 3 RB* + 3x3 s2) ─> y0 512 @1/16, sem 768 @1/64
    y0 ─> trans_coding: RB*, Attn*, RB*, DCB, DCB(→128) ─> y 128 @1/16

The trunk is a diffusers ``UNet2DModel`` whose ``conv_in`` is swapped for the stem, so its
state-dict keys are diffusers' own (``enc.unet.down_blocks.0.attentions.0.to_q.weight`` ...).
Its forward is the standard ``UNet2DModel`` forward, re-stated in :func:`unet_trunk_forward`
only to also return the mid-block output ``sem``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from onedc.modules.blocks import ConvSelfAttention, DepthConvBlock, VQGANResnetBlock, conv_down

#: The trunk runs at this fixed diffusion timestep (the time embedding of the integer 999).
TRUNK_TIMESTEP = 999


def build_unet_trunk(in_ch: int, out_ch: int, block_out_channels: Sequence[int],
                     attention_head_dim: int = 8) -> UNet2DModel:
    """The g_a trunk: ``UNet2DModel`` (2 attention down/up levels + a plain one) with the stem as ``conv_in``.

    ``attention_head_dim`` is the per-head width in ``UNet2DModel`` (heads = C / 8: 64 at 512
    channels, 96 at 768); every other argument is the diffusers default, as in the reference.
    The stem ``RB*(in→c0), RB*(c0), RB*(c0), Conv 3x3 s2`` replaces ``conv_in`` and halves the
    resolution (1/8 → 1/16).
    """
    channels = tuple(int(c) for c in block_out_channels)
    if len(channels) != 3:
        raise ValueError(f"the reference trunk has 3 levels, got block_out_channels={channels}")
    unet = UNet2DModel(
        in_channels=in_ch,
        out_channels=out_ch,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=2,
        attention_head_dim=attention_head_dim,
    )
    first = channels[0]
    unet.conv_in = nn.Sequential(
        VQGANResnetBlock(in_ch, first), VQGANResnetBlock(first), VQGANResnetBlock(first), conv_down(first)
    )
    return unet


def unet_trunk_forward(unet: UNet2DModel, sample: Tensor, timestep: int = TRUNK_TIMESTEP) -> tuple[Tensor, Tensor]:
    """Standard ``UNet2DModel`` forward at a fixed integer timestep; returns ``(conv_out output, mid-block output)``.

    Same order of operations as diffusers' forward (time embedding of the integer timestep in
    float32, cast to the trunk dtype; skips = stem output, every resnet/attention output and
    every downsampler output, consumed last-first by the up blocks), minus the options the
    trunk does not use (input centring, class embedding, skip convs, Fourier time).
    """
    timesteps = torch.full((sample.shape[0],), timestep, dtype=torch.long, device=sample.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    hidden = unet.conv_in(sample)
    skips: tuple[Tensor, ...] = (hidden,)
    for down in unet.down_blocks:
        hidden, res = down(hidden_states=hidden, temb=emb)
        skips += res
    hidden = unet.mid_block(hidden, emb)
    mid = hidden
    for up in unet.up_blocks:
        count = len(up.resnets)
        res, skips = skips[-count:], skips[:-count]
        hidden = up(hidden, res, emb)
    hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
    return hidden, mid


class ReferenceAnalysis(nn.Module):
    """g_a(x, v) → (y, sem): pixel embedding + VAE-latent fusion, UNet trunk, trans-coding to y.

    ``x`` is the padded image in [-1, 1] (sides multiples of 64), ``v`` the VAE latent ×
    0.18215 at 1/8. Returns ``y`` (``bottleneck_ch`` @1/16) and ``sem`` (``unet_ch[-1]`` @1/64).
    """

    def __init__(self, *, internal_ch: int, bottleneck_ch: int, unet_ch_config: Sequence[int],
                 feature_ch: int = 320, pix_emb_ch: int = 192, latent_ch: int = 4,
                 attention_head_dim: int = 8) -> None:
        super().__init__()
        self.pix_emb = nn.Conv2d(3, pix_emb_ch, 8, 8, 0)
        self.pix_fusion = nn.Conv2d(pix_emb_ch + latent_ch, feature_ch, 1)
        self.unet = build_unet_trunk(feature_ch, internal_ch, unet_ch_config, attention_head_dim)
        self.trans_coding = nn.Sequential(
            VQGANResnetBlock(internal_ch),
            ConvSelfAttention(internal_ch),
            VQGANResnetBlock(internal_ch),
            DepthConvBlock(internal_ch, internal_ch),
            DepthConvBlock(internal_ch, bottleneck_ch),
        )

    def forward(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.pix_fusion(torch.cat([self.pix_emb(x), v], dim=1))  # order [pix_emb, v] (§11.4)
        y0, sem = unet_trunk_forward(self.unet, fused)
        return self.trans_coding(y0), sem
