"""Semantic distillation: a training-only head makes the hyperprior's semantics predict a teacher.

OneDC's key idea (docs/architecture.md §1): the semantic features ``sem`` decoded from the hyperprior are
trained to predict a pretrained generative tokenizer's tokens, so the one-step generator is
conditioned on something that already "means" the image::

    sem (B,Cs,h,w) -> conv1x1 -> pixel shuffle x`upsample` -> +2D sincos pos -> transformer blocks -> linear
        VQ teacher     : logits (B,K,H,W)  -> CE(logits, indices)
                                              + mse_weight * MSE(softmax(logits) @ codebook, z_q)
        feature teacher: features (B,C,H,W) -> 1 - cos (or MSE) against the teacher's patch features

``head_type="codeformer"`` swaps the transformer head for the paper's Swin head
(:class:`~onedc.modules.codeformer_head.CodeformerHead`, docs/reference-model.md §9). The head is dropped
after training; only the loss gradient reaching ``sem`` matters. ``loss_weight`` scales the
whole term (the reference: 1e-3 · [CE + 0.01 · MSE]); the stage's distillation weight
multiplies on top.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onedc.errors import ConfigError
from onedc.modules.codeformer_head import CodeformerHead
from onedc.modules.positions import sincos_2d
from onedc.modules.teachers import TeacherTargets

__all__ = ["DistillOutput", "SemanticDistillLoss", "SemanticPredictorHead", "sincos_pos_embed_2d"]

FEATURE_LOSSES: tuple[str, ...] = ("cosine", "mse")
HEAD_TYPES: tuple[str, ...] = ("transformer", "codeformer")


class DistillOutput(NamedTuple):
    """Terms of the distillation loss for one batch."""

    loss: Tensor
    """loss_weight x the weighted terms, without the stage-level distillation weight."""
    ce: Tensor
    """Cross-entropy against the teacher's indices (VQ); 0 for feature teachers."""
    mse: Tensor
    """VQ: MSE(softmax(logits) @ codebook, quantised latent); feature: the feature loss."""
    accuracy: Tensor
    """VQ: top-1 token accuracy; feature: mean cosine similarity (detached metrics)."""
    prediction: Tensor
    """Logits (B, K, h, w) or predicted features (B, C, h, w), on the target grid."""


def sincos_pos_embed_2d(dim: int, height: int, width: int, *, device: torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """The head's fixed (height*width, dim) position code: :func:`onedc.modules.positions.sincos_2d`
    with integer ("index") positions, MAE-style, so the head runs unchanged on crops and full images."""
    return sincos_2d(height, width, dim, device, scale="index", dtype=dtype)


class SemanticPredictorHead(nn.Module):
    """Training-only head mapping semantic features to teacher logits or features.

    ``sem`` (B, in, h, w) -> conv1x1 to ``hidden * upsample**2`` -> pixel shuffle (learned
    sub-pixel upsampling, x``upsample``) -> + sincos 2D position -> ``depth`` pre-norm
    transformer blocks (GELU) -> LayerNorm -> linear to ``out_dim`` -> (B, out_dim,
    h*upsample, w*upsample). Each hyperprior position predicts its own ``upsample**2`` teacher
    tokens: a bilinear upsampling can only blend neighbouring positions, so the tokens inside one
    cell could not differ except through attention (measured, tiny preset: train token accuracy
    after 300 steps 0.27 with bilinear, 0.31 with the pixel shuffle, one run each).
    """

    def __init__(self, in_channels: int, out_dim: int, *, hidden: int = 256, depth: int = 2,
                 heads: int = 4, upsample: int = 2) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"predictor head hidden={hidden} is not divisible by heads={heads}")
        if hidden % 4:
            raise ConfigError(f"predictor head hidden={hidden} must be divisible by 4 (2D position code)")
        if upsample < 1:
            raise ConfigError(f"predictor head upsample must be >= 1, got {upsample}")
        self.upsample = int(upsample)
        self.hidden = int(hidden)
        self.proj = nn.Conv2d(in_channels, hidden * self.upsample**2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(self.upsample)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, sem: Tensor) -> Tensor:
        """(B, in, h, w) -> (B, out_dim, h*upsample, w*upsample)."""
        x = self.shuffle(self.proj(sem))
        batch, _, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + sincos_pos_embed_2d(self.hidden, height, width, device=x.device,
                                              dtype=tokens.dtype)[None]
        for block in self.blocks:
            tokens = block(tokens)
        out = self.out(self.norm(tokens))
        return out.transpose(1, 2).reshape(batch, -1, height, width)


