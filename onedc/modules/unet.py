"""Loading a diffusers UNet from a local path: a diffusers directory or a plain state-dict file.

The one UNet loader of onedc: the one-step generator (light and published), the diffusion-GAN
critic and the guidance model's score UNets all load here.

::

    path ─ file (.bin/.pt/.safetensors) ─> build from ``unet_config`` on meta ─ assign tensors
         └ directory (model_index/unet/config.json) ─> <config's _class_name>.from_pretrained

Every failure is one :class:`~onedc.errors.WeightsError` naming the path and what was expected.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onedc.errors import WeightsError
from onedc.modules.state_dict_files import STATE_DICT_SUFFIXES, load_state_dict_file
from onedc.modules.weights import diffusers_model_dir

log = logging.getLogger("onedc")

UNET_CLASSES: tuple[str, ...] = ("UNet2DModel", "UNet2DConditionModel")


def load_unet(pretrained: str | Path, unet_config: Mapping[str, Any] | None = None, *,
              classes: Sequence[str] = ("UNet2DConditionModel",), what: str = "the UNet",
              setting: str = "model.generator.pretrained") -> nn.Module:
    """A diffusers UNet of one of ``classes`` from a diffusers dir or a state-dict file.

    A state-dict file carries no architecture, so ``unet_config`` (the preset's UNet kwargs)
    builds it, on the meta device, and the file's tensors are assigned (no 860M-parameter random
    init); it is built as the first of ``classes``. A directory is loaded with the class its
    ``config.json`` names, which must be one of ``classes``. ``what`` and ``setting`` name the
    part and the config key in errors.
    """
    import diffusers

    file = Path(pretrained).expanduser()
    expected = (f"a {classes[0]} state-dict file (.bin/.pt/.safetensors) of the preset's UNet config, "
                "or a diffusers UNet directory")
    if file.is_file() or file.suffix in STATE_DICT_SUFFIXES:
        if not unet_config:
            raise WeightsError(f"{file} is a UNet state-dict file, which needs the preset's UNet config to build "
                               f"{what}: set it, or give a diffusers dir in {setting}")
        with torch.device("meta"):
            unet = getattr(diffusers, classes[0])(**dict(unet_config))
        load_state_dict_file(unet, file, what=what, expected=expected)
        log.info("%s loaded from the state-dict file %s", what, file)
        return unet
    path = diffusers_model_dir(str(pretrained), "unet", f"{what} as a diffusers {'/'.join(classes)} directory", setting)
    name = json.loads((path / "config.json").read_text()).get("_class_name", classes[0])
    if name not in classes:
        raise WeightsError(f"{path} holds a {name}; {what} needs one of {', '.join(classes)}")
    try:
        return getattr(diffusers, name).from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"cannot load {what} from {path}: {err}") from err
