"""The paper's code-prediction head ("Codeformer", docs/reference-model.md §9): semantic tokens -> teacher logits.

::

    S (B, 768, h, w) @1/64
      -> up_sample: DCB(768), 1x1 768->3072, pixel shuffle x2, DCB(768)       -> 768 @1/32
      -> blocks: 3 x DualSwin(768, 12 heads x 64, MLP 3072, window 16)        (channels-last)
      -> mlp_head: 1x1 768->3072, GN(16), GELU, 1x1 3072->768, GN(16), GELU, 1x1 768->K
      -> logits (B, K, 2h, 2w) on the tokenizer grid (softmax in the loss)

DualSwin = a window-attention block at offset 0, then one on the grid rolled by half a window.
Key names and shapes follow ``reference/codeformer.txt`` (105 keys, 60,315,392 elements with
the two fixed masks of each shifted block), so the reference's trained head loads as is.

Why not timm's ``SwinTransformerBlock``: it always carries a per-head *relative* position bias
table in every block and a qkv bias, while this head has no qkv bias and a single learned
256x256 *absolute* bias shared by all heads, in block 0's first half only; its other blocks have
none. Its shifted-window masks (stored -inf/0 tensors on the last row/column of windows) are
what timm computes, and are kept here as buffers under the reference's names.

Grids that are not whole windows (crops not multiples of 512 px) are padded to whole windows at
the bottom/right and the padded keys are masked out, so real tokens never attend to padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onedc.errors import ConfigError
from onedc.modules.blocks import DepthConvBlock

__all__ = ["CodeformerHead", "DualSwinBlock", "SwinBlock"]


def _windows(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B, nW, window², C), windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def _unwindows(x: Tensor, window: int, h: int, w: int) -> Tensor:
    b, _, _, c = x.shape
    x = x.reshape(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class _WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, with the reference's biases."""

    def __init__(self, dim: int, heads: int, window: int, *, shifted: bool, pos_bias: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"codeformer dim={dim} is not divisible by heads={heads}")
        self.heads, self.window, self.shifted = heads, window, shifted
        n = window * window
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        # One absolute bias over (query, key) window positions, shared by heads and windows.
        # Zero init: no bias until learned (the reference's init is not pinned down).
        self.pos_embedding = nn.Parameter(torch.zeros(n, n)) if pos_bias else None
        if shifted:  # last window row/column mixes tokens wrapped around by the roll: keep them apart
            row = torch.arange(n) // window >= window // 2
            col = torch.arange(n) % window >= window // 2
            blocked = torch.tensor(float("-inf"))
            self.register_buffer("upper_lower_mask", torch.where(row[:, None] != row[None], blocked, 0.0))
            self.register_buffer("left_right_mask", torch.where(col[:, None] != col[None], blocked, 0.0))

    def _bias(self, rows: int, cols: int, valid: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """Additive (nW, 1, N, N) logit bias of a rows x cols window grid, or None if there is none."""
        n = self.window * self.window
        device = self.to_qkv.weight.device
        if self.pos_embedding is None and not self.shifted and valid is None:
            return None
        bias = torch.zeros(rows, cols, n, n, device=device)
        if self.pos_embedding is not None:
            bias = bias + self.pos_embedding.float()
        if self.shifted:
            bias[-1] = bias[-1] + self.upper_lower_mask.float()
            bias[:, -1] = bias[:, -1] + self.left_right_mask.float()
        bias = bias.reshape(rows * cols, 1, n, n)
        if valid is not None:  # (nW, N): a real query never sees a padded key
            hide = valid[:, None, :, None] & ~valid[:, None, None, :]
            bias = bias.masked_fill(hide, float("-inf"))
        return bias.to(dtype)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """(B, H, W, C), H and W whole windows; ``valid`` (H, W) marks real tokens (None: all)."""
        b, h, w, c = x.shape
        shift = self.window // 2 if self.shifted else 0
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            valid = None if valid is None else torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
        tokens = _windows(x, self.window)  # (B, nW, N, C)
        q, k, v = self.to_qkv(tokens).reshape(*tokens.shape[:3], 3, self.heads, c // self.heads).permute(
            3, 0, 1, 4, 2, 5)  # each (B, nW, heads, N, d)
        win_valid = None if valid is None else _windows(valid[None, :, :, None], self.window)[0, :, :, 0]
        bias = self._bias(h // self.window, w // self.window, win_valid, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(d) = 1/8 at d = 64
        out = self.to_out(out.transpose(2, 3).reshape(tokens.shape))
        out = _unwindows(out, self.window, h, w)
        return torch.roll(out, shifts=(shift, shift), dims=(1, 2)) if shift else out


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SwinBlock(nn.Module):
    """x + WA(LN(x)), then x + MLP(LN(x)), on channels-last tokens (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_dim: int, *, shifted: bool,
                 pos_bias: bool = False) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attention_block = _WindowAttention(dim, heads, window, shifted=shifted, pos_bias=pos_bias)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp_block = _Mlp(dim, mlp_dim)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        x = x + self.attention_block(self.norm_attn(x), valid)
        return x + self.mlp_block(self.norm_mlp(x))


class DualSwinBlock(nn.Module):
    """``block_w`` (windows at offset 0) then ``block_sw`` (windows shifted by half a window)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_dim: int, *, pos_bias: bool) -> None:
        super().__init__()
        self.block_w = SwinBlock(dim, heads, window, mlp_dim, shifted=False, pos_bias=pos_bias)
        self.block_sw = SwinBlock(dim, heads, window, mlp_dim, shifted=True)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.block_sw(self.block_w(x, valid), valid)


class CodeformerHead(nn.Module):
    """The §9 head: ``sem`` (B, in, h, w) -> (B, out_dim, 2h, 2w) logits on the tokenizer grid.

    Defaults are the reference sizes (dim 768, 3 DualSwin blocks, 12 heads, window 16, MLP 4x,
    GroupNorm 16 groups). When ``in_channels`` differs from ``dim`` a 1x1 ``proj_in`` comes
    first (the reference feeds 768-d tokens and has none).
    """

    def __init__(self, in_channels: int, out_dim: int, *, dim: int = 768, depth: int = 3, heads: int = 12,
                 window: int = 16, mlp_ratio: int = 4, groups: int = 16) -> None:
        super().__init__()
        if window < 2 or window % 2:
            raise ConfigError(f"codeformer window must be an even number >= 2, got {window}")
        if dim % groups or (mlp_ratio * dim) % groups:
            raise ConfigError(f"codeformer dim={dim} (and {mlp_ratio}x it) must be divisible by groups={groups}")
        self.window = int(window)
        self.proj_in = nn.Conv2d(in_channels, dim, 1) if in_channels != dim else None
        hidden = mlp_ratio * dim
        self.up_sample = nn.Sequential(DepthConvBlock(dim), nn.Conv2d(dim, 4 * dim, 1), nn.PixelShuffle(2),
                                       DepthConvBlock(dim))
        self.blocks = nn.ModuleList(DualSwinBlock(dim, heads, window, hidden, pos_bias=i == 0) for i in range(depth))
        self.mlp_head = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.GroupNorm(groups, hidden), nn.GELU(),
            nn.Conv2d(hidden, dim, 1), nn.GroupNorm(groups, dim), nn.GELU(), nn.Conv2d(dim, out_dim, 1))

    def forward(self, sem: Tensor) -> Tensor:
        """(B, in, h, w) -> (B, out_dim, 2h, 2w)."""
        x = self.up_sample(sem if self.proj_in is None else self.proj_in(sem))
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.window, -width % self.window
        x = x.permute(0, 2, 3, 1)
        valid = None
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool, device=x.device)
            valid[:height, :width] = True
        for block in self.blocks:
            x = block(x, valid)
        x = x[:, :height, :width].permute(0, 3, 1, 2)
        return self.mlp_head(x)