class SemanticDistillLoss(nn.Module):
    """Predictor head + loss that distils a teacher's targets into the semantic features.

    ``teacher_kind`` is :attr:`Teacher.kind` ("vq" or "feature"). VQ: the head predicts
    ``num_codes`` logits per token and the loss is ``CE + mse_weight * MSE(softmax @ codebook,
    z_q)``; the MSE term rewards putting probability on codes near the right one, not only on
    the right one. Feature: the head predicts ``target_dim`` features and the loss is
    ``1 - cos`` (``feature_loss="cosine"``, scale-free, the usual choice for DINO features) or
    the MSE. When the head's grid differs from the teacher's (image sizes that are not
    multiples of the teacher stride), the prediction is resized bilinearly to the target grid
    before the loss. The loss runs in float32 whatever the autocast dtype of the head.
    """

    def __init__(self, in_channels: int, *, teacher_kind: str, target_dim: int,
                 num_codes: int | None = None, hidden: int = 256, depth: int = 2, heads: int = 4,
                 upsample: int = 2, mse_weight: float = 0.01, feature_loss: str = "cosine",
                 head_type: str = "transformer", window: int = 16, loss_weight: float = 1.0) -> None:
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ConfigError(f"unknown distillation head type {head_type!r}; valid: {', '.join(HEAD_TYPES)}")
        if teacher_kind == "vq":
            if not num_codes:
                raise ConfigError("a vq teacher's distillation loss needs num_codes (codebook size)")
            out_dim = int(num_codes)
        elif teacher_kind == "feature":
            if feature_loss not in FEATURE_LOSSES:
                raise ConfigError(f"unknown feature_loss {feature_loss!r}; valid: {', '.join(FEATURE_LOSSES)}")
            out_dim = int(target_dim)
        else:
            raise ConfigError(f"unknown teacher kind {teacher_kind!r}; valid kinds: vq, feature")
        self.teacher_kind = teacher_kind
        self.target_dim = int(target_dim)
        self.num_codes = None if num_codes is None else int(num_codes)
        self.mse_weight = float(mse_weight)
        self.feature_loss = feature_loss
        self.loss_weight = float(loss_weight)
        if head_type == "codeformer":
            if upsample != 2:
                raise ConfigError(f"the codeformer head upsamples x2 (pixel shuffle), got upsample={upsample}")
            self.head: nn.Module = CodeformerHead(in_channels, out_dim, dim=hidden, depth=depth, heads=heads,
                                                  window=window)
        else:
            self.head = SemanticPredictorHead(in_channels, out_dim, hidden=hidden, depth=depth,
                                              heads=heads, upsample=upsample)

    def forward(self, sem: Tensor, targets: TeacherTargets,
                codebook: Tensor | None = None) -> DistillOutput:
        """Loss terms of ``sem`` (B, Cs, h, w) against the teacher's ``targets``.

        ``codebook`` (K, C) is required for VQ teachers (``teacher.codebook()``).
        """
        # float32 for the loss: bf16 softmax/log-softmax over 1024 codes loses the small terms.
        pred = self.head(sem).float()
        grid = tuple(targets.latents.shape[-2:])
        if tuple(pred.shape[-2:]) != grid:
            pred = F.interpolate(pred, size=grid, mode="bilinear", align_corners=False)
        if self.teacher_kind == "vq":
            return self._vq_loss(pred, targets, codebook)
        return self._feature_loss(pred, targets.latents.float())

    def _vq_loss(self, logits: Tensor, targets: TeacherTargets, codebook: Tensor | None) -> DistillOutput:
        if targets.indices is None:
            raise ValueError("vq distillation needs targets with indices (a VQ teacher's targets)")
        if codebook is None or codebook.shape != (self.num_codes, self.target_dim):
            shape = None if codebook is None else tuple(codebook.shape)
            raise ValueError(f"vq distillation needs the teacher codebook of shape "
                             f"({self.num_codes}, {self.target_dim}), got {shape}")
        indices = targets.indices.long()
        ce = F.cross_entropy(logits, indices)
        soft = torch.einsum("bkhw,kc->bchw", logits.softmax(dim=1), codebook.float())
        mse = F.mse_loss(soft, targets.latents.float())
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == indices).float().mean()
        return DistillOutput(self.loss_weight * (ce + self.mse_weight * mse), ce, mse, accuracy, logits)

    def _feature_loss(self, pred: Tensor, target: Tensor) -> DistillOutput:
        cos = F.cosine_similarity(pred, target, dim=1)
        loss = (1.0 - cos).mean() if self.feature_loss == "cosine" else F.mse_loss(pred, target)
        return DistillOutput(self.loss_weight * loss, pred.new_zeros(()), loss, cos.detach().mean(), pred)
