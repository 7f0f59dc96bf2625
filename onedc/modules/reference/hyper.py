"""Hyper path of the reference codec (docs/reference-model.md §4.2-§4.4): h_a, h_s and the prior fusion.

::

    y (128 @1/16) ─ DCB, 3x3 s2, DCB, 3x3 s2 ─> 128 @1/64 ┐
    sem (768 @1/64) ───────────────────────────────────────┴─[y-branch, sem]─ DCB(896→768), Attn*,
        DCB(→512), Attn*, DCB, 1x1 → z (7 @1/64)                                    (hyper_enc)
    ẑ ─ 1x1 7→128, LReLU ─> zs (also the semantic branch input)
       ─ DCB, RBU, DCB, RBU, DCB ─> f (128 @1/16)                                    (hyper_dec)
    f ─ DCB(128→256), DCB(256) ─> P = [scales₀ | means₀] (256 @1/16)               (y_prior_fusion)

FSQ of z is :class:`onedc.modules.fsq.FSQ` (its arithmetic and index order are §4.3's).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from onedc.modules.blocks import ConvSelfAttention, DepthConvBlock, ResidualBlockUpsample, conv_down


class HyperAnalysis(nn.Module):
    """h_a(y, sem) → z: y down to the semantic grid, fused with the trunk's semantic map."""

    def __init__(self, *, bottleneck_ch: int, semantic_in_ch: int, internal_ch: int, z_ch: int) -> None:
        super().__init__()
        self.y_trans_coding = nn.Sequential(
            DepthConvBlock(bottleneck_ch), conv_down(bottleneck_ch),
            DepthConvBlock(bottleneck_ch), conv_down(bottleneck_ch),
        )
        self.fusion = nn.Sequential(
            DepthConvBlock(bottleneck_ch + semantic_in_ch, semantic_in_ch),
            ConvSelfAttention(semantic_in_ch),
            DepthConvBlock(semantic_in_ch, internal_ch),
            ConvSelfAttention(internal_ch),
            DepthConvBlock(internal_ch),
            nn.Conv2d(internal_ch, z_ch, 1),
        )

    def forward(self, y: Tensor, sem: Tensor) -> Tensor:
        return self.fusion(torch.cat([self.y_trans_coding(y), sem], dim=1))  # [y-branch, sem] (§11.4)


class HyperSynthesis(nn.Module):
    """h_s(ẑ) → (f, zs): ``zs`` (1/64) feeds the semantic adaptor, ``f`` (1/16) the prior fusion."""

    def __init__(self, *, bottleneck_ch: int, z_ch: int) -> None:
        super().__init__()
        self.feat_in = nn.Sequential(nn.Conv2d(z_ch, bottleneck_ch, 1), nn.LeakyReLU(0.01))
        self.to_entropy = nn.Sequential(
            DepthConvBlock(bottleneck_ch),
            ResidualBlockUpsample(bottleneck_ch, bottleneck_ch),
            DepthConvBlock(bottleneck_ch),
            ResidualBlockUpsample(bottleneck_ch, bottleneck_ch),
            DepthConvBlock(bottleneck_ch),
        )

    def forward(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        zs = self.feat_in(z_hat)
        return self.to_entropy(zs), zs


def build_prior_fusion(bottleneck_ch: int) -> nn.Sequential:
    """``y_prior_fusion``: DCB(b→2b), DCB(2b) giving P with scales₀ in the first half, means₀ in the second."""
    return nn.Sequential(DepthConvBlock(bottleneck_ch, 2 * bottleneck_ch), DepthConvBlock(2 * bottleneck_ch))
