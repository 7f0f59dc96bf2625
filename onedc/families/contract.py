"""The model-family contract: what every codec family gives the rest of onedc.

A *family* is one registered object (:class:`ModelFamily`) that owns, for a model config dict:

::

    build        model config ─> VAE, codec, generator        (build_vae / build_codec / build_generator)
    init_from    which prefixes a stage checkpoint fills        (init_prefixes, fit_init_state)
    generator    how a fresh generator starts                    (start_generator)
    stages       the codec pass and its rate                     (codec_pass, rate_bits, semantic_width, idle_parts)
    coding       the file's decoder-side identity and streams    (decoder_prefixes, y_symbols, load_codec)
    z-only       files that carry only z: ŷ = the prior means      (z_only_padding, z_only_indices, z_only_latents)

Stages, the pipeline, the coding bundle, evaluation and the importer call the family and never
ask which one they hold. Two families are registered: ``light`` (the CompressAI hyperprior codec
of ``model=tiny``/``sd15``) and ``reference`` (the published OneDC, ``model=onedc_sd15``). A new
family is one module with a :class:`ModelFamily` subclass, registered by :func:`register_family`,
and one model config whose ``family:`` names it; ``tests/families/test_conformance.py`` runs every
registered family through the contract.

Also here: the generic parts of a stored model config (bundle parts, generator decode settings).
"""
from __future__ import annotations

import abc
import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from onedc.coding.checkpoints import register_frozen_loader
from onedc.errors import CheckpointError, ConfigError
from onedc.modules.streams import DecodedLatents

# Parts of the inference bundle; any other prefix in a checkpoint (distill., discriminator., ...)
# is training-only and ignored.
BUNDLE_PARTS: tuple[str, ...] = ("vae", "codec", "generator")
# Non-tensor generator settings that change the decoded image (model.generator config keys).
GENERATOR_DECODE_SETTINGS: tuple[str, ...] = ("timestep", "prediction_type", "scheduler")
# Decoder-side prefixes every family shares: the VAE decoder and the generator.
SHARED_DECODER_PREFIXES: tuple[str, ...] = ("vae.autoencoder.decoder.", "vae.autoencoder.post_quant_conv.", "generator.")


@runtime_checkable
class CodecPass(Protocol):
    """What one codec pass gives the stages (both families' forward outputs are NamedTuples with these)."""

    y_hat: Tensor     #: quantised y (straight-through in training)
    z_hat: Tensor     #: FSQ codes of z
    semantic: Tensor  #: decoder-side semantic map at 1/64 (the distillation head's input)
    features: Tensor  #: g_s output at 1/8: the generator's input
    tokens: Tensor    #: (B, L, d) cross-attention tokens of the generator


@runtime_checkable
class FamilyCodec(Protocol):
    """The codec object of a family, as the coding bundle drives it (CompressAI's codec contract).

    ``forward(x, v)`` in eval mode gives exactly the ŷ the files decode to; ``compress`` returns
    ``{"strings": [y_strings, z_strings], "shape", "fixes", "checksums", "y_hat"}``;
    ``decompress`` returns :class:`~onedc.modules.streams.DecodedLatents`; ``update`` makes the
    rANS tables current.
    """

    downsample: int
    fsq: Any

    def __call__(self, x: Tensor, v: Tensor) -> Any: ...

    def compress(self, x: Tensor, v: Tensor) -> dict: ...

    def decompress(self, strings: list[list[bytes]], shape: Sequence[int], fixes: Sequence[bytes] | None = None,
                   checksums: Sequence[int] | None = None, legacy: bool = False) -> DecodedLatents: ...

    def update(self, scale_table_values: Any = None, force: bool = False) -> bool: ...

    def rate_bits(self, out: Any) -> Tensor: ...

    def z_bits_per_image(self, z_shape: Sequence[int]) -> int: ...


