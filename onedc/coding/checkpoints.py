"""Reading weights from disk: stage checkpoints, DeepSpeed folders and exported files.

::

    path ─suffix─> CHECKPOINT_READERS[".ckpt"]          read_stage_checkpoint ─┐
                   CHECKPOINT_READERS[".safetensors"]   read_exported ─────────┼─> LoadedWeights
                   anything else (a DeepSpeed folder)   read_stage_checkpoint ─┘   (model config dict,
                                                                                    prefixed state dict)

Everything here returns plain dicts and tensors: no module is built, no config library is
imported, so the coding path (``onedc compress``) and the training pipeline share one reader.
A new weight format plugs in with :func:`register_checkpoint_reader`; onedc registers its two
formats below. Layer 1 of docs/architecture.md.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from onedc.errors import CheckpointError

log = logging.getLogger("onedc")

# Version of the ``onedc`` metadata block of stage checkpoints (written by StageModule).
CHECKPOINT_FORMAT = 1
# Version of the safetensors metadata that ``onedc export`` writes.
EXPORT_FORMAT = "1"


class LoadedWeights(NamedTuple):
    """What a checkpoint reader returns: the model config dict and a flat, prefixed state dict."""

    model_config: dict[str, Any]
    state_dict: dict[str, Tensor]


# --------------------------------------------------------------------------- Lightning files
def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint file (or DeepSpeed folder, converted to fp32) with clear errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Give an existing .ckpt file or DeepSpeed folder")
    if path.is_dir():
        return _read_deepspeed_folder(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for corrupt files
        fallback = newest_fallback(path)
        hint = (f" The newest intact fallback is {fallback}: resume from it with resume={fallback}"
                if fallback else " No fallback checkpoint exists beside it")
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}).{hint}") from err


def _read_deepspeed_folder(path: Path) -> dict[str, Any]:
    # Lightning is needed only for this conversion, so it is imported here and nowhere else
    # on the reading path.
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    converted = path.with_name(path.name + ".fp32.ckpt")
    if not converted.exists() or converted.stat().st_mtime < path.stat().st_mtime:
        tmp = converted.with_name(f".{converted.name}.tmp-{os.getpid()}")
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(tmp))
        except Exception as err:
            raise CheckpointError(f"cannot convert the DeepSpeed checkpoint folder {path}: {err}") from err
        os.replace(tmp, converted)
        log.info("converted DeepSpeed checkpoint %s -> %s", path, converted)
    return torch.load(converted, map_location="cpu", weights_only=False)


def newest_fallback(path: Path) -> Path | None:
    """The newest periodic checkpoint beside ``path`` that loads, if any."""
    candidates = sorted(path.parent.glob("step=*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        if candidate == path:
            continue
        try:
            torch.load(candidate, map_location="cpu", weights_only=False)
            return candidate
        except Exception:
            continue
    return None


# --------------------------------------------------------------------------- readers
def read_stage_checkpoint(path: Path) -> LoadedWeights:
    """A Lightning stage checkpoint (``.ckpt`` file or DeepSpeed folder) written by ``train.py``."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get("onedc") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(
            f"{path} is not an onedc stage checkpoint: it has no 'onedc' metadata with the model config. "
            "Give a checkpoint written by train.py (e.g. runs/<run>/distill/final.ckpt)")
    if int(meta.get("format", 0)) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this onedc reads up to "
                              f"{CHECKPOINT_FORMAT}: upgrade onedc")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} has no state_dict: it is not a model checkpoint")
    return LoadedWeights(copy.deepcopy(meta["model"]), state_dict)


def read_exported(path: Path) -> LoadedWeights:
    """An ``onedc export`` file: safetensors tensors + the model config in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path), device="cpu")
    except FileNotFoundError as err:
        raise CheckpointError(f"exported weights not found: {path}") from err
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    if "model" not in metadata:
        raise CheckpointError(f"{path} has no onedc model metadata: write it with `onedc export`")
    if int(metadata.get("onedc_export_format", "0")) > int(EXPORT_FORMAT):
        raise CheckpointError(f"{path} uses export format {metadata['onedc_export_format']}: upgrade onedc")
    return LoadedWeights(json.loads(metadata["model"]), state_dict)


# Suffix -> reader; read_weights tries anything else (a DeepSpeed folder, .pt) as a stage checkpoint.
CHECKPOINT_READERS: dict[str, Callable[[Path], LoadedWeights]] = {}


def register_checkpoint_reader(suffix: str, reader: Callable[[Path], LoadedWeights]) -> None:
    """Make :func:`read_weights` (and so ``OneDCCodec.from_checkpoint``) read files ending in ``suffix``.

    ``suffix`` includes the dot and is matched case-insensitively; a second registration of the
    same suffix replaces the first, so a user package can override onedc's readers.
    """
    if not suffix.startswith("."):
        raise ValueError(f"a checkpoint suffix starts with '.', got {suffix!r}")
    CHECKPOINT_READERS[suffix.lower()] = reader


register_checkpoint_reader(".ckpt", read_stage_checkpoint)
register_checkpoint_reader(".safetensors", read_exported)


def read_weights(path: str | Path) -> LoadedWeights:
    """The model config and prefixed state dict of any weight file onedc reads, chosen by suffix."""
    path = Path(path)
    return CHECKPOINT_READERS.get(path.suffix.lower(), read_stage_checkpoint)(path)
