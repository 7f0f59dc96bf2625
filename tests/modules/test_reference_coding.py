"""rANS coding of the reference codec's four context steps: exact, machine-independent, checked."""
from __future__ import annotations

import copy

import pytest
import torch

from onedc.errors import CodingMismatchError
from onedc.modules.reference import coding as coding_module
from onedc.modules.reference.codec import ReferenceCodec
from onedc.modules.reference.coding import ReferenceYCoder, reference_scale_table

SMALL = dict(internal_ch=64, bottleneck_ch=32, unet_ch_config=(64, 64, 64), semantic_ch=64, feature_ch=32,
             pix_emb_ch=16)


@pytest.fixture(scope="module")
def coded():
    torch.manual_seed(0)
    codec = ReferenceCodec(**SMALL).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 128, 192, generator=gen) * 2 - 1
    v = torch.randn(1, 4, 16, 24, generator=gen)
    with torch.no_grad():
        out = codec(x, v)
    z_hat = codec.fsq.indices_to_codes(out.z_indices)  # what a decoder rebuilds from the z stream
    coder = ReferenceYCoder(codec)
    return codec, coder, out, z_hat, coder.encode(out.y, z_hat)


def test_scale_table_is_the_references():
    table = reference_scale_table()
    assert len(table) == 256 and table[0] == pytest.approx(0.11) and table[-1] == pytest.approx(64.0)


def test_round_trip_is_exact_and_close_to_the_float_forward(coded):
    codec, coder, out, z_hat, y = coded
    assert y.fixes == b"\x01\x00" * 4  # four steps, each an empty fix list (length 1, count 0)
    decoded = coder.decode(y.stream, y.fixes, y.checksum, z_hat)
    assert torch.equal(decoded, y.y_hat)
    # μ on the 2^-16 grid keeps ŷ within 7.6e-6 of the unrounded forward wherever q agrees.
    close = ((y.y_hat - out.y_hat).abs() <= 1e-4).float().mean().item()
    assert close > 0.999, close


def test_a_decoder_in_bf16_channels_last_makes_the_same_decisions(coded):
    codec, _, _, z_hat, y = coded
    other = copy.deepcopy(codec).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = ReferenceYCoder(other).decode(y.stream, y.fixes, y.checksum,
                                                z_hat.contiguous(memory_format=torch.channels_last))
    assert torch.equal(decoded, y.y_hat)


def test_a_decoder_with_other_decisions_fails(coded, monkeypatch):
    codec, coder, _, z_hat, y = coded
    real = coding_module.decide
    monkeypatch.setattr(coding_module, "decide", lambda m, s, t, snap: real(m, s * 1.2 + 0.1, t, snap=snap))
    with pytest.raises(CodingMismatchError, match="coding decisions differ"):
        coder.decode(y.stream, y.fixes, y.checksum, z_hat)


def test_payload_tracks_the_rate_estimate(coded):
    codec, _, out, _, y = coded
    # Random weights: σ spread over the whole table. The coder snaps σ down to the table (2.5 % steps)
    # and flushes 8 bytes, so the payload runs a little above the §4.6 estimate.
    estimate = out.y_bits.sum().item()
    payload = len(y.stream) * 8
    assert estimate > 1000
    assert 0.95 * estimate < payload < 1.25 * estimate + 64, (payload, estimate)