class ModelFamily(abc.ABC):
    """One codec family behind one interface (see the module docstring).

    Subclasses implement every abstract method; the class attributes say what the family is.
    Methods take plain model-config dicts (the dict a checkpoint stores), never config objects.
    """

    #: the ``model.family`` value that selects this family
    name: ClassVar[str]
    #: stage 1 trains the generator jointly with the codec (the published model's fused stage I)
    distills_with_generator: ClassVar[bool] = False
    #: the codec's rANS tables are model state (saved in checkpoints, resized on load)
    saves_coding_tables: ClassVar[bool] = False
    #: state-dict prefixes of the codec's decoder side, hashed into the files' model identity
    codec_decoder_prefixes: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ building
    @abc.abstractmethod
    def build_vae(self, model_config: Mapping[str, Any], device: Any = None) -> nn.Module:
        """The frozen VAE of ``model_config["vae"]``."""

    @abc.abstractmethod
    def build_codec(self, model_config: Mapping[str, Any], vae_channels: int) -> nn.Module:
        """The codec of ``model_config["codec"]`` with random weights (a :class:`FamilyCodec`)."""

    @abc.abstractmethod
    def build_generator(self, model_config: Mapping[str, Any], device: Any = None) -> nn.Module:
        """The one-step generator of ``model_config["generator"]``."""

    # ------------------------------------------------------------------ init_from and the generator's start
    def init_prefixes(self, model_config: Mapping[str, Any]) -> tuple[str, ...]:
        """State-dict prefixes a stage's ``init_from`` loads (default: codec and generator)."""
        return ("codec.", "generator.")

    def fit_init_state(self, codec: nn.Module, prefix: str, state: dict[str, Tensor]) -> None:
        """Adapt ``codec``'s buffers to a checkpoint's ``state`` before a load (default: nothing)."""

    @abc.abstractmethod
    def start_generator(self, generator: nn.Module, codec: nn.Module, mode: str) -> None:
        """Start a fresh generator by ``model.generator.init`` (``residual``); ValueError if unsupported."""

    # ------------------------------------------------------------------ the stages' codec pass
    @abc.abstractmethod
    def codec_pass(self, codec: nn.Module, x: Tensor, v: Tensor) -> CodecPass:
        """The codec pass of a training stage (padded image in [-1, 1], VAE latent) -> :class:`CodecPass`."""

    def rate_bits(self, codec: nn.Module, out: CodecPass) -> Tensor:
        """(B,) estimated bits per image of a codec pass, from the codec's own rate model."""
        return codec.rate_bits(out)

    @abc.abstractmethod
    def semantic_width(self, codec: nn.Module) -> int:
        """Channels of the codec's semantic map (the distillation head's input)."""

    def idle_parts(self, codec: nn.Module, stage: str, trains_generator: bool) -> list[nn.Module]:
        """Codec parts that get no gradient in ``stage`` (frozen there, so DDP sees no unused parameter)."""
        return []

    # ------------------------------------------------------------------ coding
    def decoder_prefixes(self) -> tuple[str, ...]:
        """Bundle state-dict prefixes of everything the decoder runs (the files' model identity)."""
        return SHARED_DECODER_PREFIXES + self.codec_decoder_prefixes

    @abc.abstractmethod
    def y_symbols(self, codec: nn.Module, padded_size: tuple[int, int]) -> int:
        """Number of y symbols of one image of ``padded_size`` (bounds the rANS reader of a forged file)."""

    def load_codec(self, codec: nn.Module, weights: Mapping[str, Tensor], source: Path) -> None:
        """Load a bundle's codec weights strictly (default: :func:`load_part`)."""
        load_part("codec", codec, dict(weights), source)

    # ------------------------------------------------------------------ z-only files
    #: how a z-only encoder pads the image to the codec's multiple (torch ``F.pad`` mode)
    z_only_padding: ClassVar[str] = "replicate"

    @abc.abstractmethod
    def z_only_indices(self, codec: nn.Module, x: Tensor, v: Tensor) -> Tensor:
        """FSQ indices (B, h, w) of ẑ for padded images ``x`` and their VAE latents ``v``: all a z-only file holds."""

    @abc.abstractmethod
    def z_only_latents(self, codec: nn.Module, z_hat: Tensor) -> DecodedLatents:
        """Decoder-side latents of a z-only file from ẑ alone: ŷ is the hyperprior's means (nothing of y coded)."""

    def __repr__(self) -> str:
        return f"<model family {self.name!r}>"


