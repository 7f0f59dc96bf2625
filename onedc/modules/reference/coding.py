"""Real y bitstreams for the reference codec's four-step context model, decodable on any machine.

::

    ẑ ─(float64)─ h_s, prior fusion ─> P, Q
    step k = 0..3:  (ŷ so far, P, Q) ─(float64)─ step prior ─> μ_k, σ_k ─ decide ─> μ-code, table index
                    encoder: q_k = round(y − μ_q)  ─ rANS (one stream, steps in order)
                    decoder: rANS ─> q_k;   ŷ += q_k + μ_q          (exact: μ_q on a 2^-16 grid)
    streams: y (rANS bytes), fixes (the four steps' fix lists), checksum (CRC32 of all decisions + symbols)

The decision path of every step runs in float64 outside autocast (``onedc.modules.decisions``),
so its integer decisions do not depend on the machine, the thread count or the precision the
rest of the model runs in; what is near a boundary is settled by the encoder's fix lists, and a
disagreement anyway is a :class:`~onedc.errors.CodingMismatchError`. ŷ fed back into the next
step is exact on both sides, so the steps do not accumulate differences.

The tables are CompressAI's (``GaussianConditional`` CDFs, rANS64) over the reference's 256
scales exp(linspace(ln 0.11, ln 64, 256)) with σ snapped **down** to the table (docs/reference-model.md §7).
The files are onedc's, not byte-compatible with the reference's own 32-bit coder.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import GaussianConditional
from torch import Tensor, nn

from onedc.errors import CodingMismatchError
from onedc.modules.decisions import (
    MEAN_STEP,
    CodingDecisions,
    apply_fixes,
    decide,
    decision_checksum,
    encode_fixes,
    float64_call,
    read_varint,
    write_varint,
)
from onedc.modules.reference.codec import ReferenceCodec
from onedc.modules.reference.context import ContextOutput, gather_step, scatter_step

SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 64.0, 256
SYMBOL_CLAMP = 30000  # the reference clamps coded symbols to int16 range (§7)
# Modules of the decision path (everything that turns ẑ and the ŷ decoded so far into μ, σ).
DECISION_MODULES = ("hyper_dec", "y_prior_fusion", "y_spatial_prior_reduction", "y_spatial_prior_adaptor_1",
                    "y_spatial_prior_adaptor_2", "y_spatial_prior_adaptor_3", "y_spatial_prior")


def reference_scale_table() -> list[float]:
    """The reference's 256 log-spaced table scales, 0.11 … 64 (docs/reference-model.md §7)."""
    return torch.exp(torch.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS, dtype=torch.float64)).tolist()


class _DecisionPath(nn.Module):
    """The decision-path submodules of a :class:`ReferenceCodec` (shared, not copied), run as one module."""

    hyper_synthesise = ReferenceCodec.hyper_synthesise
    step_prior = ReferenceCodec.step_prior
    code_y = ReferenceCodec.code_y

    def __init__(self, codec: ReferenceCodec) -> None:
        super().__init__()
        for name in DECISION_MODULES:
            setattr(self, name, getattr(codec, name))

    def forward(self, z_hat: Tensor, coder) -> ContextOutput:
        return self.code_y(self.hyper_synthesise(z_hat), coder)


class CodedY(NamedTuple):
    """One image's y: the rANS stream, the four steps' fix lists, the decision checksum and ŷ."""

    stream: bytes
    fixes: bytes
    checksum: int
    y_hat: Tensor  # (1, C, h, w) float32, what every decoder rebuilds


class ReferenceYCoder:
    """Encode/decode ŷ of a :class:`ReferenceCodec` with its four context steps, one image at a time."""

    def __init__(self, codec: ReferenceCodec) -> None:
        self.codec = codec
        self.tables = GaussianConditional(reference_scale_table())
        self.tables.update()
        self.table = self.tables.scale_table.to(torch.float64)
        self._cdfs = self.tables._quantized_cdf.tolist()
        self._lengths = self.tables._cdf_length.reshape(-1).int().tolist()
        self._offsets = self.tables._offset.reshape(-1).int().tolist()

    def _decide(self, means: Tensor, scales: Tensor, step: int) -> CodingDecisions:
        """A step's decisions, gathered to its coded values (B, C/4, h, w)."""
        d = decide(means, scales, self.table, snap="down")  # σ < 0.11 (even negative): table 0
        return CodingDecisions(gather_step(d.mean_codes, step), gather_step(d.indexes.long(), step).int(),
                               gather_step(d.margin, step))

    def _scatter_means(self, d: CodingDecisions, step: int) -> Tensor:
        return scatter_step(d.mean_codes.to(torch.float64) * MEAN_STEP, step)

    @torch.no_grad()
    def encode(self, y: Tensor, z_hat: Tensor) -> CodedY:
        """y (1, C, h, w) of one image and its ẑ (rebuilt from the z indices) -> :class:`CodedY`."""
        if y.shape[0] != 1:
            raise ValueError("ReferenceYCoder codes one image at a time")
        y64 = y.detach().to(torch.float64)
        encoder, fixes, crc = BufferedRansEncoder(), bytearray(), 0

        def coder(step: int, mask: Tensor, means: Tensor, scales: Tensor):
            nonlocal crc
            d = self._decide(means, scales, step)
            coded_means = self._scatter_means(d, step)
            q = (torch.round(y64 - coded_means) * mask).clamp(-SYMBOL_CLAMP, SYMBOL_CLAMP)
            symbols = gather_step(q, step).long()
            encoder.encode_with_indexes(symbols.reshape(-1).tolist(), d.indexes.reshape(-1).tolist(),
                                        self._cdfs, self._lengths, self._offsets)
            step_fixes = encode_fixes(d)
            write_varint(len(step_fixes), fixes)
            fixes.extend(step_fixes)
            crc = decision_checksum(d, symbols, crc)
            return q, coded_means

        out = float64_call(_DecisionPath(self.codec), z_hat, coder)
        return CodedY(encoder.flush(), bytes(fixes), crc, out.y_hat.to(torch.float32))

    @torch.no_grad()
    def decode(self, stream: bytes, fixes: bytes, checksum: int | None, z_hat: Tensor) -> Tensor:
        """ŷ (1, C, h, w) float32 from one image's streams and its ẑ; checks the decision checksum."""
        decoder = RansDecoder()
        decoder.set_stream(stream)
        pos, crc = 0, 0

        def coder(step: int, mask: Tensor, means: Tensor, scales: Tensor):
            nonlocal pos, crc
            length, pos = read_varint(fixes, pos)
            if pos + length > len(fixes):
                raise ValueError("fix stream ends inside a step's fix list")
            d = apply_fixes(self._decide(means, scales, step), fixes[pos:pos + length], len(self._cdfs))
            pos += length
            flat = decoder.decode_stream(d.indexes.reshape(-1).tolist(), self._cdfs, self._lengths, self._offsets)
            symbols = torch.tensor(flat, dtype=torch.long, device=means.device).view_as(d.mean_codes)
            crc = decision_checksum(d, symbols, crc)
            return scatter_step(symbols.to(torch.float64), step), self._scatter_means(d, step)

        out = float64_call(_DecisionPath(self.codec), z_hat, coder)
        if pos != len(fixes):
            raise ValueError(f"fix stream has {len(fixes) - pos} bytes after its four steps")
        if checksum is not None and crc != checksum:
            raise CodingMismatchError(
                f"the decoder's coding decisions differ from the encoder's (checksum {crc:08x}, file {checksum:08x}): "
                "the model differs from the one that encoded, or this machine computes its float64 decision path wrongly")
        return out.y_hat.to(torch.float32)

