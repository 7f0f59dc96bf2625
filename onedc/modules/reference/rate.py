"""Rate of y as the reference estimates it (docs/reference-model.md §4.6): the eval figure and the training proxy.

Both model the coded residual q = round(y − μ) as a zero-mean Gaussian of the step's σ,
discretised to unit bins. z is not part of either: it costs a fixed 14 bits per index.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT_HALF = math.sqrt(0.5)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x * _SQRT_HALF)


def estimated_y_bits(q: Tensor, scales: Tensor) -> Tensor:
    """Per-element eval bits (the reference's ``bpp_hard_y`` numerator): max(0, −log₂(P + 1e-5)).

    P = Φ((q + ½)/σ') − Φ((q − ½)/σ') with σ' = clamp(σ, 1e-5, 1e10); σ is the raw scale, so
    negative scales count as 1e-5 (almost all mass on q = 0), as in the reference.
    """
    sigma = scales.clamp(1e-5, 1e10)
    prob = _normal_cdf((q + 0.5) / sigma) - _normal_cdf((q - 0.5) / sigma)
    return (-torch.log2(prob + 1e-5)).clamp_min(0.0)


def noisy_y_bits(residual: Tensor, scales: Tensor, noise: Tensor | None = None) -> Tensor:
    """Per-element training bits on r + U(−½, ½): σ ≥ 0.11, P ≥ 1e-9, bits = −log₂ P (differentiable).

    ``residual`` is y − μ (before rounding); ``noise`` defaults to fresh uniform noise.
    """
    if noise is None:
        noise = torch.empty_like(residual).uniform_(-0.5, 0.5)
    value = (residual + noise).abs()
    sigma = scales.clamp_min(0.11)
    upper = torch.erfc(-(0.5 - value) / (sigma * math.sqrt(2.0)))
    lower = torch.erfc(-(-0.5 - value) / (sigma * math.sqrt(2.0)))
    prob = (0.5 * (upper - lower)).clamp_min(1e-9)
    return -torch.log2(prob)
