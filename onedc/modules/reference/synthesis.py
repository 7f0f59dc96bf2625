"""Decoder side of the reference codec (docs/reference-model.md §4.7-§4.8): semantic adaptor and g_s.

::

    zs (128 @1/64) ─ DCB(→768), RB*, Attn*, Attn*, RB*, Attn*, Attn*, DCB ─> S (768 @1/64)
    ŷ (128 @1/16) ─ DCB(→512), DCB, RB*×3, UP(512→256), RB*×3 ────────────> a (256 @1/8) ┐
    S ─ RBU(768→512), DCB, RBU(512→256), DCB, RBU(256→256) ──────────────> b (256 @1/8) ┴─[a, b]─ DCB(512→320) ─> F
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from onedc.modules.blocks import (
    ConvSelfAttention,
    DepthConvBlock,
    ResidualBlockUpsample,
    VQGANResnetBlock,
    upsample_layers,
)


class SemanticAdaptor(nn.Module):
    """ẑ-branch feature ``zs`` → semantic map S, the generator's cross-attention tokens (decoder side)."""

    def __init__(self, *, bottleneck_ch: int, semantic_ch: int) -> None:
        super().__init__()
        self.to_semantic = nn.Sequential(
            DepthConvBlock(bottleneck_ch, semantic_ch),
            VQGANResnetBlock(semantic_ch),
            ConvSelfAttention(semantic_ch),
            ConvSelfAttention(semantic_ch),
            VQGANResnetBlock(semantic_ch),
            ConvSelfAttention(semantic_ch),
            ConvSelfAttention(semantic_ch),
            DepthConvBlock(semantic_ch),
        )

    def forward(self, zs: Tensor) -> Tensor:
        return self.to_semantic(zs)


def semantic_tokens(semantic: Tensor) -> Tensor:
    """S (B, C, h, w) → cross-attention tokens (B, h·w, C), row-major (h outer, w inner) as in §4.7."""
    return semantic.flatten(2).transpose(1, 2)


class ReferenceSynthesis(nn.Module):
    """g_s(ŷ, S) → F (``feature_ch`` @1/8): a y branch and a semantic branch fused at 1/8."""

    def __init__(self, *, bottleneck_ch: int, internal_ch: int, semantic_ch: int, feature_ch: int) -> None:
        super().__init__()
        half = internal_ch // 2
        self.trans_coding = nn.Sequential(DepthConvBlock(bottleneck_ch, internal_ch), DepthConvBlock(internal_ch))
        self.blocks = nn.Sequential(
            *(VQGANResnetBlock(internal_ch) for _ in range(3)),
            *upsample_layers(internal_ch, half),
            *(VQGANResnetBlock(half) for _ in range(3)),
        )
        self.sem_up = nn.Sequential(
            ResidualBlockUpsample(semantic_ch, internal_ch),
            DepthConvBlock(internal_ch),
            ResidualBlockUpsample(internal_ch, half),
            DepthConvBlock(half),
            ResidualBlockUpsample(half, half),
        )
        self.conv_out = DepthConvBlock(2 * half, feature_ch)

    def forward(self, y_hat: Tensor, semantic: Tensor) -> Tensor:
        a = self.blocks(self.trans_coding(y_hat))
        b = self.sem_up(semantic)
        return self.conv_out(torch.cat([a, b], dim=1))  # [y-branch, semantic branch] (§11.4)
