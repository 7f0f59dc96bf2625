"""Reading and writing the authors' released codec file (``model_1.safetensors``, REFERENCE.md §2).

The file is a flat safetensors state dict with the bare module keys of ``IntraNoAR``, which
:class:`~onedc.modules.reference.codec.ReferenceCodec` reproduces, so loading is a strict
``load_state_dict`` (through :mod:`onedc.modules.state_dict_files`, which turns any missing,
unexpected or mis-shaped key into one :class:`~onedc.errors.WeightsError` line naming the file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from onedc.io import atomic_write_bytes
from onedc.modules.fsq import FSQ
from onedc.modules.reference.codec import ReferenceCodec
from onedc.modules.state_dict_files import load_state_dict_file

CODEC_FILE = "model_1.safetensors"
_WHAT = "the OneDC reference codec (IntraNoAR)"
_EXPECTED = f"the authors' {CODEC_FILE} (779 keys, REFERENCE.md §2) or a file written by save_released_codec"


def load_released_codec(path: str | Path, codec: ReferenceCodec | None = None, **sizes: Any) -> ReferenceCodec:
    """Load the authors' ``model_1.safetensors`` (or a file in its layout) into a codec, strictly.

    ``codec`` must have the file's sizes. Without one, a :class:`ReferenceCodec` of ``sizes``
    (its constructor kwargs; none = the released full size) is built on the meta device and
    takes the file's tensors (cast to float32) instead of a 1.6 GB random init. Any missing, unexpected or mis-shaped key raises one ``WeightsError`` line.
    """
    if codec is not None:
        if sizes:
            raise TypeError("pass either a codec or its sizes, not both")
        load_state_dict_file(codec, path, what=_WHAT, expected=_EXPECTED)
        return codec
    with torch.device("meta"):
        codec = ReferenceCodec(**sizes)
    load_state_dict_file(codec, path, what=_WHAT, expected=_EXPECTED)
    codec.fsq = FSQ(list(codec.config["z_fsq_levels"]))  # its derived, non-persistent buffers were on meta
    return codec


def save_released_codec(codec: ReferenceCodec, path: str | Path) -> Path:
    """Write ``codec``'s weights in the released layout (bare keys, safetensors), atomically."""
    from safetensors.torch import save

    state = {key: value.detach().cpu().contiguous() for key, value in codec.state_dict().items()}
    return atomic_write_bytes(path, save(state))