# --------------------------------------------------------------------------- registry
FAMILIES: dict[str, ModelFamily] = {}
DEFAULT_FAMILY = "light"


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` under its name (a config selects it by ``model.family``)."""
    missing = sorted(getattr(family, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"{type(family).__name__} does not implement {', '.join(missing)}")
    FAMILIES[family.name] = family
    return family


def family_of(model_config: Mapping[str, Any]) -> ModelFamily:
    """The family of a model config dict (``model.family``, default ``light``)."""
    name = str(model_config.get("family") or DEFAULT_FAMILY)
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name} is not a registered model family; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


# --------------------------------------------------------------------------- stored model configs
def generator_settings(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's non-tensor decode settings (:data:`GENERATOR_DECODE_SETTINGS`) from a model config."""
    gen_cfg = model_config.get("generator") or {}
    return {k: gen_cfg.get(k) for k in GENERATOR_DECODE_SETTINGS if k in gen_cfg}


def weights_only_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's model config that builds without the machine it trained on.

    The state dict holds all the weights (a trainable-only checkpoint's frozen parts were read back
    by :func:`onedc.coding.checkpoints.fill_frozen`), so a ``pretrained`` dir only supplies the architecture:
    it is used where present (its layout is certain to match), and dropped where it is not on
    this machine but an architecture config exists (``vae.config``, ``generator.unet``).
    """
    model_config = copy.deepcopy(dict(model_config))
    for part, arch_key in (("vae", "config"), ("generator", "unet")):
        node = model_config.get(part)
        if isinstance(node, dict) and node.get(arch_key) is not None and node.get("pretrained") is not None:
            if not Path(str(node["pretrained"])).expanduser().is_dir():
                node["pretrained"] = None
    return model_config


def split_parts(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group a prefixed state dict by bundle part (:data:`BUNDLE_PARTS`), dropping training-only parts."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in BUNDLE_PARTS}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
    return parts


def load_part(name: str, module: nn.Module, weights: dict[str, Tensor], source: Path,
              allowed_missing: Iterable[str] = (), plain: bool = False) -> None:
    """Load ``weights`` into ``module`` strictly, reporting any mismatch as a CheckpointError.

    ``plain`` skips the module's own ``load_state_dict`` override (CompressAI's resizes the CDF
    buffers and fails with a KeyError when they are absent) for ``nn.Module``'s.
    """
    if not weights:
        raise CheckpointError(f"{source} holds no '{name}.' weights: it cannot build the {name} for inference")
    load = nn.Module.load_state_dict.__get__(module) if plain else module.load_state_dict
    try:
        missing, unexpected = load(weights, strict=False)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatches raise even when strict=False
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{source}: the {name} weights do not fit the model its config builds "
                              f"({' '.join(line.strip() for line in first[:3])})") from err
    missing = [k for k in missing if k not in set(allowed_missing)]
    if missing or unexpected:
        def shown(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise CheckpointError(
            f"{source}: the {name} weights do not match its config: "
            f"missing {shown(missing) or 'none'}; unexpected {shown(list(unexpected)) or 'none'}")


# --------------------------------------------------------------------------- frozen parts of trainable-only checkpoints
def pretrained_part(part: str, model_config: Mapping[str, Any], location: str) -> dict[str, Tensor]:
    """The prefixed state dict of ``part`` (``vae`` or ``generator``) built by the model's family from the
    pretrained source ``location``, as the stage that wrote the checkpoint built it (its seed drawn in a
    forked RNG, so reading a checkpoint leaves the caller's random state alone).

    What :func:`onedc.coding.checkpoints.fill_frozen` calls for a part recorded as
    ``model.vae.pretrained:LOCATION`` or ``model.generator.pretrained:LOCATION``.
    """
    config = copy.deepcopy(dict(model_config))
    config[part] = dict(config.get(part) or {}, pretrained=location)
    family = family_of(config)
    build = {"vae": family.build_vae, "generator": family.build_generator}[part]
    with torch.random.fork_rng(devices=[]):
        module = build(config)
    return {f"{part}.{key}": value for key, value in module.state_dict().items()}


for _part in ("vae", "generator"):
    register_frozen_loader(f"model.{_part}.pretrained",
                           lambda config, location, part=_part: pretrained_part(part, config, location))
