"""Building blocks of the reference OneDC codec (docs/reference-model.md §3), in the released key layout.

Every class keeps the submodule names of the released ``model_1.safetensors`` (``norm1``,
``conv1``, ``nin_shortcut``, ``block.0``, ``subpel_conv.0`` ...), so a strict
``load_state_dict`` of the authors' file fits without renaming. Implemented from the facts
in docs/reference-model.md only.

::

    RB*  (VQGANResnetBlock)    h = conv2(SiLU(GN(conv1(SiLU(GN(x))))));  x + h  |  h + nin(h)
    Attn*(ConvSelfAttention)   x + proj_out(softmax(q k^T / sqrt(C)) v), one head over H*W
    DCB  (DepthConvBlock)      FFN(DepthConv(x))
    RBU  (ResidualBlockUpsample) PS2(1x1) -> LReLU -> 3x3 -> LReLU  +  PS2(1x1) of the input
    UP   (upsample_layers)     1x1 i->4i, PS2, 3x3 i->o  (three Sequential entries)
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """The one GroupNorm of onedc: ``gcd(groups, channels)`` groups, so any width works.

    The VQGAN-style blocks (RB*, Attn*) use 32 groups and eps 1e-6 (§3; their widths are
    multiples of 32); the critics use eps 1e-5 (PyTorch's default).
    """
    return nn.GroupNorm(math.gcd(int(groups), int(channels)), channels, eps=eps, affine=True)


class VQGANResnetBlock(nn.Module):
    """RB*(i→o): the VQGAN residual block with the reference's shortcut quirk.

    When the widths differ the 1x1 ``nin_shortcut`` is applied to the residual branch's output
    ``h`` and the block input is discarded (``h + nin(h)``, docs/reference-model.md §3 and pitfall 1);
    with equal widths it is the usual ``x + h``. Convolutions carry no bias.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.nin_shortcut = nn.Conv2d(out_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)
        return x + h


class ConvSelfAttention(nn.Module):
    """Attn*(C): single-head self-attention over all H·W positions with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, 1 head, H*W, C): softmax_j(q_i . k_j / sqrt(C)) is exactly SDPA's default scale.
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class DepthConv(nn.Module):
    """DC(i→o): 1x1 → LReLU(0.01) → 3x3 depthwise → 1x1 i→o, plus identity or a 1x1 ``adaptor``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, in_ch, 1), nn.LeakyReLU(0.01))
        self.depth_conv = nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 1)
        self.adaptor = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.adaptor is None else self.adaptor(x)
        return self.conv2(self.depth_conv(self.conv1(x))) + identity


class ConvFFN(nn.Module):
    """FFN(c): 1x1 c→4c, halves through LReLU(0.1) and LReLU(0.01) summed, 1x1 2c→c, plus identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 1)
        self.conv_out = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        first, second = self.conv(x).chunk(2, dim=1)
        mixed = F.leaky_relu(first, 0.1) + F.leaky_relu(second, 0.01)
        return x + self.conv_out(mixed)


class DepthConvBlock(nn.Module):
    """DCB(i→o) = FFN(o)(DC(i→o)(x)); keys ``block.0.*`` (DC) and ``block.1.*`` (FFN)."""

    def __init__(self, in_ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.block = nn.Sequential(DepthConv(in_ch, out_ch), ConvFFN(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ResidualBlockUpsample(nn.Module):
    """RBU(i→o): ×2 sub-pixel upsampling with a sub-pixel shortcut of the input."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.subpel_conv = nn.Sequential(nn.Conv2d(in_ch, 4 * out_ch, 1), nn.PixelShuffle(2))
        self.conv = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.upsample = nn.Sequential(nn.Conv2d(in_ch, 4 * out_ch, 1), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        main = F.leaky_relu(self.subpel_conv(x), 0.01)
        main = F.leaky_relu(self.conv(main), 0.1)
        return main + self.upsample(x)


def upsample_layers(in_ch: int, out_ch: int) -> list[nn.Module]:
    """UP(i→o) as the three list entries of the released layout: 1x1 i→4i, PS2 (no key), 3x3 i→o."""
    return [nn.Conv2d(in_ch, 4 * in_ch, 1), nn.PixelShuffle(2), nn.Conv2d(in_ch, out_ch, 3, 1, 1)]


def conv_down(channels: int) -> nn.Conv2d:
    """Conv(c→c, 3, s2, p1): the stride-2 convolutions of the g_a stem and of h_a."""
    return nn.Conv2d(channels, channels, 3, 2, 1)
