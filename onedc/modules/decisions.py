"""Coding decisions that come out the same on every machine (see docs/portability.md).

The decoder of a learned codec must repeat the encoder's *integer* decisions exactly: for every
ŷ symbol the rANS table (the index of σ in the scale table) and the value added back to the
decoded integer (μ). Both come out of a network, and a network's float output depends on the
kernels that ran it: the CPU's instruction set, oneDNN's choice of convolution algorithm, the
thread count, the memory layout, TF32 on a GPU, autocast. One flipped table index derails rANS
for the rest of the stream, and a flipped μ shifts a symbol: the picture is silently wrong.
(Measured on the tiny preset: 6.1 % of the table indices flip when the hyper path runs under
bf16 autocast, and 0 in float32 across kernel sets only because that model is shallow.)

OneDC makes the decisions device-independent in three layers:

1. **Float64, outside autocast.** The decision path (ẑ -> h_s -> entropy parameters) runs in
   float64 with TF32 off and deterministic cuDNN, whatever precision the rest of the model
   uses (:func:`float64_call`). Two machines then agree to ~1e-15 relative, not ~1e-3.
2. **Integer decisions.** μ is rounded to a fixed grid of :data:`MEAN_STEP` (2^-16, so ŷ =
   symbol + μ_q is exact in float32), σ is mapped to its table index by comparisons in float64
   (:func:`decide`). A decision can only differ where the float64 value lies within rounding
   error of a boundary.
3. **A guard band with signalled fixes.** The encoder lists every symbol whose value lies within
   :data:`FIX_BANDS` guard bands (:data:`GUARD` relative, ~6000 times the float64 disagreement)
   of a boundary, with its decisions (:func:`encode_fixes`). The decoder takes those from the
   list and computes the rest: a decoder whose values differ from the encoder's by less than one
   band makes the same decisions everywhere, by construction. The list is almost always empty
   (a fraction ~1e-6 of symbols).

Finally the file carries a CRC32 over the decisions and the symbols (:func:`decision_checksum`),
so a decoder that disagrees anyway (a broken kernel, a perturbed model) fails with an error
instead of returning a wrong picture.
"""
from __future__ import annotations

import contextlib
import itertools
import zlib
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

# μ is coded on a grid of 2^-16: ŷ = symbol + k·2^-16 is exact in float32 for |ŷ| < 256, and
# stays within 2^-17 (7.6e-6) of ŷ with an unrounded μ, so a model keeps its float behaviour
# (and matches a reference implementation's ŷ to 1e-5).
MEAN_BITS = 16
MEAN_STEP = 2.0**-MEAN_BITS
# Half-width of the guard band around each decision boundary, relative to the value's magnitude.
# Float64 results of the decision path differ between kernel sets by at most 1.5e-16 relative
# (tiny preset, 7 photos, AVX-512 vs ATEN default + oneDNN SSE4.1; 0 between thread counts,
# batch sizes and memory layouts): the band, 9.1e-13, is ~6000 times wider. With it about
# 2e-6 of the symbols need a fix (μ ~ 10); the σ decisions (table scales 2.1 % apart) ~1e-10.
GUARD = 2.0**-40
# The encoder signals decisions within this many bands of a boundary; the decoder needs them
# within one band. The gap between the two is what the machines may disagree by.
FIX_BANDS = 2.0


class CodingDecisions(NamedTuple):
    """The integer decisions of one batch of ŷ symbols, shaped like ŷ, and how safe they are."""

    mean_codes: Tensor  # int64: μ in units of MEAN_STEP
    indexes: Tensor  # int32: scale-table index of σ (the rANS table)
    margin: Tensor  # float64: distance to the nearest decision boundary, in guard bands

    @property
    def means(self) -> Tensor:
        """μ on its grid as float32 (exact): what ŷ = symbol + μ adds back."""
        return self.mean_codes.to(torch.float32) * MEAN_STEP

    def select(self, index: int) -> "CodingDecisions":
        """The decisions of image ``index`` of the batch, keeping a batch dim of 1."""
        return CodingDecisions(*(t[index : index + 1] for t in self))


