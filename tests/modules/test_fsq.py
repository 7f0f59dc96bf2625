import math

import numpy as np
import pytest
import torch

from onedc.modules.streams import pack_indices, unpack_indices
from onedc.modules.fsq import FSQ


@pytest.mark.parametrize("levels", [[4] * 7, [8, 5, 5, 5], [3, 2]])
def test_every_code_round_trips_exactly(levels):
    fsq = FSQ(levels)
    indices = torch.arange(fsq.codebook_size).view(1, 1, -1)
    codes = fsq.indices_to_codes(indices)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert fsq.bits_per_index == math.ceil(math.log2(math.prod(levels)))


def test_forward_uses_exactly_levels_values_and_indices_match():
    fsq = FSQ([4, 4, 4, 4, 4, 4, 4])
    z = torch.randn(3, 7, 5, 6) * 3
    z_hat = fsq(z)
    for c in range(7):
        assert set(torch.unique(z_hat[:, c]).tolist()) <= {-1.0, -0.5, 0.0, 0.5}
    idx = fsq.codes_to_indices(z_hat)
    assert idx.min() >= 0 and idx.max() < 4 ** 7
    assert torch.equal(fsq.indices_to_codes(idx), z_hat)


def test_reference_levels_cost_14_bits():
    assert FSQ([4] * 7).bits_per_index == 14  # 0.0034 bpp at one index per 64x64 block
    assert 14 / 64 ** 2 == pytest.approx(0.0034, abs=1e-4)


def test_straight_through_gradient():
    fsq = FSQ([5, 5])
    z = torch.zeros(1, 2, 1, 1, requires_grad=True)
    fsq(z).sum().backward()
    assert z.grad is not None and (z.grad > 0).all()


def test_bit_packing_is_exact_and_tight():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 14, 17):
        values = rng.integers(0, 2 ** bits, size=37)
        data = pack_indices(values, bits)
        assert len(data) == math.ceil(37 * bits / 8)
        assert np.array_equal(unpack_indices(data, 37, bits), values)
    with pytest.raises(ValueError):
        unpack_indices(b"\x00", 37, 14)
