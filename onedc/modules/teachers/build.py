"""Building a teacher from the plain options of a ``configs/tokenizer/*.yaml`` file.

:func:`build_teacher` checks the options, then one builder per kind loads local weights (or
draws random ones) and names the result (:mod:`.identity`). ``pretrained: asset:NAME`` names a
file shipped in :mod:`onedc.assets` (the tiny VQ teacher), loaded like any other file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from onedc.assets import resolve_pretrained
from onedc.errors import ConfigError, WeightsError
from onedc.modules.state_dict_files import STATE_DICT_SUFFIXES, load_state_dict_file, read_state_dict
from onedc.modules.teachers.base import (_LEGACY_RESIZE, IMAGENET_MEAN, IMAGENET_STD, TEACHER_KINDS, Teacher,
                                         _build_random, _check_range, _protocol_suffix)
from onedc.modules.teachers.codebook import _init_codebook_from_data
from onedc.modules.teachers.features import TimmFeatureTeacher, TransformersFeatureTeacher
from onedc.modules.teachers.identity import _random_identity, _weights_identity
from onedc.modules.teachers.vq import VQTeacher

log = logging.getLogger("onedc")


def _check_path(path: Path, expected: str) -> None:
    if not path.exists():
        raise WeightsError(f"teacher weights not found at {path}: expected {expected}")


_VQ_FORMAT = ("a diffusers VQModel directory (config.json + diffusion_pytorch_model.safetensors), "
              "a .safetensors/.bin/.pt state-dict file of the VQModel described by `config`, or the "
              "original MaskGIT-VQGAN .bin (converted on load; `onedc import-reference --tokenizer` "
              "converts it once)")


def _build_vq(pretrained: str | None, config: dict | None, seed: int, input_scale: float,
              meta: bool, tile_size: int | None = None,
              protocol: dict[str, Any] | None = None) -> VQTeacher:
    from diffusers import VQModel

    protocol = protocol or {}

    def teacher(model: nn.Module, identity: str) -> VQTeacher:
        if tile_size is not None and not identity.endswith(":meta"):
            identity += f":tile={tile_size}"
        return VQTeacher(model, identity=identity, input_scale=input_scale, tile_size=tile_size, **protocol)

    def from_config() -> nn.Module:
        if config is None:
            raise ConfigError("vq teacher needs `config` (diffusers VQModel kwargs) to build a random "
                              "VQModel or to load a state-dict file; or give a diffusers directory")
        try:
            return VQModel(**config)
        except TypeError as err:
            raise ConfigError(f"vq teacher config is not valid VQModel kwargs: {err}") from err

    if pretrained is None:
        model = _build_random(from_config, seed, meta)
        if meta:
            return teacher(model, "VQTeacher:meta")
        _init_codebook_from_data(model, seed)
        spec = {"config": config, "codebook": "kmeans-pseudo-images-v1"}
        return teacher(model, _random_identity(VQTeacher, spec, seed, input_scale))

    path = Path(pretrained)
    _check_path(path, _VQ_FORMAT)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"teacher weights dir {path} has no config.json: expected {_VQ_FORMAT}")
        try:
            if meta:
                arch = VQModel.load_config(str(path))
                model = _build_random(lambda: VQModel.from_config(arch), seed, meta=True)
            else:
                model = VQModel.from_pretrained(str(path))
        except Exception as err:
            raise WeightsError(f"cannot load VQModel from {path} ({err}): expected {_VQ_FORMAT}") from err
    elif path.suffix not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"teacher weights {path} have an unknown suffix: expected {_VQ_FORMAT}")
    elif meta:
        model = _build_random(from_config, seed, meta=True)
    else:
        from onedc.modules.maskgit import is_maskgit_state_dict, maskgit_vqmodel

        state = read_state_dict(path, expected=_VQ_FORMAT)
        if is_maskgit_state_dict(state):
            log.info("tokenizer %s is a MaskGIT-VQGAN state dict: converting it to a diffusers VQModel "
                     "(docs/reference-model.md §8); `onedc import-reference --tokenizer %s -o DIR` does this once", path, path)
            model = maskgit_vqmodel(state, path=path)
        else:
            model = load_state_dict_file(_build_random(from_config, seed, meta=True), path,
                                         what="the VQModel of `config`", expected=_VQ_FORMAT, state=state)
    return teacher(model, "VQTeacher:meta" if meta else _weights_identity(VQTeacher, path, input_scale))


def _build_timm(pretrained: str | None, model_name: str | None, model_kwargs: dict | None,
                seed: int, input_scale: float, meta: bool, protocol: dict[str, Any]) -> TimmFeatureTeacher:
    import timm

    if not model_name:
        raise ConfigError("timm teacher needs `model_name` (e.g. vit_base_patch14_dinov2)")
    kwargs = dict(model_kwargs or {})
    expected = (f"a .safetensors/.pth/.bin weights file of timm model {model_name!r} without "
                "classifier head (num_classes=0)")

    def make(weights: Path | None) -> nn.Module:
        # timm's own local-file route: the file replaces the hub source in the pretrained
        # config, so the model's checkpoint filter (pos-embed resampling, layout conversion)
        # still applies. num_classes=0 in the overlay keeps timm's load strict (timm relaxes
        # strictness when model and weights class counts differ), so a wrong file cannot load
        # half-way.
        load = (dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=0))
                if weights is not None else dict(pretrained=False))
        try:
            return timm.create_model(model_name, num_classes=0, **load, **kwargs)
        except Exception as err:
            if weights is not None:
                raise WeightsError(f"cannot load {weights} into timm model {model_name!r} "
                                   f"({err}): expected {expected}") from err
            raise ConfigError(f"cannot build timm model {model_name!r} with {kwargs} ({err})") from err

    if pretrained is None or meta:
        model = _build_random(lambda: make(None), seed, meta)
        identity = ("TimmFeatureTeacher:meta" if meta else _random_identity(
            TimmFeatureTeacher, {"model_name": model_name, "model_kwargs": kwargs}, seed, input_scale))
        return TimmFeatureTeacher(model, identity=identity, input_scale=input_scale, **protocol)

    path = Path(pretrained)
    _check_path(path, expected)
    if not path.is_file():
        raise WeightsError(f"teacher weights {path} is not a file: expected {expected}")
    model = make(path)
    return TimmFeatureTeacher(model, identity=_weights_identity(TimmFeatureTeacher, path, input_scale),
                              input_scale=input_scale, **protocol)


def _processor_stats(path: Path) -> tuple[Sequence[float], Sequence[float]]:
    """Image mean/std from a saved ``preprocessor_config.json``, ImageNet statistics otherwise."""
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        data = json.loads(proc.read_text())
        if "image_mean" in data and "image_std" in data:
            return data["image_mean"], data["image_std"]
    return IMAGENET_MEAN, IMAGENET_STD


def _build_transformers(pretrained: str | None, config: dict | None, seed: int,
                        input_scale: float, meta: bool, protocol: dict[str, Any]) -> TransformersFeatureTeacher:
    from transformers import AutoConfig, AutoModel

    expected = "a transformers model directory (config.json + model.safetensors), e.g. a saved DINOv2"
    if pretrained is None:
        if not config or "model_type" not in config:
            raise ConfigError("transformers teacher needs `config` with a `model_type` (e.g. dinov2) "
                              "or `pretrained` (a saved model directory)")
        try:
            model_config = AutoConfig.for_model(**config)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"transformers teacher config is not valid ({err})") from err
        model = _build_random(lambda: AutoModel.from_config(model_config), seed, meta)
        identity = ("TransformersFeatureTeacher:meta" if meta else _random_identity(
            TransformersFeatureTeacher, {"config": config}, seed, input_scale))
        return TransformersFeatureTeacher(model, identity=identity, input_scale=input_scale, **protocol)

    path = Path(pretrained)
    _check_path(path, expected)
    if not (path / "config.json").is_file():
        raise WeightsError(f"teacher weights dir {path} has no config.json: expected {expected}")
    try:
        if meta:
            model_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            model = _build_random(lambda: AutoModel.from_config(model_config), seed, meta=True)
        else:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise WeightsError(f"cannot load a transformers model from {path} ({err}): "
                           f"expected {expected}") from err
    mean, std = _processor_stats(path)
    return TransformersFeatureTeacher(
        model, identity=_weights_identity(TransformersFeatureTeacher, path, input_scale),
        input_scale=input_scale, mean=mean, std=std, **protocol)


def build_teacher(kind: str, *, pretrained: str | None = None, config: dict | None = None,
                  model_name: str | None = None, model_kwargs: dict | None = None, seed: int = 0,
                  input_scale: float = 0.5, allow_random: bool = True,
                  tile_size: int | None = None,
                  input_range: Sequence[float] | None = None, resize: str = _LEGACY_RESIZE,
                  device: str | torch.device | None = None) -> Teacher:
    """Build a frozen teacher of ``kind`` ("vq", "timm" or "transformers") from plain options.

    The options are those of a ``configs/tokenizer/*.yaml`` file. ``pretrained`` is a local path
    (VQ: diffusers VQModel dir, state-dict file of the VQModel in ``config``, or the original
    MaskGIT-VQGAN ``.bin``, converted on load; timm: weights file for ``model_name``;
    transformers: saved model dir); ``None`` builds random weights,
    deterministically from ``seed`` and without touching the global RNG, and is refused when
    ``allow_random`` is False. VQ only: ``tile_size`` encodes the image in independent tiles
    (see :class:`VQTeacher`). ``pretrained="asset:NAME"`` loads a file shipped in
    :mod:`onedc.assets` (``asset:vq_tiny_teacher``, made offline by ``python -m onedc.assets.make``);
    nothing is ever trained here. ``input_range`` (None = [-1, 1] for VQ, [0, 1] for feature teachers) and ``resize``
    (:data:`RESIZE_METHODS`) are the input protocol; a non-default one is part of the identity.
    ``device="meta"`` builds the architecture only, for counting
    parameters of full-size presets; such a teacher cannot compute targets. Bad options raise
    :class:`ConfigError`, missing or unfitting weights :class:`WeightsError`.
    """
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"unknown teacher kind {kind!r}; valid kinds: {', '.join(TEACHER_KINDS)}")
    unused = {"vq": ("model_name", "model_kwargs"), "timm": ("config", "tile_size"),
              "transformers": ("model_name", "model_kwargs", "tile_size")}[kind]
    given = {"config": config, "model_name": model_name, "model_kwargs": model_kwargs, "tile_size": tile_size}
    stray = [name for name in unused if given[name]]
    if stray:
        raise ConfigError(f"teacher kind {kind!r} does not use {', '.join(stray)}; "
                          "did you mix options of two tokenizer configs?")
    meta = device is not None and torch.device(device).type == "meta"
    if pretrained is None and not allow_random and not meta:
        raise WeightsError(f"the {kind} teacher has no pretrained weights and random teachers are "
                           f"not allowed here: set tokenizer.pretrained=/path/to/weights "
                           f"({'a model dir' if kind != 'timm' else 'a weights file'})")
    pretrained = resolve_pretrained(pretrained)
    pretrained = None if pretrained is None else str(Path(pretrained).expanduser())
    protocol = {"input_range": None if input_range is None else _check_range(input_range),
                "resize": str(resize)}
    if kind == "vq":
        tile = None if tile_size is None else int(tile_size)
        teacher: Teacher = _build_vq(pretrained, config, seed, input_scale, meta, tile, protocol)
    elif kind == "timm":
        teacher = _build_timm(pretrained, model_name, model_kwargs, seed, input_scale, meta, protocol)
    else:
        teacher = _build_transformers(pretrained, config, seed, input_scale, meta, protocol)
    if not meta:  # the same weights fed differently give other targets: another teacher
        teacher.identity += _protocol_suffix(teacher.kind, input_range, teacher.resize)
    if device is not None and not meta:
        teacher = teacher.to(device)
    return teacher
