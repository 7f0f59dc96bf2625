"""The reference OneDC codec ``IntraNoAR`` (docs/reference-model.md §1, §4) with the released key layout.

::

    x, v ─ g_a (enc) ─> y, sem ─ h_a (hyper_enc) ─> z ─ FSQ [4]*7 ─> ẑ, 14-bit indices   (z stream)
    ẑ ─ h_s (hyper_dec) ─> f, zs;  f ─ y_prior_fusion ─> P = [scales₀ | means₀];  Q = reduction(P)
    four context steps on y with P, Q ─> ŷ                                              (y stream)
    zs ─ semantic_adaptor ─> S;   g_s (dec)(ŷ, S) ─> F (320 @1/8, the generator's input)

Attribute names are the released ones, so ``state_dict()`` has exactly the 779 keys of
``model_1.safetensors`` (reference/codec.txt) at the default sizes. FSQ has no parameters.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from onedc.modules.fsq import FSQ
from onedc.modules.reference.analysis import ReferenceAnalysis
from onedc.modules.blocks import DepthConvBlock
from onedc.modules.reference.context import (
    ContextOutput,
    QuantiseResiduals,
    StepCoder,
    run_context_model,
    zero_residuals,
)
from onedc.modules.reference.hyper import HyperAnalysis, HyperSynthesis, build_prior_fusion
from onedc.modules.reference.rate import estimated_y_bits, noisy_y_bits
from onedc.modules.reference.synthesis import ReferenceSynthesis, SemanticAdaptor, semantic_tokens

#: The image side must be a multiple of this (z sits at 1/64 of the padded image).
PAD_MULTIPLE = 64


class HyperPrior(NamedTuple):
    """What ẑ gives the y coder and the decoder."""

    prior: Tensor   #: P (2·bottleneck @1/16): scales₀ then means₀
    common: Tensor  #: Q = y_spatial_prior_reduction(P), the context model's common input
    zs: Tensor      #: ẑ-branch feature (bottleneck @1/64), input of the semantic adaptor


class ReferenceCodecOutput(NamedTuple):
    """Everything one pass of :meth:`ReferenceCodec.forward` computes."""

    y: Tensor
    y_hat: Tensor
    z: Tensor
    z_hat: Tensor
    z_indices: Tensor  #: (B, h/64, w/64) int64 in [0, 4^7)
    semantic: Tensor   #: S (semantic_ch @1/64), the generator's cross-attention map
    features: Tensor   #: F (feature_ch @1/8), the generator's input
    q: Tensor
    scales: Tensor
    means: Tensor
    y_bits: Tensor     #: per-element bits: §4.6 eval estimate, or the noisy proxy in training mode

    @property
    def tokens(self) -> Tensor:
        """S as the generator's cross-attention tokens (B, h·w, semantic_ch), row-major (§4.7)."""
        return semantic_tokens(self.semantic)


