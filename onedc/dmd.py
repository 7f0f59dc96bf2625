"""The public DMD2 guidance API under its stable import path: ``from onedc.dmd import DMDGuidance``.

The guidance model lives in :mod:`onedc.modules.guidance` (pure torch) and the reading of the
authors' stage-II ``model_2.safetensors`` in :mod:`onedc.families.reference.released` (the one
home of released-file conversions); this module joins the two for users and acceptance checks::

    g = DMDGuidance.from_released("model_2.safetensors")
    loss, grad = g.distribution_matching_loss(latents, text_embedding, uncond_embedding, timesteps=t, noise=n)
    loss_fake = g.fake_denoising_loss(latents, text_embedding, timesteps=t, noise=n)
    logits = g.realism_logits(latents, text_embedding, timesteps=t, noise=n)

onedc's own code imports the two modules directly (``tests/test_layers.py`` checks that nothing
inside the package imports this one).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from onedc.families.reference.released import load_released_guidance
from onedc.modules.guidance import DMLoss, build_guidance
from onedc.modules.guidance import DMDGuidance as _GuidanceModel

__all__ = ["DMDGuidance", "DMLoss", "build_guidance"]


class DMDGuidance(_GuidanceModel):
    """:class:`onedc.modules.guidance.DMDGuidance` with a constructor from the authors' released file."""

    @classmethod
    def from_released(cls, path: str | Path, *, real_dtype: torch.dtype = torch.float32,
                      unet_config: Mapping[str, Any] | None = None) -> "DMDGuidance":
        """The guidance model of the authors' stage-II ``model_2.safetensors`` (float32 by default).

        bf16 ``real_unet`` tensors are upcast, ``dummy_network.*`` ignored, a ``module.`` prefix
        accepted; the SD-1.5 UNets are built from the published config (``unet_config``: another
        UNet layout, e.g. a small one in tests). A file that does not fit raises one
        :class:`onedc.errors.WeightsError` line.
        """
        return load_released_guidance(path, module_class=cls, real_dtype=real_dtype, unet_config=unet_config)
