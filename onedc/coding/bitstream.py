"""The ``.onedc`` file container: one compressed image, self-describing and checksummed.

A file is a fixed-size header followed by the payload (the z stream, the fix list, then the
y stream). All integers are unsigned little-endian. Format version 2, byte by byte::

    offset size  type     field          meaning
    ------ ----  -------  -------------  -----------------------------------------------------
     0      4    bytes    magic          b"\\x89ODC" (0x89 catches 7-bit / text-mode mangling)
     4      2    u16      version        container format version (this onedc writes 2)
     6      2    u16      header_size    bytes before the payload (68 in version 2)
     8     16    bytes    model_id       first 16 bytes of SHA-256 over the decoder-side weights
    24      4    u32      height         image height in pixels, 1..65535
    28      4    u32      width          image width in pixels, 1..65535
    32      2    u16      pad_bottom     replicate-padded rows below the image (< stride)
    34      2    u16      pad_right      replicate-padded columns right of it (< stride)
    36      2    u16      stride         pixels per z position (the codec's multiple, 64)
    38      2    u16      z_height       z grid rows    = (height + pad_bottom) / stride
    40      2    u16      z_width        z grid columns = (width + pad_right) / stride
    42      1    u8       z_bits         bits per fixed-length z index (14 for FSQ [4]*7)
    43      1    u8       flags          bit 0: z-only file (no y stream, no fix list); other bits 0
    44      4    u32      z_len          bytes of the z stream = ceil(z_height*z_width*z_bits/8)
    48      4    u32      y_len          bytes of the y stream (CompressAI rANS)
    52      4    u32      fix_len        bytes of the fix list (1 when it is empty)
    56      4    u32      symbol_crc     CRC32 of the coding decisions and symbols of ŷ
    60      4    u32      payload_crc    zlib.crc32 of the payload (bytes 68 .. end)
    64      4    u32      header_crc     zlib.crc32 of header bytes 0..63
    68   z_len   bytes    z stream       bit-packed FSQ indices, MSB first, row-major
    ..  fix_len  bytes    fix list       the encoder's decisions near a boundary (onedc.modules.decisions)
    ..   y_len   bytes    y stream       rANS-coded ŷ (one image)

A **z-only** file (flag bit 0; ``onedc compress --z-only``, the published model's extreme-rate mode,
docs/reference-model.md §4.9) carries the z stream only: ``y_len`` and ``fix_len`` are 0 and
``symbol_crc`` is 0, so it is exactly 68 bytes + the z stream. Its decoder takes ŷ to be the
hyperprior's means (each family's ``z_only_latents``). Format-1 files have no flags.

``symbol_crc`` lets the decoder prove that it repeated the encoder's integer decisions (rANS
table and mean of every ŷ symbol) and decoded the same symbols: a mismatch is an error, never a
silently wrong picture. Version 1 (60-byte header: no fix_len, no symbol_crc, no fix list) is
still read; its decisions came from float32 and only decode on the kind of machine that encoded.

The file ends exactly after the y stream: trailing bytes are an error. The header is
checked in an order that gives each kind of damage its own error class (all subclasses of
:class:`~onedc.errors.BitstreamError`): magic -> :class:`BadMagicError`; version newer than
:data:`FORMAT_VERSION` (by at most a few, :data:`MAX_NEWER_VERSION`) -> :class:`UnsupportedVersionError`,
a version further ahead or 0 -> the base :class:`BitstreamError` (a damaged header); fewer bytes than the header or the
lengths say -> :class:`TruncatedBitstreamError`; header or payload CRC -> :class:`ChecksumError`;
model id other than the decoder's -> :class:`ModelMismatchError`. Field values that a CRC-valid
header can still carry only if written by a broken or hostile writer (sizes out of range,
inconsistent grid) raise the base :class:`BitstreamError`.

This module is pure Python (struct, zlib): ``onedc info`` reads headers without torch.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from onedc.errors import (
    BadMagicError,
    BitstreamError,
    ChecksumError,
    ModelMismatchError,
    PixelLimitError,
    TruncatedBitstreamError,
    UnsupportedVersionError,
)

MAGIC = b"\x89ODC"
FLAG_Z_ONLY = 0x01  # flags bit 0: the file carries only z (ŷ = the prior means)
KNOWN_FLAGS = FLAG_Z_ONLY
FORMAT_VERSION = 2
MODEL_ID_BYTES = 16
MAX_SIDE = 65535  # image height/width limit (pixels)
MAX_PADDED_PIXELS = 1 << 28  # 16384^2: bounds what a crafted header can make a decoder allocate
#: The largest version still reported as "newer, upgrade onedc": formats change rarely, so a version
#: further ahead (a flipped high byte gives 65282) is a damaged header, not a future file.
MAX_NEWER_VERSION = FORMAT_VERSION + 8
#: Default pixel limit (height x width) for decoding untrusted files and reading input images:
#: 48 Mi pixels (8192 x 6144), above every camera up to 50 MP. The tiny model grows by about 450
#: bytes per pixel when it decodes (measured between 1024^2 and 2048^2 on CPU), so this is about
#: what a 24 GB machine holds; a forged header (up to 16384^2, 268 M) is refused from the header.
DEFAULT_MAX_PIXELS = 48 * 1024 * 1024

# Everything before header_crc; the "<" prefix means little-endian with no alignment padding.
_FIELDS = struct.Struct("<4sHH16sIIHHHHHBBIIIII")  # version 2: + fix_len, symbol_crc
_FIELDS_V1 = struct.Struct("<4sHH16sIIHHHHHBBIII")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _FIELDS.size + _HEADER_CRC.size  # 68
HEADER_SIZE_V1 = _FIELDS_V1.size + _HEADER_CRC.size  # 60
_PREFIX = struct.Struct("<4sH")  # magic + version: readable whatever the version's layout


@dataclass(frozen=True)
class Container:
    """The fields of one ``.onedc`` file (see the module docstring for the byte layout).

    ``z_stream`` and ``y_stream`` are the two coded streams; the padding, the payload CRC and
    the header size are derived when the container is encoded, so they are not fields.
    """

    model_id: bytes
    height: int
    width: int
    stride: int
    z_height: int
    z_width: int
    z_bits: int
    z_stream: bytes
    y_stream: bytes
    fix_stream: bytes = b"\x00"  # the empty fix list (version 2); b"" in version 1
    symbol_crc: int = 0
    version: int = FORMAT_VERSION
    flags: int = 0

    @property
    def z_only(self) -> bool:
        """Whether the file carries only z (no y stream): ŷ is decoded as the hyperprior's means."""
        return bool(self.flags & FLAG_Z_ONLY)

    @property
    def pad_bottom(self) -> int:
        """Rows of replicate padding added below the image before coding."""
        return self.z_height * self.stride - self.height

    @property
    def pad_right(self) -> int:
        """Columns of replicate padding added right of the image before coding."""
        return self.z_width * self.stride - self.width

    @property
    def padded_size(self) -> tuple[int, int]:
        """(height, width) of the coded, padded image."""
        return self.z_height * self.stride, self.z_width * self.stride

    @property
    def header_size(self) -> int:
        """Bytes of the header (everything that is not payload): 68, or 60 in version 1."""
        return HEADER_SIZE_V1 if self.version == 1 else HEADER_SIZE

    @property
    def payload(self) -> bytes:
        """The payload bytes in file order: z stream, fix list, y stream."""
        return self.z_stream + self.fix_stream + self.y_stream

    @property
    def payload_size(self) -> int:
        """Bytes of the payload: z stream + fix list + y stream."""
        return len(self.z_stream) + len(self.fix_stream) + len(self.y_stream)

    @property
    def file_size(self) -> int:
        """Bytes of the whole file."""
        return self.header_size + self.payload_size

    def bpp(self, payload_only: bool = False) -> float:
        """Real bits per (original, unpadded) pixel of the file, or of its payload only."""
        size = self.payload_size if payload_only else self.file_size
        return size * 8 / (self.height * self.width)

    def describe(self) -> dict[str, str]:
        """Header fields as display strings, in file order (what ``onedc info`` prints)."""
        return {
            "format_version": str(self.version),
            "kind": "z-only (no y stream: y is decoded as the hyperprior's means)" if self.z_only else "z + y",
            "header_bytes": str(self.header_size),
            "model_id": self.model_id.hex(),
            "height": str(self.height),
            "width": str(self.width),
            "pad_bottom": str(self.pad_bottom),
            "pad_right": str(self.pad_right),
            "stride": str(self.stride),
            "z_grid": f"{self.z_height}x{self.z_width}",
            "z_bits_per_index": str(self.z_bits),
            "z_bytes": str(len(self.z_stream)),
            "y_bytes": str(len(self.y_stream)),
            "fix_bytes": str(len(self.fix_stream)),
            "symbol_crc32": f"{self.symbol_crc:08x}",
            "payload_crc32": f"{zlib.crc32(self.payload):08x}",
            "file_bytes": str(self.file_size),
            "bpp": f"{self.bpp():.6f}",
            "payload_bpp": f"{self.bpp(payload_only=True):.6f}",
        }


