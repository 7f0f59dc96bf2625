"""The hyperprior latent codec of OneDC (Xue et al., NeurIPS 2025, §3.1 and Fig. 2).

::

    x ──patch-embed 8x8/s8──┐
    v = VAE(x) (1/8) ───────┴─ fuse ─ g_a_y ─> y (M ch, 1/16) ──Q──> ŷ ───────────── rANS ─> bits_y
                                        └─ g_a_sem ─(+)─> sem (1/64) ─ h_a ─> z ─FSQ─> ẑ ── fixed ─> bits_z
    x ─avg-pool 8─ space-to-depth 8─ 1x1 ────────────┘   (linear pixel shortcut)
    ẑ ─ h_s ─> h (1/16) ─> (μ, σ) of ŷ          (mean-scale Gaussian, CompressAI GaussianConditional)
    ẑ ─ h_sem ─> semantic map (1/64) ─> tokens (B, L, token_dim)   (replaces the text prompt)
    [ŷ, h] ─ g_s ─> features (1/8) ─┬─> UNet conv_in (one-step generator)
                                     └─> to_latent ─> v̂ (light latent reconstruction, stage 1)

The codec follows CompressAI's contract: ``forward`` returns likelihoods, ``update()`` builds the
CDF tables before coding, ``compress``/``decompress`` produce/consume byte strings, and the
CDF buffers survive ``load_state_dict`` (``CompressionModel.load_state_dict``). z is quantised
with FSQ, so it has no entropy model and no auxiliary (quantile) parameters: ``aux_loss()`` is 0.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from compressai.entropy_models import GaussianConditional
from compressai.layers import ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride, conv1x1, conv3x3
from compressai.models.base import CompressionModel
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from onedc.errors import CodingMismatchError
from onedc.modules.decisions import (
    CodingDecisions,
    apply_fixes,
    decide,
    decision_checksum,
    encode_fixes,
    float64_call,
)
from onedc.modules.fsq import FSQ
from onedc.modules.streams import DecodedLatents, pack_indices, unpack_indices, z_stream_bits
from onedc.modules.positions import sincos_2d  # the "unit" position code of the semantic tokens

# The estimated rate must be the rate of the file. Measured on the 7 sample photos with three
# distill checkpoints: +0.4 ... +2.0% (all positive: rANS's fixed flush) with these settings,
# -3.1 ... +2.5% with CompressAI's defaults:
# - the coder snaps each σ up to the next table scale; 256 log-spaced levels (2.1% apart instead
#   of CompressAI's 64) keep that mismatch small;
# - the coder's CDFs have 16-bit precision: every symbol in a table's range costs at most 16 bits
#   (escapes, outside the range, are rare), so the likelihood floor is 2^-16, not CompressAI's
#   1e-9 (30 bits), which made the estimate overcount every rare symbol.
# - rANS flushes its final state: a y stream is 8 bytes even when its symbols cost ~0 bits
#   (measured: an untrained codec's y stream with 0.35 estimated bits is 8 bytes). Like z's fixed
#   bits, this is part of every file, so the estimate counts it.
SCALE_TABLE_LEVELS = 256
# A fresh g_a gives y with std ~0.08, all inside one quantisation bin: rounding erases it, the
# codec starts by sending nothing (estimated rate = z's fixed bits only) and rate can only rise.
# Scaling g_a_y's last layer spreads y over a few bins (std ~2 on the sample photos), as a
# learned codec on [0, 255] inputs starts: y carries information from step 0 and the rate falls
# from there. g_s's first layer is scaled down by as much for ŷ, so the features a fresh codec
# gives the generator keep their scale (at t=T an ε-UNet multiplies the error of its output by
# ~15 in x0: large features make the latent stage start far off). Measured on the tiny preset,
# 300 distill steps: val bpp 1.62 -> 0.072 and val latent MSE 1.54 -> 0.20, against bpp
# 0.005 -> 0.021 and MSE 0.28 without the gain (same data and code otherwise).
Y_INIT_GAIN = 25.0
LIKELIHOOD_BOUND = 2.0**-16
RANS_FLUSH_BITS = 64


def scale_table(levels: int = SCALE_TABLE_LEVELS, low: float = 0.11, high: float = 256.0) -> list[float]:
    """Log-spaced Gaussian scales for which rANS CDF tables are built."""
    return torch.exp(torch.linspace(math.log(low), math.log(high), levels)).tolist()


class HyperpriorOutput(NamedTuple):
    """What ``HyperpriorCodec.forward`` returns (training and evaluation)."""

    y_hat: Tensor  # (B, M, H/16, W/16) quantised latent (rounded around μ, straight-through)
    z_hat: Tensor  # (B, d, H/64, W/64) FSQ codes in [-1, 1]
    likelihoods: dict[str, Tensor]  # {"y": (B, M, H/16, W/16)}; noisy-proxy likelihoods in training
    z_bits: Tensor  # (B,) exact fixed-length bits of z per image
    semantic: Tensor  # (B, token_dim, H/64, W/64) decoder-side semantic map (from ẑ only)
    tokens: Tensor  # (B, L, token_dim) cross-attention tokens, L = H/64 * W/64
    features: Tensor  # (B, gs_channels, H/8, W/8) g_s output: the generator's conv_in input
    latent_hat: Tensor  # (B, C_vae, H/8, W/8) light reconstruction of the VAE latent


class HyperpriorCodec(CompressionModel):
    """OneDC's hyperprior latent codec: VAE latent + pixels -> (ŷ, ẑ) bitstreams -> features.

    Args:
        vae_channels: channels of the frozen VAE latent (4 for SD).
        patch_size: pixel patch-embed size; must equal the VAE downsampling (8).
        channels: N, the analysis/synthesis width.
        y_channels: M, channels of y at 1/16.
        sem_channels: width of the semantic branch at 1/64.
        fsq_levels: FSQ levels of z (one per channel of z).
        token_dim: width of the semantic tokens (the generator's cross-attention width).
        gs_channels: width of g_s's 1/8 output features.
    """

    downsample = 64  # z lives at 1/64: inputs must be padded to a multiple of this

    def __init__(
        self,
        *,
        vae_channels: int = 4,
        patch_size: int = 8,
        channels: int = 192,
        y_channels: int = 128,
        sem_channels: int = 320,
        fsq_levels: Sequence[int] = (4,) * 7,
        token_dim: int = 768,
        gs_channels: int = 320,
    ) -> None:
        super().__init__()
        n, m, s = channels, y_channels, sem_channels
        self.config = dict(vae_channels=vae_channels, patch_size=patch_size, channels=n, y_channels=m,
                           sem_channels=s, fsq_levels=list(fsq_levels), token_dim=token_dim,
                           gs_channels=gs_channels)
        self.patch_embed = nn.Conv2d(3, n, kernel_size=patch_size, stride=patch_size)
        self.fuse = nn.Sequential(
            conv3x3(n + vae_channels, n), ResidualBlock(n, n), ResidualBlockWithStride(n, n, stride=2)
        )  # -> 1/16, shared by the y and semantic branches
        self.g_a_y = nn.Sequential(ResidualBlock(n, n), conv3x3(n, m))
        self.g_a_sem = nn.Sequential(
            ResidualBlockWithStride(n, s, stride=2), ResidualBlockWithStride(s, s, stride=2), ResidualBlock(s, s)
        )
        # Pixel shortcut of the semantic branch, in the spirit of DC-AE's space-to-channel
        # shortcuts: the patch colours of each 64 px block (avg-pooled at the patch size, then
        # space-to-depth), projected linearly and added to g_a_sem's output. The deep branch alone
        # fits the training photos' tokens without generalising; with this linear path from colour
        # the tiny preset's held-out token accuracy after 300 distill steps (256 px crops) went
        # from 0.11 to 0.27, against 0.14 for always predicting the most frequent code.
        cells = self.downsample // patch_size
        self.sem_shortcut = nn.Sequential(
            nn.AvgPool2d(patch_size), nn.PixelUnshuffle(cells), conv1x1(3 * cells * cells, s)
        )
        self.fsq = FSQ(fsq_levels)
        # LayerNorm over channels (per position, so a code never depends on the rest of the
        # image) before the FSQ projection. Without it, the distillation loss keeps pushing the
        # low-dimensional z outwards: FSQ's tanh saturates and every position gets the same
        # code (measured in distillation-only runs of the tiny codec: h_a's output std went
        # 0.08 -> 50..3500 within 100 steps, one distinct code over a batch's 32 positions;
        # with the norm it stays ~2 and 23-31 of the 32 positions have distinct codes).
        self.h_a = nn.Sequential(LayerNorm2d(s), conv3x3(s, s), nn.GELU(), conv1x1(s, self.fsq.dim))
        self.h_s = nn.Sequential(
            conv3x3(self.fsq.dim, s), nn.GELU(), ResidualBlockUpsample(s, s, 2), ResidualBlockUpsample(s, n, 2),
        )
        self.entropy_parameters = nn.Sequential(conv1x1(n, n), nn.GELU(), conv1x1(n, 2 * m))
        self.h_sem = nn.Sequential(
            conv3x3(self.fsq.dim, s), nn.GELU(), ResidualBlock(s, s), ResidualBlock(s, s), conv1x1(s, token_dim)
        )
        self.token_norm = nn.LayerNorm(token_dim)
        self.g_s = nn.Sequential(
            conv3x3(m + n, n), ResidualBlock(n, n), ResidualBlockUpsample(n, gs_channels, 2),
            ResidualBlock(gs_channels, gs_channels),
        )
        self.to_latent = conv3x3(gs_channels, vae_channels)
        with torch.no_grad():  # see Y_INIT_GAIN; g_s's first layer takes ŷ back to its old scale
            self.g_a_y[-1].weight.mul_(Y_INIT_GAIN)
            self.g_a_y[-1].bias.mul_(Y_INIT_GAIN)
            self.g_s[0].weight[:, :m].div_(Y_INIT_GAIN)
        self.gaussian_conditional = GaussianConditional(None, likelihood_bound=LIKELIHOOD_BOUND)

    # ---------------------------------------------------------------- building blocks
    def analysis(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(image in [-1,1], VAE latent) -> (y at 1/16, semantic analysis features at 1/64)."""
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of {self.downsample}: pad it first "
                "(onedc.modules.light.codec.pad_to_multiple)"
            )
        h = self.fuse(torch.cat([self.patch_embed(x), v], dim=1))
        return self.g_a_y(h), self.g_a_sem(h) + self.sem_shortcut(x)

    def hyper_analysis(self, sem: Tensor) -> Tensor:
        """Semantic analysis features -> ẑ (FSQ codes in [-1, 1], straight-through in training).

        Returned contiguous: the LayerNorm2d in h_a leaves a channels-last layout, and a conv on
        channels-last input takes other kernels than on the contiguous ẑ the decoder rebuilds
        from indices, so μ and σ of ŷ would differ in the last bit between the two sides.
        """
        return self.fsq(self.h_a(sem)).contiguous()

    def hyper_synthesis(self, z_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ẑ -> (hyper features h at 1/16, means μ, scales σ) of ŷ."""
        h = self.h_s(z_hat)
        scales, means = self.entropy_parameters(h).chunk(2, dim=1)
        return h, means, scales

    def coding_decisions(self, z_hat: Tensor) -> CodingDecisions:
        """ẑ -> the integer decisions of every ŷ symbol (μ on its grid, table index of σ).

        The same network as :meth:`hyper_synthesis`, run in float64 outside autocast (see
        :mod:`onedc.modules.decisions`), so that encoder and decoder agree on any machine.
        """
        params = float64_call(self.entropy_parameters, float64_call(self.h_s, z_hat))
        scales, means = params.chunk(2, dim=1)
        return decide(means, scales, self.gaussian_conditional.scale_table)

    def semantics(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """ẑ -> (semantic map at 1/64, cross-attention tokens (B, L, token_dim))."""
        semantic = self.h_sem(z_hat)
        b, d, hh, ww = semantic.shape
        tokens = self.token_norm(semantic.flatten(2).transpose(1, 2))
        return semantic, tokens + sincos_2d(hh, ww, d, semantic.device).to(tokens.dtype)

    def synthesis(self, y_hat: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor]:
        """(ŷ, hyper features) -> (1/8 features for the generator, light VAE-latent estimate)."""
        features = self.g_s(torch.cat([y_hat, hyper], dim=1))
        return features, self.to_latent(features)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, v: Tensor) -> HyperpriorOutput:
        """Encode and decode with rate estimates (noise proxy for the rate in training)."""
        y, sem = self.analysis(x, v)
        z_hat = self.hyper_analysis(sem)
        hyper, means, scales = self.hyper_synthesis(z_hat)
        _, y_likelihoods = self.gaussian_conditional(y, scales, means)
        # Decoder input: rounded around μ (mixed quantisation), straight-through in training. In
        # eval, around the coded μ of the decision path: exactly what decompress() rebuilds.
        if self.training or self.gaussian_conditional.scale_table.numel() == 0:
            y_rounded = torch.round(y - means) + means
            y_hat = y + (y_rounded - y).detach() if self.training else y_rounded
        else:
            coded_means = self.coding_decisions(z_hat).means
            y_hat = (torch.round(y.float() - coded_means) + coded_means).to(y.dtype)
        semantic, tokens = self.semantics(z_hat)
        features, latent_hat = self.synthesis(y_hat, hyper)
        z_bits = torch.full((x.shape[0],), float(self.z_bits_per_image(z_hat.shape[-2:])), device=x.device)
        return HyperpriorOutput(y_hat, z_hat, {"y": y_likelihoods}, z_bits, semantic, tokens, features, latent_hat)

    def z_bits_per_image(self, z_shape: Sequence[int]) -> int:
        """Bits of the fixed-length z stream for a z grid of ``z_shape`` (before byte padding)."""
        return z_stream_bits(self.fsq, z_shape)

    @staticmethod
    def rate_bits(out: HyperpriorOutput) -> Tensor:
        """Estimated bits per image: -Σ log2 p(ŷ) + rANS flush + fixed bits of ẑ. Shape (B,)."""
        y_bits = -torch.log2(out.likelihoods["y"]).flatten(1).sum(dim=1)
        return y_bits + RANS_FLUSH_BITS + out.z_bits

    @classmethod
    def bpp(cls, out: HyperpriorOutput, num_pixels: int) -> Tensor:
        """Estimated bits per pixel of each image, (B,)."""
        return cls.rate_bits(out) / num_pixels

    # ---------------------------------------------------------------- coding
    def update(self, scale_table_values: Sequence[float] | None = None, force: bool = False) -> bool:  # type: ignore[override]
        """Build the rANS CDF tables (call before ``compress``; stages call it before saving)."""
        return super().update(scale_table=scale_table_values or scale_table(), force=force)

    @torch.no_grad()
    def compress(self, x: Tensor, v: Tensor) -> dict:
        """Images (B,3,H,W) + VAE latents -> coded streams, one per image.

        Returns ``{"strings": [y_strings, z_strings], "shape": (hz, wz), "fixes": [bytes],
        "checksums": [int], "y_hat": ŷ}``: the fix list and decision checksum of each image
        (see :mod:`onedc.modules.decisions`) travel with its streams, and ``y_hat`` is what
        the decoder will rebuild.
        """
        if self.gaussian_conditional._offset.numel() == 0:
            raise RuntimeError("call codec.update() before compress(): the CDF tables are not built")
        y, sem = self.analysis(x, v)
        z_hat = self.hyper_analysis(sem)
        indices = self.fsq.codes_to_indices(z_hat).cpu().numpy()
        z_strings = [pack_indices(i, self.fsq.bits_per_index) for i in indices]
        # Re-derive ẑ from the indices exactly as the decoder will.
        z_hat = self.fsq.indices_to_codes(torch.from_numpy(indices).to(x.device))
        decisions = self.coding_decisions(z_hat)
        means = decisions.means
        symbols = torch.round(y.float() - means)
        y_strings = self.gaussian_conditional.compress(symbols + means, decisions.indexes, means=means)
        fixes = [encode_fixes(decisions.select(i)) for i in range(y.shape[0])]
        checksums = [decision_checksum(decisions.select(i), symbols[i]) for i in range(y.shape[0])]
        return {"strings": [y_strings, z_strings], "shape": tuple(z_hat.shape[-2:]), "fixes": fixes,
                "checksums": checksums, "y_hat": symbols + means}

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: Sequence[int], fixes: Sequence[bytes] | None = None,
                   checksums: Sequence[int] | None = None, legacy: bool = False) -> DecodedLatents:
        """Inverse of :meth:`compress`: byte strings -> ŷ, ẑ and the decoder-side features.

        ``fixes`` and ``checksums`` are what :meth:`compress` returned for each image (without
        fixes the decoder trusts its own decisions everywhere; without checksums nothing is
        verified). A decision checksum that does not match raises
        :class:`~onedc.errors.CodingMismatchError`. ``legacy`` decodes files of container format
        1, whose decisions came from the model's own precision (float32 or autocast): those only
        decode on the kind of machine that encoded them.
        """
        y_strings, z_strings = strings
        hz, wz = int(shape[0]), int(shape[1])
        device = self.to_latent.weight.device
        indices = np.stack([unpack_indices(s, hz * wz, self.fsq.bits_per_index) for s in z_strings])
        if (indices >= self.fsq.codebook_size).any():
            raise ValueError("z stream holds an index outside the FSQ codebook")
        z_hat = self.fsq.indices_to_codes(torch.from_numpy(indices).view(-1, hz, wz).to(device))
        hyper, means, scales = self.hyper_synthesis(z_hat)
        if legacy:
            indexes = self.gaussian_conditional.build_indexes(scales)
            y_hat = self.gaussian_conditional.decompress(y_strings, indexes, means=means)
        else:
            y_hat = self._decode_y(y_strings, z_hat, fixes, checksums)
        semantic, tokens = self.semantics(z_hat)
        features, latent_hat = self.synthesis(y_hat.to(hyper.dtype), hyper)
        return DecodedLatents(y_hat, z_hat, semantic, tokens, features, latent_hat)

    def _decode_y(self, y_strings: Sequence[bytes], z_hat: Tensor, fixes: Sequence[bytes],
                  checksums: Sequence[int] | None) -> Tensor:
        """ŷ of each image from its y stream, with the encoder's fixes, checked against its checksum."""
        fixes = [b"\x00"] * len(y_strings) if fixes is None else fixes
        if len(fixes) != len(y_strings) or (checksums is not None and len(checksums) != len(y_strings)):
            raise ValueError("one fix list and one checksum are needed per y stream")
        decided = self.coding_decisions(z_hat)
        tables = int(self.gaussian_conditional._offset.numel())
        images = [apply_fixes(decided.select(i), fixes[i], tables) for i in range(len(y_strings))]
        decisions = CodingDecisions(*(torch.cat(parts) for parts in zip(*images)))
        means = decisions.means
        y_hat = self.gaussian_conditional.decompress(list(y_strings), decisions.indexes, means=means)
        if checksums is not None:
            symbols = torch.round(y_hat - means)
            for i, expected in enumerate(checksums):
                actual = decision_checksum(decisions.select(i), symbols[i])
                if actual != expected:
                    unsure = int((decisions.margin[i] < 1.0).sum())
                    raise CodingMismatchError(
                        f"the decoder's coding decisions differ from the encoder's (checksum {actual:08x}, file "
                        f"{expected:08x}; {unsure} symbols near a boundary without a fix): the model differs from "
                        "the one that encoded, or this machine computes its float64 decision path wrongly")
        return y_hat

    # ---------------------------------------------------------------- parameters
    def aux_loss(self) -> Tensor:  # type: ignore[override]
        """No EntropyBottleneck (z is FSQ-coded), so no quantile parameters: always 0."""
        return self.to_latent.weight.new_zeros(())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], **config) -> "HyperpriorCodec":
        """Build a codec sized like ``config`` and load ``state_dict`` (CDF buffers included)."""
        codec = cls(**config)
        codec.load_state_dict(state_dict)
        return codec
