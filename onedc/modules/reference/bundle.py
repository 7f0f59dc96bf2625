"""The reference codec behind onedc's coding interface: what ``OneDCCodec`` drives for ``family: reference``.

:class:`CodingReferenceCodec` is :class:`ReferenceCodec` (same 779 state-dict keys) plus the
contract the inference bundle expects of a codec (``onedc.modules.light.codec.HyperpriorCodec``'s):
``downsample``, ``fsq``, ``compress(x, v)`` returning the streams, fix lists, checksums and ŷ
of each image, ``decompress(...)`` returning :class:`~onedc.modules.light.codec.DecodedLatents`, and
an eval ``forward`` whose ŷ is the one the files decode to. y is coded by
:class:`~onedc.modules.reference.coding.ReferenceYCoder` (four context steps, machine-independent
decisions); z by the same fixed-length packing as the light codec.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from onedc.modules.streams import DecodedLatents, pack_indices, unpack_indices, z_stream_bits
from onedc.modules.reference.codec import PAD_MULTIPLE, ReferenceCodec, ReferenceCodecOutput
from onedc.modules.reference.coding import ReferenceYCoder
from onedc.modules.reference.synthesis import semantic_tokens

Y_STRIDE = 16  # y at 1/16 of the padded image


class CodingReferenceCodec(ReferenceCodec):
    """:class:`ReferenceCodec` with the coding interface of the inference bundle (see module docstring)."""

    downsample = PAD_MULTIPLE

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.__dict__["_y_coder"] = None  # not a submodule: its tables are fixed, never in the state dict

    @property
    def y_coder(self) -> ReferenceYCoder:
        """The y coder (its CDF tables are built once, on first use)."""
        if self.__dict__["_y_coder"] is None:
            self.__dict__["_y_coder"] = ReferenceYCoder(self)
        return self.__dict__["_y_coder"]

    @property
    def gaussian_conditional(self):
        """The coder's tables (CompressAI ``GaussianConditional``), for the bundle's table checks."""
        return self.y_coder.tables

    def update(self, scale_table_values: Sequence[float] | None = None, force: bool = False) -> bool:
        """The reference's tables are fixed (docs/reference-model.md §7): nothing to rebuild."""
        return False

    def _z(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor, np.ndarray]:
        y, sem = self.analyse(x, v)
        indices = self.fsq.codes_to_indices(self.quantise_z(self.hyper_analyse(y, sem))).cpu().numpy()
        z_hat = self.fsq.indices_to_codes(torch.from_numpy(indices).to(x.device))  # as the decoder rebuilds it
        return y, z_hat, indices

    @torch.no_grad()
    def compress(self, x: Tensor, v: Tensor) -> dict:
        """Padded images + VAE latents -> the streams of each image (as ``HyperpriorCodec.compress``)."""
        y, z_hat, indices = self._z(x, v)
        coded = [self.y_coder.encode(y[i:i + 1], z_hat[i:i + 1]) for i in range(y.shape[0])]
        return {"strings": [[c.stream for c in coded], [pack_indices(i, self.fsq.bits_per_index) for i in indices]],
                "shape": tuple(z_hat.shape[-2:]), "fixes": [c.fixes for c in coded],
                "checksums": [c.checksum for c in coded], "y_hat": torch.cat([c.y_hat for c in coded])}

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: Sequence[int], fixes: Sequence[bytes] | None = None,
                   checksums: Sequence[int] | None = None, legacy: bool = False) -> DecodedLatents:
        """Streams -> ŷ, ẑ, S, tokens and F (``latent_hat`` is None: the generator always decodes)."""
        if legacy:
            raise ValueError("container format 1 never held reference-codec files")
        y_strings, z_strings = strings
        hz, wz = int(shape[0]), int(shape[1])
        indices = np.stack([unpack_indices(s, hz * wz, self.fsq.bits_per_index) for s in z_strings])
        if (indices >= self.fsq.codebook_size).any():
            raise ValueError("z stream holds an index outside the FSQ codebook")
        device = next(self.parameters()).device
        z_hat = self.fsq.indices_to_codes(torch.from_numpy(indices).view(-1, hz, wz).to(device))
        fixes = fixes or [b"\x01\x00" * 4] * len(y_strings)
        y_hat = torch.cat([self.y_coder.decode(y_strings[i], fixes[i], None if checksums is None else checksums[i],
                                               z_hat[i:i + 1]) for i in range(len(y_strings))])
        hyper = self.hyper_synthesise(z_hat)
        semantic = self.semantic_map(hyper.zs)
        features = self.synthesise(y_hat.to(semantic.dtype), semantic)
        return DecodedLatents(y_hat, z_hat, semantic, semantic_tokens(semantic), features, None)

    def z_bits_per_image(self, z_shape: Sequence[int]) -> int:
        """Bits of the fixed-length z stream of a z grid (14 per index): the light codec's rule, same packing."""
        return z_stream_bits(self.fsq, z_shape)

    def rate_bits(self, out: ReferenceCodecOutput) -> Tensor:
        """Estimated bits per image (B,), the reference's (docs/reference-model.md §4.6, §13): Σ bits(q) + 14 per z index.

        The y term is ``out.y_bits`` summed: the eval estimate in eval mode, the noisy proxy in
        training. Like ``HyperpriorCodec.rate_bits`` (the seam :func:`onedc.coding.rate.rate_table`
        uses), but without a flush term: the reference does not count one.
        """
        return out.y_bits.flatten(1).sum(dim=1) + self.z_bits_per_image(out.z_hat.shape[-2:])

    def forward(self, x: Tensor, v: Tensor, z_only: bool = False) -> ReferenceCodecOutput:
        """As :meth:`ReferenceCodec.forward`; in eval, ŷ (and F) are exactly what the files decode to."""
        out = super().forward(x, v, z_only=z_only)
        if self.training or z_only:
            return out
        with torch.no_grad():
            y_hat = torch.cat([self.y_coder.encode(out.y[i:i + 1], out.z_hat[i:i + 1]).y_hat
                               for i in range(out.y.shape[0])])
            features = self.synthesise(y_hat.to(out.semantic.dtype), out.semantic)
        return out._replace(y_hat=y_hat, features=features)
