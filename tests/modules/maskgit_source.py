"""The MaskGIT-VQGAN tokenizer written directly from docs/reference-model.md §8 (test oracle, random weights).

Independent of onedc's conversion: convs, GroupNorm, SiLU, average pooling and a nearest-code
lookup by ‖h‖² + ‖e‖² − 2 h·e, with the state-dict key layout of ``reference/tokenizer.txt``.
The tests convert its weights with onedc and compare outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResBlock(nn.Module):
    """RB*(i→o): out = x + h when i = o, else h + nin(h) (the input is discarded); no conv biases."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return x + h if self.nin_shortcut is None else h + self.nin_shortcut(h)


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, groups) for j in range(blocks))
        if upsample:
            self.upsample_conv = nn.Conv2d(cout, cout, 3, padding=1)


class Encoder(nn.Module):
    def __init__(self, ch: list[int], blocks: int, z: int, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1, bias=False)
        self.down = nn.ModuleList(Level(ch[i - 1] if i else ch[0], ch[i], blocks, groups, False)
                                  for i in range(len(ch)))
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], groups) for _ in range(2))
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], z, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i + 1 < len(self.down):
                h = F.avg_pool2d(h, 2)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: list[int], blocks: int, z: int, groups: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(z, ch[-1], 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], groups) for _ in range(2))
        self.up = nn.ModuleList(Level(ch[i + 1] if i + 1 < len(ch) else ch[-1], ch[i], blocks, groups, i > 0)
                                for i in range(len(ch)))
        self.norm_out = nn.GroupNorm(groups, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, zq: Tensor, clamp: bool = True) -> Tensor:
        h = self.conv_in(zq)
        for block in self.mid:
            h = block(h)
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.clamp(0.0, 1.0) if clamp else out


class Quantize(nn.Module):
    def __init__(self, codes: int, z: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codes, z)

    def indices(self, h: Tensor) -> Tensor:
        """(B, z, h, w) -> (B, h, w) nearest codes by squared Euclidean distance."""
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        e = self.embedding.weight
        dist = (flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1)[None] - 2 * flat @ e.t()
        return dist.argmin(1).reshape(h.shape[0], h.shape[2], h.shape[3])


class MaskGitVQGAN(nn.Module):
    """encoder.* / decoder.* / quantize.embedding.weight, as in the released file."""

    def __init__(self, hidden: int = 128, mult: tuple[int, ...] = (1, 1, 2, 2, 4), blocks: int = 2,
                 z: int = 256, codes: int = 1024, groups: int = 32) -> None:
        super().__init__()
        ch = [hidden * m for m in mult]
        self.encoder = Encoder(ch, blocks, z, groups)
        self.decoder = Decoder(ch, blocks, z, groups)
        self.quantize = Quantize(codes, z)

    def tokens(self, x01: Tensor) -> Tensor:
        """Token indices of images already in the tokenizer's [0, 1] input range."""
        return self.quantize.indices(self.encoder(x01))


@torch.no_grad()
def random_maskgit(seed: int, fit_images: Tensor, **sizes: int) -> MaskGitVQGAN:
    """A MaskGIT of random weights whose GroupNorm affines are random too (so identity parts
    of the conversion are really tested) and whose codebook is drawn from the encoder's own
    latents of ``fit_images`` plus noise (so many codes are in use, not a few far-away ones)."""
    torch.manual_seed(seed)
    model = MaskGitVQGAN(**sizes).eval()
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.weight.normal_(1.0, 0.2)
            module.bias.normal_(0.0, 0.2)
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.normal_(0.0, 0.1)
    latents = model.encoder(fit_images).permute(0, 2, 3, 1).reshape(-1, model.quantize.embedding.weight.shape[1])
    pick = torch.randint(latents.shape[0], (model.quantize.embedding.weight.shape[0],))
    model.quantize.embedding.weight.copy_(latents[pick] + 0.05 * latents.std() * torch.randn_like(latents[pick]))
    return model
