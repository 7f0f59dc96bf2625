"""The .onedc container: byte layout, round trip, and one error class per kind of damage."""
from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import pytest

from onedc.coding.bitstream import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    Container,
    decode_container,
    encode_container,
    z_stream_size,
)
from onedc.errors import (
    BadMagicError,
    BitstreamError,
    ChecksumError,
    ModelMismatchError,
    TruncatedBitstreamError,
    UnsupportedVersionError,
)

MODEL_A = bytes(range(16))
MODEL_B = bytes(range(100, 116))


@pytest.fixture()
def container() -> Container:
    # 333x517 at stride 64 -> padded 384x576, z grid 6x9, 54 indices x 14 bits = 95 bytes.
    return Container(model_id=MODEL_A, height=333, width=517, stride=64, z_height=6, z_width=9, z_bits=14,
                     z_stream=bytes(range(95)), y_stream=b"\x01\x02\x03\x04" * 5)


def with_crcs(data: bytes) -> bytes:
    """Recompute both CRCs of a (deliberately edited) file, as a forger would."""
    payload = data[HEADER_SIZE:]
    head = bytearray(data[:HEADER_SIZE])
    head[60:64] = struct.pack("<I", zlib.crc32(payload))
    head[64:68] = struct.pack("<I", zlib.crc32(bytes(head[:64])))
    return bytes(head) + payload


def test_round_trip_keeps_every_field(container):
    data = encode_container(container)
    back = decode_container(data, expected_model_id=MODEL_A)
    assert back == container
    assert (back.pad_bottom, back.pad_right, back.padded_size) == (51, 59, (384, 576))
    assert len(data) == back.file_size == HEADER_SIZE + 95 + 1 + 20 == 184  # + the empty fix list's count
    assert back.bpp() == pytest.approx(184 * 8 / (333 * 517))
    assert back.bpp(payload_only=True) == pytest.approx(116 * 8 / (333 * 517))


def test_bytes_sit_where_the_docstring_says(container):
    container = replace(container, fix_stream=b"\x01\x05\x02\x07", symbol_crc=0xDEADBEEF)
    data = encode_container(container)
    assert HEADER_SIZE == 68 and FORMAT_VERSION == 2 and data[:4] == MAGIC == b"\x89ODC"
    assert struct.unpack_from("<HH", data, 4) == (2, 68)
    assert data[8:24] == MODEL_A
    payload = container.z_stream + container.fix_stream + container.y_stream
    assert struct.unpack_from("<IIHHHHHBBIIIII", data, 24) == (
        333, 517, 51, 59, 64, 6, 9, 14, 0, 95, 20, 4, 0xDEADBEEF, zlib.crc32(payload))
    assert struct.unpack_from("<I", data, 64)[0] == zlib.crc32(data[:64])
    assert data[68:163] == container.z_stream and data[163:167] == container.fix_stream
    assert data[167:] == container.y_stream


def test_version_1_files_keep_their_60_byte_layout(container):
    old = replace(container, version=1, fix_stream=b"")
    data = encode_container(old)
    assert len(data) == 60 + 95 + 20 and struct.unpack_from("<HH", data, 4) == (1, 60)
    assert struct.unpack_from("<IIHHHHHBBIII", data, 24)[-1] == zlib.crc32(old.z_stream + old.y_stream)
    assert decode_container(data) == old
    with pytest.raises(ValueError, match="version 1 has no fix list"):
        encode_container(replace(old, fix_stream=b"\x00"))


def test_z_stream_size_is_bit_packed():
    assert z_stream_size(6, 9, 14) == 95  # 756 bits
    assert z_stream_size(1, 1, 14) == 2 and z_stream_size(2, 2, 2) == 1


def test_describe_lists_header_fields(container):
    fields = container.describe()
    assert fields["model_id"] == MODEL_A.hex()
    assert (fields["height"], fields["width"], fields["z_grid"]) == ("333", "517", "6x9")
    assert (fields["pad_bottom"], fields["pad_right"], fields["file_bytes"]) == ("51", "59", "184")
    assert (fields["fix_bytes"], fields["symbol_crc32"]) == ("1", "00000000")


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1:]