def z_stream_size(z_height: int, z_width: int, z_bits: int) -> int:
    """Bytes of a bit-packed fixed-length z stream (the last byte is zero-padded)."""
    return (z_height * z_width * z_bits + 7) // 8


def _check_fields(c: Container, error: type[Exception]) -> None:
    """Raise ``error`` naming the first field of ``c`` that no valid file can hold."""
    problems = []
    if len(c.model_id) != MODEL_ID_BYTES:
        problems.append(f"model id has {len(c.model_id)} bytes, not {MODEL_ID_BYTES}")
    if not (1 <= c.height <= MAX_SIDE and 1 <= c.width <= MAX_SIDE):
        problems.append(f"image size {c.height}x{c.width} is outside 1..{MAX_SIDE} pixels per side")
    if not 1 <= c.stride <= 0xFFFF:
        problems.append(f"stride {c.stride} is outside 1..65535")
    elif not (0 <= c.pad_bottom < c.stride and 0 <= c.pad_right < c.stride):
        problems.append(f"z grid {c.z_height}x{c.z_width} at stride {c.stride} does not cover "
                        f"{c.height}x{c.width} with less than one stride of padding")
    elif c.padded_size[0] * c.padded_size[1] > MAX_PADDED_PIXELS:
        problems.append(f"padded size {c.padded_size[0]}x{c.padded_size[1]} exceeds {MAX_PADDED_PIXELS} pixels")
    if not 1 <= c.z_bits <= 64:
        problems.append(f"z index size {c.z_bits} bits is outside 1..64")
    elif len(c.z_stream) != z_stream_size(c.z_height, c.z_width, c.z_bits):
        problems.append(f"z stream has {len(c.z_stream)} bytes, a {c.z_height}x{c.z_width} grid of "
                        f"{c.z_bits}-bit indices takes {z_stream_size(c.z_height, c.z_width, c.z_bits)}")
    if not 1 <= c.version <= 0xFFFF:
        problems.append(f"format version {c.version} is outside 1..65535")
    if len(c.y_stream) > 0xFFFFFFFF or len(c.fix_stream) > 0xFFFFFFFF:
        problems.append("a stream does not fit a u32 length")
    if c.flags & ~KNOWN_FLAGS or not 0 <= c.flags <= 0xFF or (c.version == 1 and c.flags):
        problems.append(f"flags {c.flags:#x} are not defined (format {c.version} knows {KNOWN_FLAGS if c.version > 1 else 0:#x})")
    elif c.z_only and (c.y_stream or c.fix_stream or c.symbol_crc):
        problems.append("a z-only file has no y stream, fix list or symbol CRC")
    elif c.version == 1 and c.fix_stream:
        problems.append("format version 1 has no fix list")
    elif c.version != 1 and not c.z_only and not c.fix_stream:
        problems.append(f"format version {c.version} needs a fix list (at least its count byte)")
    if problems:
        raise error("invalid .onedc header: " + "; ".join(problems))


