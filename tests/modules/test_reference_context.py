"""Mechanics of the reference codec against independent formulae (docs/reference-model.md §4.3, §4.5, §4.6)."""
from __future__ import annotations

import math

import pytest
import torch

from onedc.modules.fsq import FSQ
from onedc.modules.reference.context import (
    QuantiseResiduals,
    gather_step,
    run_context_model,
    scatter_step,
    step_mask,
    zero_residuals,
)
from onedc.modules.reference.rate import estimated_y_bits, noisy_y_bits

#: §4.5 table, written out as (row parity, col parity) per step and channel group G0..G3.
A, B, C, D = (0, 0), (0, 1), (1, 0), (1, 1)
TABLE = [(A, B, C, D), (D, C, B, A), (C, D, A, B), (B, A, D, C)]


@pytest.mark.parametrize("height,width", [(4, 6), (5, 7), (1, 1)])
def test_four_steps_cover_every_element_exactly_once(height, width):
    channels = 8
    masks = torch.stack([step_mask(k, channels, height, width)[0] for k in range(4)])  # (4, C, h, w)
    assert torch.equal(masks.sum(0), torch.ones(channels, height, width))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # One channel group per position per step: within a step, the four groups' masks are disjoint.
    per_group = masks.view(4, 4, channels // 4, height, width)
    assert torch.equal(per_group.sum(1), torch.ones(4, channels // 4, height, width))
    for step, classes in enumerate(TABLE):
        for group, (row_parity, col_parity) in enumerate(classes):
            for r in range(height):
                for c in range(width):
                    want = float(r % 2 == row_parity and c % 2 == col_parity)
                    assert masks[step, 2 * group, r, c].item() == want, (step, group, r, c)


def test_gather_and_scatter_are_inverse_on_a_step():
    values = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(2))
    for step in range(4):
        masked = values * step_mask(step, 16, 6, 5)
        coded = gather_step(values, step)
        assert coded.shape == (2, 4, 6, 5)
        assert torch.equal(scatter_step(coded, step), masked)
        # group 1 channel 0 of step 0 sits at class B = (even row, odd col)
        if step == 0:
            assert coded[0, 0, 0, 1] == values[0, 4, 0, 1]


def test_fsq_index_order_is_channel_0_least_significant():
    fsq = FSQ([4] * 7)
    z = torch.randn(3, 7, 4, 5, generator=torch.Generator().manual_seed(0)) * 2
    half_l = 3 * 1.001 / 2
    shift = math.atanh(0.5 / half_l)
    assert shift == pytest.approx(0.346199, abs=1e-6)
    q = torch.round(torch.tanh(z.double() + shift) * half_l - 0.5)  # in {-2, -1, 0, 1}
    expected = sum((q[:, d] + 2) * 4 ** d for d in range(7)).long()
    z_hat = fsq(z)
    assert torch.equal(z_hat.double(), q / 2)
    assert torch.equal(fsq.codes_to_indices(z_hat), expected)
    digits = torch.stack([(expected // 4 ** d) % 4 for d in range(7)], dim=1)
    assert torch.equal(fsq.indices_to_codes(expected), ((digits - 2) / 2).float())


def _toy_prior(shape):
    """A step prior whose means/scales at step k depend on ŷ so far (a fixed mixing of all of it)."""
    weight = torch.randn(shape[1], shape[1], generator=torch.Generator().manual_seed(0)) * 0.3
    seen: list[torch.Tensor] = []

    def prior(step, so_far):
        seen.append(so_far.clone())
        mixed = torch.einsum("oc,bchw->bohw", weight, so_far)
        return 1.0 + mixed.abs() + step, 3.0 * torch.tanh(mixed) - step

    return prior, seen


def test_context_steps_see_only_earlier_steps_and_decoder_replays():
    shape = (1, 8, 4, 6)
    y = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4
    prior, seen = _toy_prior(shape)
    out = run_context_model(prior, QuantiseResiduals(y), shape)
    covered = torch.zeros(shape)
    for step in range(4):
        assert not (seen[step] * (1 - covered)).any()  # nothing beyond the coded steps is visible
        assert torch.equal(seen[step], out.y_hat * covered)
        covered = covered + step_mask(step, 8, 4, 6)
    assert torch.equal(out.q, torch.round(y - out.means))
    assert torch.allclose(out.y_hat, out.q + out.means)
    sent = [gather_step(out.q, k) for k in range(4)]
    decoded = run_context_model(prior, lambda k, m, mu, s: scatter_step(sent[k], k), shape)
    assert torch.equal(decoded.y_hat, out.y_hat) and torch.equal(decoded.scales, out.scales)


def test_z_only_steps_give_the_chained_means():
    shape = (1, 4, 2, 2)
    prior, _ = _toy_prior(shape)
    out = run_context_model(prior, zero_residuals, shape)
    assert torch.equal(out.y_hat, out.means) and not out.q.any()


def test_rounding_is_half_to_even():
    y = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]).view(1, 1, 1, 5)
    mask = torch.ones_like(y)
    q = QuantiseResiduals(y)(0, mask, torch.zeros_like(y), mask)
    assert q.flatten().tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_eval_rate_estimate_formula():
    q = torch.tensor([0.0, 1.0, -3.0, 0.0, 2.0])
    sigma = torch.tensor([1.0, 0.5, 2.0, -0.3, -0.3])
    want = []
    for qi, si in zip(q.tolist(), sigma.tolist()):
        s = min(max(si, 1e-5), 1e10)
        p = _phi((qi + 0.5) / s) - _phi((qi - 0.5) / s)
        want.append(max(0.0, -math.log2(p + 1e-5)))
    got = estimated_y_bits(q, sigma)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
    # a negative scale means σ' = 1e-5: free at q = 0, the 1e-5 floor (16.6 bits) otherwise
    assert got[3] == pytest.approx(0.0, abs=1e-4) and got[4] == pytest.approx(-math.log2(1e-5), rel=1e-5)


def test_training_rate_proxy_formula():
    residual = torch.tensor([0.2, -1.3, 4.0])
    noise = torch.tensor([0.1, -0.2, 0.4])
    sigma = torch.tensor([0.05, 1.0, 2.0])  # the first is lower-bounded at 0.11
    got = noisy_y_bits(residual, sigma, noise)
    want = []
    for r, n, s in zip(residual.tolist(), noise.tolist(), sigma.tolist()):
        v, s = abs(r + n), max(s, 0.11)
        p = max(_phi((0.5 - v) / s) - _phi((-0.5 - v) / s), 1e-9)
        want.append(-math.log2(p))
    assert got.tolist() == pytest.approx(want, rel=1e-4)
