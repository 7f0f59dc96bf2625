"""The one home of the authors' released OneDC files (docs/reference-model.md §2): key layouts, LoRA merge, import.

::

    CHECKPOINT_DIR/model.safetensors    1252 keys  ─ released_to_module_keys ─> generator.unet.* / generator.to_xt.*
    CHECKPOINT_DIR/model_1.safetensors   779 keys  ─────────────────────────> codec.*
    VAE_DIR (diffusers AutoencoderKL)     248 keys  ─────────────────────────> vae.autoencoder.*
                                                                        └─> OUT.ckpt {"onedc": {...}, "state_dict": ...}

Every file is checked against the modules it must fill, built on the meta device at the given
architecture (the full size by default): all keys consumed, none missing, every shape equal.
A wrong file fails with one :class:`~onedc.errors.WeightsError` line naming it and the first
offending keys (the 3.7 GB UNet file from its header alone, before any tensor is read). The LoRA stays unmerged (as released) or is merged
exactly (§5.1). :func:`save_released_checkpoint` writes modules in the released layout (the
inverse direction, used by the tests to make synthetic checkpoints).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from onedc.errors import WeightsError
from onedc.io import atomic_write, atomic_write_bytes
from onedc.modules.fsq import FSQ
from onedc.modules.reference.codec import ReferenceCodec
from onedc.modules.reference.generator import (
    LORA_ADAPTER,
    LORA_ALPHA,
    LORA_RANK,
    MODULE_UNET_PREFIX,
    MODULE_XT_PREFIX,
    RELEASED_XT_PREFIX,
    build_reference_generator,
)
from onedc.modules.reference.vae import SD21_VAE_CONFIG
from onedc.modules.state_dict_files import check_state_dict, load_state_dict_file, read_state_dict
from onedc.modules.weights import diffusers_model_dir

GENERATOR_FILE = "model.safetensors"
CODEC_FILE = "model_1.safetensors"
VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
RELEASED_FORMAT = ("the released OneDC checkpoint folder (model.safetensors = feedforward model, "
                   "model_1.safetensors = codec IntraNoAR, both as published by the authors)")
VAE_FORMAT = "the SD-2.1 VAE (stabilityai/stable-diffusion-2-1, subfolder vae: a diffusers AutoencoderKL dir)"
# Names diffusers' old AttentionBlock used for the VAE mid attention; hub VAE files still carry them.
_DEPRECATED_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
# Bundle prefixes of the onedc checkpoint (onedc.families.BUNDLE_PARTS; FrozenVAE holds `autoencoder`).
VAE_PREFIX, CODEC_PREFIX, GENERATOR_PREFIX = "vae.autoencoder.", "codec.", "generator."


@dataclass(frozen=True)
class ReferenceArchitecture:
    """Sizes of the three parts; the defaults are the released full size.

    ``generator``: :func:`~onedc.modules.reference.generator.build_reference_generator` kwargs;
    ``codec``: :class:`~onedc.modules.reference.codec.ReferenceCodec` kwargs; ``vae``: diffusers
    ``AutoencoderKL`` kwargs.
    """

    generator: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD21_VAE_CONFIG))


class ReferenceWeights(NamedTuple):
    """The imported tensors, float32, keyed as onedc's modules name them (no bundle prefix)."""

    generator: dict[str, Tensor]  #: ReferenceGenerator keys (``unet.*``, ``to_xt.*``); LoRA merged if asked
    codec: dict[str, Tensor]      #: reference codec keys (= ``model_1.safetensors``)
    vae: dict[str, Tensor]        #: diffusers ``AutoencoderKL`` keys

    def bundle_state_dict(self) -> dict[str, Tensor]:
        """One prefixed state dict (``vae.autoencoder.*``, ``codec.*``, ``generator.*``) as checkpoints hold it."""
        out = {VAE_PREFIX + k: v for k, v in self.vae.items()}
        out.update({CODEC_PREFIX + k: v for k, v in self.codec.items()})
        out.update({GENERATOR_PREFIX + k: v for k, v in self.generator.items()})
        return out


def reference_architecture(model_config: Mapping[str, Any]) -> ReferenceArchitecture:
    """The sizes a ``model=onedc_sd15``-style model node (plain dict) describes.

    The released file always carries the LoRA, so its rank/α come from ``generator.lora`` when
    set and are the reference's (64, 8) when it is null (a preset for LoRA-merged weights).
    """
    gen = model_config.get("generator") or {}
    lora = gen.get("lora") or {}
    generator = {"lora_rank": int(lora.get("rank", LORA_RANK)), "lora_alpha": float(lora.get("alpha", LORA_ALPHA))}
    if gen.get("unet"):
        generator["unet_config"] = dict(gen["unet"])
    if gen.get("gs_channels") is not None:
        generator["gs_channels"] = int(gen["gs_channels"])
    vae = (model_config.get("vae") or {}).get("config")
    return ReferenceArchitecture(generator=generator, codec=dict(model_config.get("codec") or {}),
                                 vae=dict(vae) if vae else dict(SD21_VAE_CONFIG))


