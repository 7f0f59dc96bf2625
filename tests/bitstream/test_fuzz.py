"""Fuzzing: whatever bytes ``decompress_bytes`` is given, only BitstreamError subclasses escape."""
from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onedc.coding.bitstream import HEADER_SIZE
from onedc.errors import BitstreamError

# The autouse network/seed fixtures are function-scoped but stateless across examples.
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mutations(draw, size: int):
    """A list of byte edits: overwrite, insert, delete, truncate (positions within ``size``)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, size))
        edits.append((kind, pos, draw(st.binary(min_size=1, max_size=8))))
    return edits


def apply(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, blob in edits:
        pos = min(pos, len(buf))
        if kind == "overwrite":
            buf[pos:pos + len(blob)] = blob[: max(0, len(buf) - pos)]
        elif kind == "insert":
            buf[pos:pos] = blob
        elif kind == "delete":
            del buf[pos:pos + len(blob)]
        else:
            del buf[pos:]
    return bytes(buf)


def with_crcs(data: bytes) -> bytes:
    """Recompute both CRCs, as a forger would, so the damage reaches the entropy decoder."""
    head = bytearray(data[:HEADER_SIZE])
    head[60:64] = struct.pack("<I", zlib.crc32(data[HEADER_SIZE:]))
    head[64:68] = struct.pack("<I", zlib.crc32(bytes(head[:64])))
    return bytes(head) + data[HEADER_SIZE:]


def decode_or_bitstream_error(codec, data: bytes, original: bytes) -> None:
    try:
        decoded = codec.decompress_bytes(data)
    except BitstreamError:
        return
    # Success is only possible when the file still checks out: then the header must be sane.
    assert decoded.image.shape == (3, decoded.header.height, decoded.header.width)
    if data == original:
        assert torch.equal(decoded.image, codec.decompress_bytes(original).image)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_random_mutations_raise_only_bitstream_errors(onedc_codec, small_file, data):
    edits = data.draw(mutations(len(small_file)))
    decode_or_bitstream_error(onedc_codec, apply(small_file, edits), small_file)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_forged_payloads_reach_the_decoder_and_fail_cleanly(onedc_codec, small_file, data):
    # Damage only the payload and keep the lengths: the CRCs are recomputed, so the z/y parsers
    # and CompressAI's rANS decoder see garbage (this is what once crashed the process).
    payload = bytearray(small_file[HEADER_SIZE:])
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    decode_or_bitstream_error(onedc_codec, with_crcs(small_file[:HEADER_SIZE] + bytes(payload)), small_file)


@settings(FUZZ, max_examples=60)
@given(offset=st.integers(4, 59), value=st.integers(0, 255))
def test_forged_header_fields_fail_cleanly(onedc_codec, small_file, offset, value):
    data = bytearray(small_file)
    data[offset] = value
    decode_or_bitstream_error(onedc_codec, with_crcs(bytes(data)), small_file)


@pytest.mark.parametrize("y_stream", [b"", b"\x00" * 4, b"\xff" * 8, b"\xff" * 12, bytes(range(256)) * 3])
def test_short_or_garbage_y_streams_never_crash(onedc_codec, small_file, y_stream):
    # Replace the y stream wholesale (lengths rewritten): lengths the rANS coder can never write
    # are refused, the others decode to something or raise, but never crash the process.
    z_len, _, fix_len = struct.unpack_from("<III", small_file, 44)
    head = bytearray(small_file[:HEADER_SIZE])
    struct.pack_into("<I", head, 48, len(y_stream))
    data = with_crcs(bytes(head) + small_file[HEADER_SIZE:HEADER_SIZE + z_len + fix_len] + y_stream)
    if len(y_stream) < 8:
        with pytest.raises(BitstreamError, match="not a rANS stream"):
            onedc_codec.decompress_bytes(data)
    else:
        decode_or_bitstream_error(onedc_codec, data, small_file)


def test_coder_exceptions_are_wrapped(onedc_codec, small_file, monkeypatch):
    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(type(onedc_codec.codec), "decompress", broken)
    with pytest.raises(BitstreamError, match="entropy decoder rejected the payload .IndexError"):
        onedc_codec.decompress_bytes(small_file)
