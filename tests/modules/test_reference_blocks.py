"""Blocks of the reference codec (docs/reference-model.md §3) against their written definitions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from onedc.modules.blocks import (
    ConvFFN,
    ConvSelfAttention,
    ResidualBlockUpsample,
    VQGANResnetBlock,
    upsample_layers,
)

GEN = torch.Generator().manual_seed(0)


def test_resnet_block_shortcut_acts_on_the_residual_not_the_input():
    block = VQGANResnetBlock(32, 64).eval()
    x = torch.randn(2, 32, 5, 6, generator=GEN)
    with torch.no_grad():
        h = block.conv2(F.silu(block.norm2(block.conv1(F.silu(block.norm1(x))))))
        assert torch.allclose(block(x), h + block.nin_shortcut(h), atol=1e-6)
        same = VQGANResnetBlock(32).eval()
        h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x))))))
        assert torch.allclose(same(x), x + h, atol=1e-6)
    assert block.conv1.bias is None and block.norm1.eps == 1e-6


def test_attention_is_one_head_softmax_over_all_positions():
    attn = ConvSelfAttention(32).eval()
    x = torch.randn(1, 32, 3, 4, generator=GEN)
    with torch.no_grad():
        n = attn.norm(x)
        q, k, v = (conv(n).flatten(2)[0] for conv in (attn.q, attn.k, attn.v))  # (C, HW)
        weights = torch.softmax(q.T @ k / 32 ** 0.5, dim=-1)  # (HW_i, HW_j)
        out = (v @ weights.T).view(1, 32, 3, 4)
        assert torch.allclose(attn(x), x + attn.proj_out(out), atol=1e-5)


def test_ffn_halves_take_slopes_0_1_then_0_01():
    ffn = ConvFFN(4).eval()
    x = torch.randn(1, 4, 2, 2, generator=GEN)
    with torch.no_grad():
        u = ffn.conv(x)
        mixed = F.leaky_relu(u[:, :8], 0.1) + F.leaky_relu(u[:, 8:], 0.01)
        assert torch.allclose(ffn(x), x + ffn.conv_out(mixed), atol=1e-6)


def test_upsampling_blocks_double_the_grid():
    x = torch.randn(1, 8, 3, 5, generator=GEN)
    assert ResidualBlockUpsample(8, 4)(x).shape == (1, 4, 6, 10)
    assert torch.nn.Sequential(*upsample_layers(8, 4))(x).shape == (1, 4, 6, 10)
