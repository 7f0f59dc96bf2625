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

**Trainable-only checkpoints.** A stage checkpoint leaves out the frozen parameters whose weights
can be read again from a file, and names each such part in ``onedc["frozen"]``: its keys, their
count, the sha256 of its tensors (:func:`tensors_hash`) and its source, ``KIND:LOCATION``::

    init_from:/abs/distill/final.ckpt        the stage's init_from file (itself possibly trainable-only)
    model.vae.pretrained:asset:tiny_vae       a pretrained dir/file of the model config (or a shipped asset)
    model.generator.pretrained:/abs/unet.bin
    guidance.real_pretrained:/abs/sd15        a training-only part (the dmd stage's real score UNet)

:func:`read_full_checkpoint` (and so :func:`read_stage_checkpoint`, :func:`read_weights`, every
consumer) puts the parts back before returning: ``init_from`` parts by reading that file, itself
filled recursively (a chain finetune -> latent -> distill), ``model.*`` parts by the loader the
model families register (:func:`register_frozen_loader`: the part rebuilt from its pretrained
source, as training built it). Each part's hash is checked; a missing source or other weights
give one CheckpointError line naming the part and the file. Training-only parts (``guidance.*``)
come back only when a run resumes, which rebuilds them from its config; no reader needs them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from onedc.errors import CheckpointError

log = logging.getLogger("onedc")

# Version of the ``onedc`` metadata block of stage checkpoints (written by StageModule). 2: a checkpoint may
# leave out frozen parts and name them in ``onedc["frozen"]`` (an older reader refuses it instead of failing later).
CHECKPOINT_FORMAT = 2
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


# --------------------------------------------------------------------------- trainable-only checkpoints
INIT_FROM = "init_from"
# Source files up to this size get a sha256 of their bytes in the record (the tensors' hash is always there).
SOURCE_SHA256_LIMIT = 256 * 2**20
# kind -> loader(model config dict, location) -> prefixed state dict holding the part's frozen keys.
FrozenLoader = Callable[[Mapping[str, Any], str], Mapping[str, Tensor]]
FROZEN_LOADERS: dict[str, FrozenLoader] = {}


def tensors_hash(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the given order: a weights identity."""
    digest = hashlib.sha256()
    for name, tensor in named:
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def register_frozen_loader(kind: str, loader: FrozenLoader) -> None:
    """Let readers fill a frozen part whose source is ``KIND:LOCATION`` (``model.vae.pretrained``, ...).

    ``loader(model_config, location)`` returns a prefixed state dict that holds the part's keys;
    :mod:`onedc.families` registers ``model.vae.pretrained`` and ``model.generator.pretrained``.
    """
    FROZEN_LOADERS[kind] = loader


def source_identity(source: str) -> dict[str, Any]:
    """What identifies a source's file cheaply: ``{"bytes": n}``, plus ``"sha256"`` of its bytes up to
    :data:`SOURCE_SHA256_LIMIT`; ``{}`` for a dir, a shipped asset (its tensors' hash is in its metadata) or no file."""
    location = Path(str(source).partition(":")[2])
    if not location.is_file():
        return {}
    size = location.stat().st_size
    if size > SOURCE_SHA256_LIMIT:
        return {"bytes": size}
    digest = hashlib.sha256()
    with open(location, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _changed_file(info: Mapping[str, Any], location: str) -> str:
    """'; the file itself changed (sha256 a then, b now)' when the record has the source file's sha256 and it differs."""
    recorded = (info.get("source_file") or {}).get("sha256")
    now = source_identity(f"x:{location}").get("sha256")
    if recorded and now and recorded != now:
        return f"; the file itself changed (sha256 {recorded[:12]} then, {now[:12]} now)"
    return ""


def fill_frozen(checkpoint: dict[str, Any], path: str | Path, parts: Iterable[str] | None = None,
                _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Put the frozen parts a trainable-only checkpoint left out back into its ``state_dict`` (in place).

    ``parts`` limits it to those top-level parts (default: all). Parts that are present (a whole
    checkpoint, a DeepSpeed folder) are left alone; training-only parts (``guidance.*`` sources) are
    left out. CheckpointError (one line) for a missing source, a source with other weights, or a
    loop of ``init_from`` files.
    """
    path = Path(path)
    meta = checkpoint.get("onedc") if isinstance(checkpoint, dict) else None
    recorded = (meta or {}).get("frozen") or {}
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not recorded or not isinstance(state, dict):
        return checkpoint
    wanted = None if parts is None else set(parts)
    for part, info in recorded.items():
        if wanted is not None and part not in wanted:
            continue
        keys = info.get("keys")
        if keys is not None and all(k in state for k in keys):
            continue
        kind, _, location = str(info.get("source", "")).partition(":")
        what = (f"{path} stores only what trains; its frozen part '{part}.' ({info.get('count')} tensors, hash "
                f"{str(info.get('hash'))[:12]}) comes from {kind} {location}")
        if kind == INIT_FROM:
            source = Path(location)
            if not source.exists():
                raise CheckpointError(f"{what}, which is missing: put that file back where it was (it is part of this "
                                      "checkpoint), or retrain the stage")
            if source.resolve() in _chain or source.resolve() == path.resolve():
                raise CheckpointError(f"{what}, which names {path} again (a loop of init_from files): the chain is broken")
            try:
                tensors = fill_frozen(read_checkpoint(source), source, (part,), _chain + (path.resolve(),))["state_dict"]
            except CheckpointError as err:
                raise CheckpointError(f"{what}, which cannot give it: {err}") from None
        elif kind.startswith("model."):
            loader = FROZEN_LOADERS.get(kind)
            if loader is None:
                raise CheckpointError(f"{what}, and no loader for {kind} is registered: import onedc.families first")
            if not location.startswith("asset:") and not Path(location).exists():
                raise CheckpointError(f"{what}, which is missing: put it back (or set up the same {kind} on this "
                                      "machine), or use a self-contained file made where it exists (`onedc export`)")
            try:
                tensors = loader(meta.get("model") or {}, location)
            except CheckpointError:
                raise
            except Exception as err:  # WeightsError, OSError, ...: one line naming the part
                raise CheckpointError(f"{what}, which cannot be loaded ({type(err).__name__}: "
                                      f"{' '.join(str(err).split())})") from err
        else:
            continue  # a training-only part: a resume rebuilds it from the run's config
        if keys is None:  # a record without key names: the part's keys the checkpoint lacks
            keys = sorted(k for k in tensors if k.startswith(part + ".") and k not in state)
        absent = [k for k in keys if k not in tensors]
        found = tensors_hash((k, tensors[k]) for k in keys) if not absent else None
        if absent or len(keys) != int(info.get("count", len(keys))) or found != info.get("hash"):
            now = f"lacks {len(absent)} of its tensors ({absent[0]}, ...)" if absent else \
                f"now gives other weights (hash {str(found)[:12]})"
            raise CheckpointError(f"{what}, which {now}{_changed_file(info, location)}: restore the source it was "
                                  "trained with, or retrain the stage")
        for key in keys:
            state[key] = tensors[key]
    return checkpoint


def read_full_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`read_checkpoint` with every frozen part a trainable-only checkpoint left out put back (:func:`fill_frozen`)."""
    return fill_frozen(read_checkpoint(path), path)


# --------------------------------------------------------------------------- readers
def read_stage_checkpoint(path: Path) -> LoadedWeights:
    """A Lightning stage checkpoint (``.ckpt`` file or DeepSpeed folder) written by ``train.py``, whole:
    the frozen parts of a trainable-only checkpoint are read back from their sources (:func:`fill_frozen`)."""
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
    fill_frozen(checkpoint, path)
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