@contextlib.contextmanager
def exact_mode(device: torch.device) -> Iterator[None]:
    """No autocast, no TF32, deterministic cuDNN: the settings of the decision path."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(
                enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False))
        yield


def float64_call(module: nn.Module, *inputs: Any) -> Any:
    """``module(*inputs)`` in float64 with contiguous weights, under :func:`exact_mode`.

    The module itself is left as it is (its dtype, memory format and gradients): its floating
    parameters and buffers are cast for this call only (``torch.func.functional_call``). Tensor
    inputs are cast to contiguous float64; other inputs (a callback) are passed as they are.
    """
    state = {name: (t.detach().to(torch.float64, memory_format=torch.contiguous_format)
                    if t.is_floating_point() else t)
             for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}
    args = tuple(x.detach().to(torch.float64, memory_format=torch.contiguous_format) if isinstance(x, Tensor) else x
                 for x in inputs)
    device = next((x.device for x in args if isinstance(x, Tensor)), torch.device("cpu"))
    with exact_mode(device), torch.no_grad():
        return torch.func.functional_call(module, state, args)


def decide(means: Tensor, scales: Tensor, scale_table: Tensor, snap: str = "up") -> CodingDecisions:
    """Float64 (μ, σ) -> integer decisions, with each decision's distance to its boundary.

    ``scale_table`` holds the coder's table scales in increasing order. ``snap="up"`` codes σ
    with the next table scale at or above it: the index equals CompressAI's
    ``GaussianConditional.build_indexes`` (the number of table scales below σ, capped at the
    last table). ``snap="down"`` codes it with the last table scale at or below it (the OneDC
    reference, docs/reference-model.md §7: the number of table scales after the first that are <= σ).
    Both are computed here in float64 instead of the model's dtype.
    """
    m = torch.nan_to_num(means.to(torch.float64)) / MEAN_STEP
    codes = torch.round(m)
    mean_margin = (0.5 - (m - codes).abs()) / (GUARD * (1.0 + m.abs()))
    s = torch.nan_to_num(scales.to(torch.float64), nan=0.0)
    table = scale_table.to(device=s.device, dtype=torch.float64).reshape(-1)
    if snap == "up":
        bounds = table[:-1]  # σ <= bounds[k] or not decides each step of the index
        indexes = torch.searchsorted(bounds, s.contiguous(), side="left")
    elif snap == "down":
        bounds = table[1:]  # σ >= bounds[k] or not
        indexes = torch.searchsorted(bounds, s.contiguous(), side="right")
    else:
        raise ValueError(f"snap must be 'up' or 'down', got {snap!r}")
    below = bounds[(indexes - 1).clamp(min=0)]  # largest bound < σ (when indexes > 0)
    above = bounds[indexes.clamp(max=bounds.numel() - 1)]  # smallest bound >= σ (when indexes < L-1)
    inf = torch.full_like(s, float("inf"))
    dist = torch.minimum(torch.where(indexes > 0, (s - below) / below, inf),
                         torch.where(indexes < bounds.numel(), (above - s) / above, inf))
    scale_margin = dist / GUARD
    return CodingDecisions(codes.to(torch.int64), indexes.to(torch.int32), torch.minimum(mean_margin, scale_margin))


# ------------------------------------------------------------------------------ the fix list
def write_varint(value: int, out: bytearray) -> None:
    """Append ``value`` (>= 0) to ``out`` as an LEB128 varint (7 bits a byte, low bits first)."""
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The LEB128 varint at ``data[pos:]`` and the position after it; ``ValueError`` if malformed."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("fix list ends inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 63:
            raise ValueError("fix list holds a number over 64 bits")


def encode_fixes(decisions: CodingDecisions) -> bytes:
    """The fix list of ONE image's decisions: every symbol within FIX_BANDS bands of a boundary.

    Layout (all LEB128 varints): count, then per symbol in increasing flat (C, H, W) order the
    position delta, the zigzag-coded mean code and the table index. Empty list: one 0 byte.
    """
    margin = decisions.margin.reshape(-1)
    positions = torch.nonzero(margin < FIX_BANDS).reshape(-1).cpu().tolist()
    codes = decisions.mean_codes.reshape(-1)[positions].cpu().tolist() if positions else []
    indexes = decisions.indexes.reshape(-1)[positions].cpu().tolist() if positions else []
    out = bytearray()
    write_varint(len(positions), out)
    previous = 0
    for pos, code, index in zip(positions, codes, indexes):
        write_varint(pos - previous, out)
        write_varint((code << 1) ^ (code >> 63), out)  # zigzag: small |code| -> few bytes
        write_varint(index, out)
        previous = pos
    return bytes(out)


def apply_fixes(decisions: CodingDecisions, data: bytes, num_tables: int) -> CodingDecisions:
    """The decoder's decisions of ONE image with the encoder's fix list applied.

    Raises ``ValueError`` when the list is malformed (positions out of range, an index outside
    the ``num_tables`` tables, bytes left over).
    """
    count, pos = read_varint(data, 0)
    size = decisions.mean_codes.numel()
    if count > size:
        raise ValueError(f"fix list names {count} symbols, the image has {size}")
    flat_pos, codes, indexes = [], [], []
    previous = 0
    for _ in range(count):
        delta, pos = read_varint(data, pos)
        zig, pos = read_varint(data, pos)
        index, pos = read_varint(data, pos)
        previous += delta
        if previous >= size or (flat_pos and delta == 0) or index >= num_tables:
            raise ValueError("fix list names a symbol or a table that does not exist")
        flat_pos.append(previous)
        codes.append((zig >> 1) ^ -(zig & 1))
        indexes.append(index)
    if pos != len(data):
        raise ValueError(f"fix list has {len(data) - pos} bytes after its last entry")
    if not count:
        return decisions
    mean_codes = decisions.mean_codes.clone().reshape(-1)
    table_indexes = decisions.indexes.clone().reshape(-1)
    where = torch.tensor(flat_pos, dtype=torch.long, device=mean_codes.device)
    mean_codes[where] = torch.tensor(codes, dtype=mean_codes.dtype, device=mean_codes.device)
    table_indexes[where] = torch.tensor(indexes, dtype=table_indexes.dtype, device=table_indexes.device)
    margin = decisions.margin.clone().reshape(-1)
    margin[where] = float("inf")  # settled by the encoder
    shape = decisions.mean_codes.shape
    return CodingDecisions(mean_codes.view(shape), table_indexes.view(shape), margin.view(shape))


def decision_checksum(decisions: CodingDecisions, symbols: Tensor, crc: int = 0) -> int:
    """CRC32 over one image's mean codes, table indexes and coded symbols (int32, little-endian).

    ``crc`` continues a running checksum (several coding steps of one image).
    """
    for tensor in (decisions.mean_codes, decisions.indexes, symbols):
        array = tensor.detach().reshape(-1).to(torch.int32).cpu().numpy().astype("<i4", copy=False)
        crc = zlib.crc32(np.ascontiguousarray(array).tobytes(), crc)
    return crc