# --------------------------------------------------------------------------- expected layouts
def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def released_generator_shapes(architecture: ReferenceArchitecture) -> dict[str, torch.Size]:
    """Key -> shape of ``model.safetensors`` for ``architecture`` (1252 keys at full size)."""
    generator = build_reference_generator(device="meta", lora=True, **architecture.generator)
    return module_to_released_keys(_shapes(generator))


def released_codec_shapes(architecture: ReferenceArchitecture) -> dict[str, torch.Size]:
    """Key -> shape of ``model_1.safetensors`` for ``architecture`` (779 keys at full size)."""
    with torch.device("meta"):
        return _shapes(ReferenceCodec(**architecture.codec))


def vae_shapes(architecture: ReferenceArchitecture) -> dict[str, torch.Size]:
    """Key -> shape of the diffusers ``AutoencoderKL`` of ``architecture`` (248 keys at SD-2.1 size)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return _shapes(AutoencoderKL(**architecture.vae))


# --------------------------------------------------------------------------- reading
def _safetensors_shapes(path: Path, expected: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a ``.safetensors`` header only (no tensor data read)."""
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"{path} not found: expected {expected}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # bad header, truncated, not safetensors: all mean "not this file"
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise WeightsError(f"cannot read {path} as safetensors ({reason}): expected {expected}") from err