def _bad_inputs(container: Container) -> dict[str, tuple[bytes, type[Exception], str]]:
    data = encode_container(container)
    return {
        "truncated payload": (data[:-1], TruncatedBitstreamError, "truncated"),
        "truncated header": (data[:30], TruncatedBitstreamError, "truncated"),
        "empty file": (b"", TruncatedBitstreamError, "0 bytes"),
        "flipped payload byte": (_flip(data, HEADER_SIZE + 3), ChecksumError, "payload CRC32"),
        "flipped header byte": (_flip(data, 25), ChecksumError, "header CRC32"),
        "wrong magic": (b"\x89PNG" + data[4:], BadMagicError, "not a .onedc file"),
        "newer version": (encode_container(replace(container, version=FORMAT_VERSION + 1)),
                          UnsupportedVersionError, "upgrade onedc"),
        "different model": (encode_container(replace(container, model_id=MODEL_B)), ModelMismatchError,
                            f"{MODEL_B.hex()}, but the given checkpoint is model {MODEL_A.hex()}"),
        "trailing bytes": (data + b"\x00", BitstreamError, "after the end of its payload"),
    }


@pytest.mark.parametrize("case", ["truncated payload", "truncated header", "empty file", "flipped payload byte",
                                  "flipped header byte", "wrong magic", "newer version", "different model",
                                  "trailing bytes"])
def test_each_damage_raises_its_error(container, case):
    data, error, words = _bad_inputs(container)[case]
    with pytest.raises(BitstreamError) as info:
        decode_container(data, expected_model_id=MODEL_A)
    assert type(info.value) is error
    assert words in str(info.value)


def test_the_six_kinds_of_damage_are_distinct_classes(container):
    cases = _bad_inputs(container)
    kinds = {cases[c][1] for c in ("truncated payload", "flipped payload byte", "wrong magic", "newer version",
                                   "different model")}
    assert len(kinds) == 5  # + ImageReadError for a non-image input (test_cli)


def test_model_id_is_checked_only_when_given(container):
    data = encode_container(replace(container, model_id=MODEL_B))
    assert decode_container(data).model_id == MODEL_B


@pytest.mark.parametrize("field,value,words", [
    ("height", 0, "outside 1..65535"),
    ("width", 70000, "outside 1..65535"),
    ("z_height", 7, "does not cover"),
    ("stride", 0, "stride 0"),
    ("z_bits", 0, "z index size"),
])
def test_forged_header_values_are_rejected(container, field, value, words):
    # Write a consistent file, then edit one field and recompute the CRCs as a forger would.
    offsets = {"height": ("<I", 24), "width": ("<I", 28), "stride": ("<H", 36), "z_height": ("<H", 38),
               "z_bits": ("<B", 42)}
    fmt, offset = offsets[field]
    data = bytearray(encode_container(container))
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(BitstreamError, match=words):
        decode_container(with_crcs(bytes(data)))


def test_forged_stream_lengths_are_checked_against_the_file(container):
    data = bytearray(encode_container(container))
    struct.pack_into("<I", data, 48, 10_000)  # y_len beyond the file
    with pytest.raises(TruncatedBitstreamError, match="promises"):
        decode_container(with_crcs(bytes(data)))
    struct.pack_into("<II", data, 44, 96, 19)  # same file length, but z_len off by one vs. the grid
    struct.pack_into("<I", data, 52, 1)
    with pytest.raises(BitstreamError, match="z stream has 96 bytes"):
        decode_container(with_crcs(bytes(data)))


def test_encoder_refuses_fields_no_reader_accepts(container):
    with pytest.raises(ValueError, match="z stream has 94 bytes"):
        encode_container(replace(container, z_stream=bytes(94)))
    with pytest.raises(ValueError, match="model id"):
        encode_container(replace(container, model_id=b"short"))
