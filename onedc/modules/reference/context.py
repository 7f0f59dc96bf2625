"""Four-step spatial/channel context model of y (docs/reference-model.md §4.5), independent of any entropy coder.

y's channels form four groups G0..G3 and its positions four classes by (row parity, column
parity): A = (even, even), B = (even, odd), C = (odd, even), D = (odd, odd), tiled from the top
left. Step k codes, in every group g, the class ``STEP_CLASSES[k][g]``; the four steps
together cover every element of y exactly once, one group per position per step::

    step 0  (A, B, C, D)   scales/means from P (hyperprior only)
    step 1  (D, C, B, A)   from y_spatial_prior(adaptor_1([ŷ₀, Q]))
    step 2  (C, D, A, B)   from y_spatial_prior(adaptor_2([ŷ₀ + ŷ₁, Q]))
    step 3  (B, A, D, C)   from y_spatial_prior(adaptor_3([ŷ₀ + ŷ₁ + ŷ₂, Q]))

Per step, with mask M: μ = means·M, σ = scales·M, q = the coded integer residual on M
(zero elsewhere), ŷ_k = q + μ. :func:`run_context_model` drives the recursion; what q is comes
from a :class:`StepCoder` callback, so the same loop serves the encoder (round y − μ, and an
entropy coder may queue the symbols), the decoder (an entropy decoder returns the symbols)
and the z-only mode (q = 0, so ŷ is the prior means).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor

NUM_STEPS = 4
NUM_GROUPS = 4
#: STEP_CLASSES[k][g]: spatial class coded in channel group g at step k; class = 2·(row % 2) + (col % 2).
STEP_CLASSES: tuple[tuple[int, int, int, int], ...] = ((0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1), (1, 0, 3, 2))


def spatial_classes(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """(height, width) int64 map of the spatial class of every position: A = 0, B = 1, C = 2, D = 3."""
    rows = torch.arange(height, device=device).remainder(2).view(-1, 1)
    cols = torch.arange(width, device=device).remainder(2).view(1, -1)
    return 2 * rows + cols


def step_mask(step: int, channels: int, height: int, width: int, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, channels, height, width) mask, 1 on the elements of y that ``step`` codes, 0 elsewhere."""
    if not 0 <= step < NUM_STEPS:
        raise ValueError(f"step must be in 0..{NUM_STEPS - 1}, got {step}")
    if channels % NUM_GROUPS:
        raise ValueError(f"y needs a multiple of {NUM_GROUPS} channels, got {channels}")
    classes = spatial_classes(height, width, device)
    per_group = torch.stack([classes == STEP_CLASSES[step][g] for g in range(NUM_GROUPS)])  # (4, h, w)
    return per_group.repeat_interleave(channels // NUM_GROUPS, dim=0).unsqueeze(0).to(dtype)


def gather_step(values: Tensor, step: int) -> Tensor:
    """(B, C, h, w) → (B, C/4, h, w): the one value per group-channel and position that ``step`` codes.

    This is the y stream's coded tensor of a step (§7: the sum of the step's four masked channel
    groups, flattened channel-major by the coder); :func:`scatter_step` is its inverse.
    """
    mask = step_mask(step, values.shape[1], values.shape[2], values.shape[3], device=values.device, dtype=values.dtype)
    return (values * mask).unflatten(1, (NUM_GROUPS, -1)).sum(dim=1)


def scatter_step(values: Tensor, step: int) -> Tensor:
    """(B, C/4, h, w) → (B, C, h, w): put a step's coded values back on its mask (zeros elsewhere)."""
    channels = values.shape[1] * NUM_GROUPS
    mask = step_mask(step, channels, values.shape[2], values.shape[3], device=values.device, dtype=values.dtype)
    return values.repeat(1, NUM_GROUPS, 1, 1) * mask


class StepCoder(Protocol):
    """What a step's integer residual q is: ``coder(step, mask, means, scales) -> q``.

    ``means`` and ``scales`` are already masked (zero off ``mask``); the return value must be
    integer-valued on ``mask`` and zero elsewhere, shaped like ``means``. An entropy coder that
    codes with rounded means (``onedc.modules.decisions``) returns ``(q, coded_means)`` instead,
    and ŷ then takes ``q + coded_means``.
    """

    def __call__(self, step: int, mask: Tensor, means: Tensor, scales: Tensor) -> Tensor: ...


class QuantiseResiduals:
    """Encoder-side :class:`StepCoder`: q = round((y − μ)·M), half to even (``torch.round``).

    With ``straight_through`` (training) the rounding passes gradients unchanged.
    """

    def __init__(self, y: Tensor, straight_through: bool = False) -> None:
        self.y = y
        self.straight_through = straight_through

    def __call__(self, step: int, mask: Tensor, means: Tensor, scales: Tensor) -> Tensor:
        residual = (self.y - means) * mask
        rounded = torch.round(residual)
        if self.straight_through:
            return residual + (rounded - residual).detach()
        return rounded


def zero_residuals(step: int, mask: Tensor, means: Tensor, scales: Tensor) -> Tensor:
    """z-only :class:`StepCoder` (§4.9): nothing is coded, so ŷ_k = μ_k·M_k."""
    return torch.zeros_like(means)


class ContextOutput(NamedTuple):
    """Result of the four steps; every element carries the values of the step that coded it."""

    y_hat: Tensor   #: Σ_k (q_k + μ_k)
    q: Tensor       #: Σ_k q_k, the coded integer residuals
    scales: Tensor  #: Σ_k σ_k (raw network output: may be negative, clamped only by rate/coder)
    means: Tensor   #: Σ_k μ_k


#: (step, ŷ so far) → raw (scales, means) of the whole tensor, before masking.
StepPrior = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def run_context_model(step_prior: StepPrior, coder: StepCoder, shape: torch.Size | tuple[int, ...], *,
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> ContextOutput:
    """Run the four context steps on a y of ``shape`` (B, C, h, w): the same loop on both coder sides.

    ``step_prior`` gives each step's scales and means from what is decoded so far (the
    encoder and the decoder feed it identical ŷ, so they compute identical μ, σ); ``coder``
    turns them into the step's q (see :class:`StepCoder`).
    """
    _, channels, height, width = shape
    y_hat = torch.zeros(shape, device=device, dtype=dtype)
    q_sum, scales_sum, means_sum = torch.zeros_like(y_hat), torch.zeros_like(y_hat), torch.zeros_like(y_hat)
    for step in range(NUM_STEPS):
        scales_raw, means_raw = step_prior(step, y_hat)
        mask = step_mask(step, channels, height, width, device=y_hat.device, dtype=dtype)
        means, scales = means_raw * mask, scales_raw * mask
        q = coder(step, mask, means, scales)
        if isinstance(q, tuple):  # (q, the means the coder codes with): an entropy coder's rounded μ
            q, means = q
        if q.shape != means.shape:
            raise ValueError(f"step coder returned shape {tuple(q.shape)}, expected {tuple(means.shape)}")
        y_hat = y_hat + (q + means)
        q_sum, scales_sum, means_sum = q_sum + q, scales_sum + scales, means_sum + means
    return ContextOutput(y_hat=y_hat, q=q_sum, scales=scales_sum, means=means_sum)