def _float32(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # The released files are expected fp32 (§2, unverified): half-precision files are widened.
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def read_released_file(path: str | Path, shapes: Mapping[str, torch.Size], what: str) -> dict[str, Tensor]:
    """The tensors of one released ``.safetensors`` file, after checking its header against ``shapes``."""
    from safetensors.torch import load_file

    path = Path(path)
    header = _safetensors_shapes(path, RELEASED_FORMAT)
    # Meta tensors carry the header's shapes at no cost: the check runs before any data is read.
    check_state_dict({k: torch.empty(s, device="meta") for k, s in header.items()}, shapes, path, what,
                     RELEASED_FORMAT)
    return _float32(load_file(str(path), device="cpu"))


def _rename_deprecated_vae_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in _DEPRECATED_ATTENTION.items():
                key = key.replace(old, new)
            if value.ndim == 4 and value.shape[-2:] == (1, 1):  # 1x1-conv form of q/k/v/proj
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def read_vae_dir(vae_dir: str | Path, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """The ``AutoencoderKL`` tensors of a diffusers VAE dir (or an SD dir with ``vae/``), checked against ``shapes``.

    The fp32 weight file is preferred over ``.bin``; old attention key names (``query``,
    ``key``, ``value``, ``proj_attn``) are renamed as diffusers does when it loads them.
    """
    path = diffusers_model_dir(str(vae_dir), "vae", VAE_FORMAT, "--vae")
    weights = next((path / name for name in VAE_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise WeightsError(f"{path} has no {' or '.join(VAE_WEIGHT_FILES)}: expected {VAE_FORMAT}")
    state = _rename_deprecated_vae_keys(read_state_dict(weights, expected=VAE_FORMAT))
    check_state_dict(state, shapes, weights, "the SD-2.1 AutoencoderKL", VAE_FORMAT)
    return _float32(state)


def read_released_codec(path: str | Path, architecture: ReferenceArchitecture) -> dict[str, Tensor]:
    """The tensors of ``model_1.safetensors``, strictly checked by the codec's own released-file loader."""

    return _float32(load_released_codec(path, **architecture.codec).state_dict())


def read_reference_weights(checkpoint_dir: str | Path, vae_dir: str | Path, *,
                           architecture: ReferenceArchitecture | None = None,
                           merge_lora: bool = False) -> ReferenceWeights:
    """Read and check the released folder and the VAE dir; every key of every file is consumed.

    ``merge_lora`` folds the LoRA into the UNet weights (exact, §5.1): the result then loads into
    a generator built with ``lora=False``. Raises :class:`WeightsError` for a missing, unreadable
    or mis-fitting file (one line: the file and its first missing/unexpected/mis-shaped keys).
    """
    architecture = architecture or ReferenceArchitecture()
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a directory: expected {RELEASED_FORMAT}")
    # Smallest file first, so a wrong VAE dir fails before gigabytes of UNet are read.
    vae = read_vae_dir(vae_dir, vae_shapes(architecture))
    released = read_released_file(folder / GENERATOR_FILE, released_generator_shapes(architecture),
                                  "the OneDC feedforward model (SD-1.5 UNet + LoRA + conv_in + vae_reduction)")
    generator = released_to_module_keys(released)
    if merge_lora:
        sizes = architecture.generator
        scale = float(sizes.get("lora_alpha", LORA_ALPHA)) / float(sizes.get("lora_rank", LORA_RANK))
        generator = merge_lora_state_dict(generator, scale=scale)
    codec = read_released_codec(folder / CODEC_FILE, architecture)
    return ReferenceWeights(generator=generator, codec=codec, vae=vae)


# --------------------------------------------------------------------------- writing
def reference_checkpoint(weights: ReferenceWeights, model_config: Mapping[str, Any],
                         source: str | Path | None = None) -> dict[str, Any]:
    """The onedc checkpoint dict for ``weights``: what ``OneDCCodec.from_checkpoint`` and ``init_from`` read.

    ``model_config`` is the ``model`` node (as a plain dict) that rebuilds these modules; it is
    stored as the finished (finetune-stage) model so a later stage accepts it as ``init_from``.
    """
    from onedc.coding.checkpoints import CHECKPOINT_FORMAT

    meta = {"format": CHECKPOINT_FORMAT, "stage": "finetune", "model": dict(model_config), "tokenizer": {},
            "imported_from": str(source) if source is not None else None}
    return {"onedc": meta, "state_dict": weights.bundle_state_dict()}


def import_reference(checkpoint_dir: str | Path, vae_dir: str | Path, output: str | Path, *,
                     model_config: Mapping[str, Any], architecture: ReferenceArchitecture | None = None,
                     merge_lora: bool = False) -> Path:
    """``onedc import-reference CHECKPOINT_DIR --vae VAE_DIR -o OUT.ckpt``: read, check, write atomically.

    ``model_config`` (the ``model=onedc_sd15`` node as a plain dict) is stored in the checkpoint
    to rebuild the modules; the sizes checked are ``architecture``, by default the ones it
    describes (:func:`reference_architecture`). With ``merge_lora`` the stored config has
    ``generator.lora: null``. Returns ``output``.
    """
    architecture = architecture or reference_architecture(model_config)
    weights = read_reference_weights(checkpoint_dir, vae_dir, architecture=architecture, merge_lora=merge_lora)
    model_config = copy.deepcopy(dict(model_config))
    if merge_lora and isinstance(model_config.get("generator"), dict):
        model_config["generator"]["lora"] = None
    checkpoint = reference_checkpoint(weights, model_config, source=checkpoint_dir)
    return atomic_write(output, lambda handle: torch.save(checkpoint, handle))


def save_released_checkpoint(generator: nn.Module, codec: nn.Module, folder: str | Path) -> Path:
    """Write ``generator`` and ``codec`` as the authors release them: ``model.safetensors`` + ``model_1.safetensors``.

    The generator must carry its unmerged LoRA (the released layout). Returns ``folder``.
    """
    from safetensors.torch import save


    folder = Path(folder)
    state = module_to_released_keys(generator.state_dict())
    atomic_write_bytes(folder / GENERATOR_FILE, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    save_released_codec(codec, folder / CODEC_FILE)
    return folder


# --------------------------------------------------------------------------- generator key layout (model.safetensors)
def released_to_module_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``model.safetensors`` keys -> :class:`ReferenceGenerator` state-dict keys (same tensors)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(RELEASED_XT_PREFIX):
            out[MODULE_XT_PREFIX + key[len(RELEASED_XT_PREFIX):]] = value
        else:
            out[MODULE_UNET_PREFIX + key] = value
    return out


def module_to_released_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`ReferenceGenerator` state-dict keys -> ``model.safetensors`` keys (inverse of the above)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(MODULE_XT_PREFIX):
            out[RELEASED_XT_PREFIX + key[len(MODULE_XT_PREFIX):]] = value
        elif key.startswith(MODULE_UNET_PREFIX):
            out[key[len(MODULE_UNET_PREFIX):]] = value
        else:
            raise KeyError(f"'{key}' is neither a unet. nor a to_xt. key of the reference generator")
    return out


def merge_lora_state_dict(state: Mapping[str, Tensor], scale: float = LORA_ALPHA / LORA_RANK,
                          adapter: str = LORA_ADAPTER) -> dict[str, Tensor]:
    """Fold every LoRA pair into its base layer: W' = W + scale·B·A, computed in float64 (§5.1).

    Works on either key layout: ``<m>.base_layer.{weight,bias}`` + ``<m>.lora_{A,B}.<adapter>.weight``
    become ``<m>.{weight,bias}``; other keys pass through. For convs, B is 1x1 and A has the base
    kernel, so B·A is ``B[:, :, 0, 0] @ A.reshape(r, -1)`` reshaped to the base kernel. The result
    is the float32 value nearest the exact sum, and loads into a generator built with ``lora=False``.
    """
    a_suffix, b_suffix = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    merged: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith((a_suffix, b_suffix)):
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        module, _, leaf = key.rpartition(".base_layer.")
        if leaf == "weight":
            down, up = state[module + a_suffix], state[module + b_suffix]
            delta = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
            value = (value.double() + scale * delta.reshape(value.shape)).to(value.dtype)
        merged[f"{module}.{leaf}"] = value
    return merged


# --------------------------------------------------------------------------- codec file (model_1.safetensors)
_WHAT = "the OneDC reference codec (IntraNoAR)"
_EXPECTED = f"the authors' {CODEC_FILE} (779 keys, docs/reference-model.md §2) or a file written by save_released_codec"


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