def encode_container(container: Container) -> bytes:
    """Serialise ``container`` to the bytes of a ``.onedc`` file (header + payload).

    The fields are validated with the same rules the reader applies, so a file this function
    writes always reads back; an invalid field raises ``ValueError`` (a caller's bug, not a
    user's). ``container.version`` is written as given (version 1 in its own layout), which lets
    tests write old files and fake newer ones.
    """
    _check_fields(container, ValueError)
    payload = container.payload
    c = container
    common = (MAGIC, c.version, c.header_size, c.model_id, c.height, c.width, c.pad_bottom, c.pad_right,
              c.stride, c.z_height, c.z_width, c.z_bits, c.flags, len(c.z_stream), len(c.y_stream))
    if c.version == 1:
        fields = _FIELDS_V1.pack(*common, zlib.crc32(payload))
    else:
        fields = _FIELDS.pack(*common, len(c.fix_stream), c.symbol_crc, zlib.crc32(payload))
    return fields + _HEADER_CRC.pack(zlib.crc32(fields)) + payload


def decode_container(data: bytes, expected_model_id: bytes | None = None) -> Container:
    """Parse and verify the bytes of a ``.onedc`` file; raise a precise ``BitstreamError``.

    Checks, in this order: magic, format version, length of the header, header CRC, header
    field values, file length against the stream lengths, payload CRC, and finally (when
    ``expected_model_id`` is given) that the file was written by that model. Nothing else
    than a :class:`~onedc.errors.BitstreamError` subclass ever escapes, whatever ``data`` is.
    """
    data = bytes(data)
    if len(data) < _PREFIX.size:
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise BadMagicError(_bad_magic_message(data))
        raise TruncatedBitstreamError(
            f"file has only {len(data)} bytes, a .onedc header has {HEADER_SIZE}: the file is truncated")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BadMagicError(_bad_magic_message(data))
    if version > MAX_NEWER_VERSION or version == 0:
        raise BitstreamError(f"file declares .onedc format version {version}, which no onedc has written (this "
                             f"onedc writes version {FORMAT_VERSION}): the file header is corrupt")
    if version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"file uses .onedc format version {version}, this onedc reads up to version {FORMAT_VERSION}: "
            "upgrade onedc to decode it")
    layout = _FIELDS_V1 if version == 1 else _FIELDS
    expected_header = layout.size + _HEADER_CRC.size
    if len(data) < expected_header:
        raise TruncatedBitstreamError(
            f"file has only {len(data)} bytes, a .onedc header has {expected_header}: the file is truncated")
    fields = layout.unpack_from(data)
    (header_crc,) = _HEADER_CRC.unpack_from(data, layout.size)
    actual_header_crc = zlib.crc32(data[: layout.size])
    if header_crc != actual_header_crc:
        raise ChecksumError(f"header CRC32 mismatch (stored {header_crc:08x}, computed {actual_header_crc:08x}): "
                            "the file header is corrupt")
    if version == 1:
        (_, _, header_size, model_id, height, width, pad_bottom, pad_right, stride, z_height, z_width, z_bits,
         reserved, z_len, y_len, payload_crc) = fields
        fix_len, symbol_crc = 0, 0
    else:
        (_, _, header_size, model_id, height, width, pad_bottom, pad_right, stride, z_height, z_width, z_bits,
         reserved, z_len, y_len, fix_len, symbol_crc, payload_crc) = fields
    if header_size != expected_header or (version == 1 and reserved != 0):
        raise BitstreamError(f"invalid .onedc header: header size {header_size} (expected {expected_header}) "
                             f"or reserved byte {reserved} (expected 0) do not match format version {version}")
    if reserved & ~KNOWN_FLAGS:
        raise UnsupportedVersionError(f"file sets flags {reserved:#x} this onedc does not know (it knows "
                                      f"{KNOWN_FLAGS:#x}): upgrade onedc to decode it")
    end = expected_header + z_len + fix_len + y_len
    if len(data) < end:
        raise TruncatedBitstreamError(
            f"file has {len(data)} bytes, its header promises {end} (header {expected_header} + z {z_len} + "
            f"fixes {fix_len} + y {y_len}): the file is truncated")
    if len(data) > end:
        raise BitstreamError(f"file has {len(data) - end} bytes after the end of its payload ({end} bytes): "
                             "it is not a single .onedc file")
    payload = data[expected_header:end]
    container = Container(model_id=model_id, height=height, width=width, stride=stride, z_height=z_height,
                          z_width=z_width, z_bits=z_bits, z_stream=payload[:z_len],
                          fix_stream=payload[z_len:z_len + fix_len], y_stream=payload[z_len + fix_len:],
                          symbol_crc=symbol_crc, version=version, flags=reserved if version > 1 else 0)
    _check_fields(container, BitstreamError)
    if (pad_bottom, pad_right) != (container.pad_bottom, container.pad_right):
        raise BitstreamError(f"invalid .onedc header: padding {pad_bottom}x{pad_right} does not match the "
                             f"z grid ({container.pad_bottom}x{container.pad_right})")
    actual_payload_crc = zlib.crc32(payload)
    if payload_crc != actual_payload_crc:
        raise ChecksumError(f"payload CRC32 mismatch (stored {payload_crc:08x}, computed {actual_payload_crc:08x}): "
                            "the file is corrupt")
    if expected_model_id is not None and model_id != expected_model_id:
        raise ModelMismatchError(
            f"file was written by model {model_id.hex()}, but the given checkpoint is model "
            f"{bytes(expected_model_id).hex()}: pass the checkpoint the file was written with (--ckpt)")
    return container


def check_pixel_limit(container: Container, max_pixels: int | None) -> None:
    """Raise :class:`~onedc.errors.PixelLimitError` when the file declares more than ``max_pixels``.

    Uses the header alone (height x width), so it runs before a decoder allocates anything;
    ``None`` means no limit beyond the format's own (:data:`MAX_PADDED_PIXELS`).
    """
    pixels = container.height * container.width
    if max_pixels is not None and pixels > max_pixels:
        raise PixelLimitError(
            f"file declares {container.height}x{container.width} = {pixels:,} pixels, above the limit of "
            f"{max_pixels:,} (--max-pixels, or max_pixels= in Python): raise the limit only for a file you trust")


def _bad_magic_message(data: bytes) -> str:
    return (f"not a .onedc file: it starts with {data[:len(MAGIC)]!r}, a .onedc file starts with {MAGIC!r}")
