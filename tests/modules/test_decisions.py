"""Device-independent coding decisions: the rounding grid, table indexes, guard band and fix list."""
from __future__ import annotations

import pytest
import torch
from compressai.entropy_models import GaussianConditional

from onedc.modules.decisions import (
    GUARD,
    MEAN_STEP,
    CodingDecisions,
    apply_fixes,
    decide,
    decision_checksum,
    encode_fixes,
    float64_call,
)

TABLE = torch.exp(torch.linspace(torch.log(torch.tensor(0.11)), torch.log(torch.tensor(256.0)), 64))


def test_indexes_equal_compressai_build_indexes():
    scales = torch.cat([torch.rand(5000) * 300, torch.tensor([0.0, 0.05, 0.11, 255.9, 256.0, 1e4]), TABLE])
    reference = GaussianConditional(TABLE.tolist())
    assert torch.equal(decide(torch.zeros_like(scales), scales, TABLE).indexes, reference.build_indexes(scales))


def test_means_are_rounded_to_the_grid_and_exact_in_float32():
    means = torch.randn(10000, dtype=torch.float64) * 40
    d = decide(means, torch.ones_like(means), TABLE)
    assert torch.equal(d.mean_codes, torch.round(means / MEAN_STEP).long())
    assert (d.means.double() - means).abs().max() <= MEAN_STEP / 2 < 1e-5
    assert torch.equal(d.means.double(), d.mean_codes.double() * MEAN_STEP)  # no float32 rounding


OFFSET = GUARD / 4  # a quarter band: well inside the guard band, far above float64 rounding


def near_boundaries() -> tuple[torch.Tensor, torch.Tensor]:
    """Means a quarter band above a rounding boundary and scales a quarter band above a table scale."""
    k = torch.arange(-20, 20, dtype=torch.float64) * 1000 + 0.5
    means = (k + OFFSET * (1 + k.abs())) * MEAN_STEP
    scales = TABLE[10:50].double() * (1 + OFFSET)
    return means, scales


@pytest.mark.parametrize("which", ["means", "scales"])
def test_the_fix_list_settles_values_on_either_side_of_a_boundary(which):
    means, scales = near_boundaries()
    if which == "means":
        scales = torch.full_like(scales, 3.3)
    else:
        means = torch.zeros_like(means) + 0.1
    encoder = decide(means, scales, TABLE)
    # The "other machine" lands half a band lower: just across every boundary.
    m = means / MEAN_STEP
    lower = (m - 2 * OFFSET * (1 + m.abs())) * MEAN_STEP
    decoder = decide(lower if which == "means" else means, scales * (1 - 2 * OFFSET), TABLE)
    field = "mean_codes" if which == "means" else "indexes"
    assert (getattr(encoder, field) != getattr(decoder, field)).all()  # without fixes: every decision flips
    assert (encoder.margin < 1).all()
    fixed = apply_fixes(decoder, encode_fixes(encoder), num_tables=TABLE.numel())
    assert torch.equal(fixed.mean_codes, encoder.mean_codes) and torch.equal(fixed.indexes, encoder.indexes)


def test_values_far_from_boundaries_need_no_fix():
    means = torch.randn(1, 8, 16, 16, dtype=torch.float64) * 5
    d = decide(means, torch.rand_like(means) * 20, TABLE)
    margin_free = d.margin >= 2
    assert margin_free.float().mean() > 0.999  # the band is ~1e-9 of a value: almost nothing is near
    fixes = encode_fixes(d)
    assert fixes[0] == int((~margin_free).sum())
    assert apply_fixes(d, encode_fixes(d), TABLE.numel()).mean_codes.equal(d.mean_codes)


def test_fix_list_round_trip_and_malformed_lists():
    means, scales = near_boundaries()
    d = decide(means.view(1, 1, 4, 10), scales.view(1, 1, 4, 10), TABLE)
    data = encode_fixes(d)
    assert data[0] == 40
    for bad in (data[:-1], data + b"\x00", b"\x05", bytes([1, 200, 1, 2, 3])):
        with pytest.raises(ValueError):
            apply_fixes(d, bad, TABLE.numel())
    assert encode_fixes(decide(torch.zeros(1, 2, 2, 2) + 0.1, torch.ones(1, 2, 2, 2), TABLE)) == b"\x00"


def test_checksum_sees_decisions_and_symbols():
    d = decide(torch.randn(1, 4, 8, 8) * 3, torch.rand(1, 4, 8, 8) * 9, TABLE)
    symbols = torch.randint(-5, 5, (1, 4, 8, 8))
    base = decision_checksum(d, symbols)
    other_mean = CodingDecisions(d.mean_codes + (torch.arange(256).view(1, 4, 8, 8) == 7), d.indexes, d.margin)
    other_symbol = symbols.clone()
    other_symbol[0, 3, 7, 7] += 1
    assert len({base, decision_checksum(other_mean, symbols), decision_checksum(d, other_symbol)}) == 3


def test_float64_call_ignores_autocast_layout_and_dtype():
    conv = torch.nn.Sequential(torch.nn.Conv2d(7, 16, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(16, 8, 1))
    x = torch.randn(2, 7, 6, 5)
    reference = float64_call(conv, x)
    assert reference.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(float64_call(conv, x), reference)
    cl = conv.to(memory_format=torch.channels_last)
    assert torch.equal(float64_call(cl, x.to(memory_format=torch.channels_last)), reference)
    assert all(p.dtype == torch.float32 for p in conv.parameters())  # the module itself is untouched