class ReferenceCodec(nn.Module):
    """The paper's codec: g_a with a UNet2DModel trunk, h_a/h_s with FSQ z, a four-step context model, g_s.

    Defaults are the released full size (internal_ch 512, bottleneck_ch 128, unet_ch_config
    (512, 768, 768), z_fsq_levels [4]*7: 394,147,783 parameters). ``semantic_ch`` (S and the
    SD-1.5 cross-attention width, 768), ``feature_ch`` (F, the SD-1.5 conv_in width, 320),
    ``pix_emb_ch`` (192) and ``latent_ch`` (4) are fixed in the reference; they are arguments
    only so tests can build a small model. GroupNorm(32) needs every width but ``latent_ch``
    and ``pix_emb_ch`` to be a multiple of 32; ``bottleneck_ch`` a multiple of 4 (channel groups).
    """

    def __init__(self, internal_ch: int = 512, bottleneck_ch: int = 128,
                 unet_ch_config: Sequence[int] = (512, 768, 768), z_fsq_levels: Sequence[int] = (4,) * 7, *,
                 semantic_ch: int = 768, feature_ch: int = 320, pix_emb_ch: int = 192, latent_ch: int = 4,
                 attention_head_dim: int = 8) -> None:
        super().__init__()
        unet_ch_config = tuple(int(c) for c in unet_ch_config)
        self.config = dict(internal_ch=internal_ch, bottleneck_ch=bottleneck_ch, unet_ch_config=unet_ch_config,
                           z_fsq_levels=tuple(int(level) for level in z_fsq_levels), semantic_ch=semantic_ch,
                           feature_ch=feature_ch, pix_emb_ch=pix_emb_ch, latent_ch=latent_ch,
                           attention_head_dim=attention_head_dim)
        self.fsq = FSQ(list(z_fsq_levels))
        z_ch = self.fsq.dim
        self.enc = ReferenceAnalysis(internal_ch=internal_ch, bottleneck_ch=bottleneck_ch,
                                     unet_ch_config=unet_ch_config, feature_ch=feature_ch, pix_emb_ch=pix_emb_ch,
                                     latent_ch=latent_ch, attention_head_dim=attention_head_dim)
        # Ambiguity (docs/reference-model.md gives only full-size widths): the 768/512 of h_a's fusion are
        # taken as the trunk's semantic width and internal_ch, g_s's 256 as internal_ch // 2.
        self.dec = ReferenceSynthesis(bottleneck_ch=bottleneck_ch, internal_ch=internal_ch,
                                      semantic_ch=semantic_ch, feature_ch=feature_ch)
        self.semantic_adaptor = SemanticAdaptor(bottleneck_ch=bottleneck_ch, semantic_ch=semantic_ch)
        self.hyper_enc = HyperAnalysis(bottleneck_ch=bottleneck_ch, semantic_in_ch=unet_ch_config[-1],
                                       internal_ch=internal_ch, z_ch=z_ch)
        self.hyper_dec = HyperSynthesis(bottleneck_ch=bottleneck_ch, z_ch=z_ch)
        self.y_prior_fusion = build_prior_fusion(bottleneck_ch)
        self.y_spatial_prior_reduction = nn.Conv2d(2 * bottleneck_ch, bottleneck_ch, 1)
        self.y_spatial_prior_adaptor_1 = DepthConvBlock(2 * bottleneck_ch)
        self.y_spatial_prior_adaptor_2 = DepthConvBlock(2 * bottleneck_ch)
        self.y_spatial_prior_adaptor_3 = DepthConvBlock(2 * bottleneck_ch)
        self.y_spatial_prior = nn.Sequential(*(DepthConvBlock(2 * bottleneck_ch) for _ in range(3)))

    # -- encoder side ---------------------------------------------------------------------------
    def analyse(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """g_a: padded image x in [-1, 1] and VAE latent v (× 0.18215) → (y @1/16, sem @1/64)."""
        if x.shape[-2] % PAD_MULTIPLE or x.shape[-1] % PAD_MULTIPLE:
            raise ValueError(f"image sides must be multiples of {PAD_MULTIPLE} (pad first), got {tuple(x.shape[-2:])}")
        return self.enc(x, v)

    def hyper_analyse(self, y: Tensor, sem: Tensor) -> Tensor:
        """h_a(y, sem) → z (unquantised, fsq.dim @1/64)."""
        return self.hyper_enc(y, sem)

    def quantise_z(self, z: Tensor) -> Tensor:
        """FSQ codes ẑ in {−1, −½, 0, ½} (float32 arithmetic; straight-through in training)."""
        return self.fsq(z)

    # -- both sides -----------------------------------------------------------------------------
    def hyper_synthesise(self, z_hat: Tensor) -> HyperPrior:
        """h_s and the prior fusion: ẑ → P, Q and zs."""
        features, zs = self.hyper_dec(z_hat)
        prior = self.y_prior_fusion(features)
        return HyperPrior(prior=prior, common=self.y_spatial_prior_reduction(prior), zs=zs)

    def step_prior(self, step: int, y_hat_so_far: Tensor, hyper: HyperPrior) -> tuple[Tensor, Tensor]:
        """Raw (scales, means) of context step ``step`` from what is decoded so far (§4.5)."""
        if step == 0:
            params = hyper.prior
        else:
            adaptor = (self.y_spatial_prior_adaptor_1, self.y_spatial_prior_adaptor_2,
                       self.y_spatial_prior_adaptor_3)[step - 1]
            params = self.y_spatial_prior(adaptor(torch.cat([y_hat_so_far, hyper.common], dim=1)))
        scales, means = params.chunk(2, dim=1)  # scales first, means second (§11.3)
        return scales, means

    def code_y(self, hyper: HyperPrior, coder: StepCoder) -> ContextOutput:
        """The four context steps with ``coder`` deciding each step's q (encode, decode or z-only)."""
        batch, _, height, width = hyper.prior.shape
        shape = (batch, hyper.prior.shape[1] // 2, height, width)
        return run_context_model(lambda step, so_far: self.step_prior(step, so_far, hyper), coder, shape,
                                 device=hyper.prior.device, dtype=hyper.prior.dtype)

    def semantic_map(self, zs: Tensor) -> Tensor:
        """Semantic adaptor: zs → S (the generator's cross-attention map, from ẑ only)."""
        return self.semantic_adaptor(zs)

    def synthesise(self, y_hat: Tensor, semantic: Tensor) -> Tensor:
        """g_s(ŷ, S) → F, the generator's input features at 1/8."""
        return self.dec(y_hat, semantic)

    def decode_from_z(self, z_hat: Tensor, coder: StepCoder) -> tuple[ContextOutput, Tensor, Tensor]:
        """Decoder side from ẑ: (context output with ŷ, S, F); ``coder`` supplies each step's q."""
        hyper = self.hyper_synthesise(z_hat)
        context = self.code_y(hyper, coder)
        semantic = self.semantic_map(hyper.zs)
        return context, semantic, self.synthesise(context.y_hat, semantic)

    def uncoded_forward(self, x: Tensor, v: Tensor, z_only: bool = False) -> ReferenceCodecOutput:
        """:meth:`forward` of this class whatever a subclass adds: the pass without an entropy coder.

        The training stages use it (``onedc.stages.common.codec_pass``): a coding subclass's eval
        pass also runs the rANS coder and its float64 decisions so that ŷ is the file's, 5.2× the
        time of this pass at 512² full size (2 CPU threads: 38.2 s against 7.4 s). Rate estimate,
        scales and means are the same; ŷ differs only where the coder's 2⁻¹⁶ grid of μ moves a
        rounding (measured on random weights: F within 2e-5 at 256², 0.08 at 512²).
        """
        return ReferenceCodec.forward(self, x, v, z_only=z_only)

    def forward(self, x: Tensor, v: Tensor, z_only: bool = False) -> ReferenceCodecOutput:
        """One pass without an entropy coder: quantised ŷ and ẑ, S, F and the rate estimate.

        ``z_only`` is the ``exlow_bpp0034`` mode: ŷ = the prior means, nothing of y is coded.
        In training mode ŷ rounds straight-through and ``y_bits`` is the noisy proxy.
        """
        y, sem = self.analyse(x, v)
        z = self.hyper_analyse(y, sem)
        z_hat = self.quantise_z(z)
        coder = zero_residuals if z_only else QuantiseResiduals(y, straight_through=self.training)
        context, semantic, features = self.decode_from_z(z_hat, coder)
        if z_only:
            y_bits = torch.zeros_like(y)
        elif self.training:
            y_bits = noisy_y_bits(y - context.means, context.scales)
        else:
            y_bits = estimated_y_bits(context.q, context.scales)
        return ReferenceCodecOutput(
            y=y, y_hat=context.y_hat, z=z, z_hat=z_hat, z_indices=self.fsq.codes_to_indices(z_hat),
            semantic=semantic, features=features, q=context.q, scales=context.scales, means=context.means,
            y_bits=y_bits,
        )
