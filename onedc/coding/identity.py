"""The 16-byte model identity every ``.onedc`` file carries.

It is a SHA-256 over everything that decides what the decoder outputs: the decoder-side weights
(the family's ``decoder_prefixes()``), the coding tables, the FSQ levels, the VAE scaling and the generator
settings. A file decoded with another model therefore fails with ``ModelMismatchError`` instead
of producing a wrong picture. Plain tensors and dicts in, bytes out (layer 1 of
docs/architecture.md).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from onedc.coding.bitstream import MODEL_ID_BYTES


def model_identity(state_dict: Mapping[str, Tensor], settings: Mapping[str, Any] | None,
                   decoder_prefixes: tuple[str, ...]) -> bytes:
    """First 16 bytes of SHA-256 over the decoder-side tensors of ``state_dict`` and ``settings``.

    ``state_dict`` is the bundle's prefixed state dict (``vae.*``, ``codec.*``, ``generator.*``);
    only keys under ``decoder_prefixes`` count
    (:meth:`onedc.families.ModelFamily.decoder_prefixes`: encoder-only weights are left out on purpose,
    so retraining only the encoder side keeps old files decodable). Each tensor contributes its name, dtype,
    shape and raw bytes, in sorted key order, so the id depends on values only (not on device,
    memory layout or dict order). ``settings`` (JSON-serialisable, e.g. FSQ levels) is hashed too.
    """
    digest = hashlib.sha256()
    for key in sorted(k for k in state_dict if k.startswith(tuple(decoder_prefixes))):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # A flat uint8 view gives the raw bytes of any dtype (bf16 included, which numpy lacks).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(dict(settings or {}), sort_keys=True, default=str).encode())
    return digest.digest()[:MODEL_ID_BYTES]
