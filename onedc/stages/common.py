"""What every stage shares: optimiser specs, warm-up schedules, and checkpoint metadata.

A stage is a ``LightningModule`` that receives *built* modules (dependency injection) and an
:class:`OptimizerSpec`; it never reads a config. Submodule names are a contract with the rest
of onedc (inference, export, the next stage's ``init_from``):

``vae``        the frozen VAE (saved so that a checkpoint is self-contained)
``codec``      the ``HyperpriorCodec``
``generator``  the ``OneStepGenerator`` (stages 2-3)
``distill``    the training-only semantic predictor head (stage 1)
``discriminator`` the GAN critic (stage 3)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from torch import nn

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with linear warm-up (the reference recipe: betas (0.9, 0.999), wd 0.01)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0

    def build(self, params: Iterable[nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer:
        """An AdamW over ``params`` (tensors or parameter-group dicts)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Lightning scheduler dict: linear warm-up over ``warmup_steps`` optimiser steps, then flat."""
        warmup = max(1, int(self.warmup_steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"scheduler": schedule, "interval": "step", "frequency": 1}


def quadratic_ramp(step: int, target: float, ramp_steps: int) -> float:
    """``target * min(1, step / ramp_steps)**2``: the reference λ warm-up."""
    if ramp_steps <= 0:
        return float(target)
    return float(target) * min(1.0, step / ramp_steps) ** 2


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a module explicitly: eval mode and no gradients (kept out of optimisers)."""
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class ModelIdentity:
    """What a checkpoint records about the model that produced it (checked on load)."""

    model: dict  # the model config (architecture + weight sources) that builds vae/codec/generator
    tokenizer: dict = field(default_factory=dict)  # teacher name + identity (stage 1)
    stage: str = ""


class StageModule(pl.LightningModule):
    """Base of the stage LightningModules: checkpoint metadata and coding-table upkeep."""

    def __init__(self, identity: ModelIdentity) -> None:
        super().__init__()
        self.identity = identity

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The rANS tables must be current in every checkpoint so that it can compress at once.
        codec = getattr(self, "codec", None)
        if codec is not None:
            codec.update(force=True)
            prefix = "codec."
            for key, value in codec.state_dict().items():
                if key.startswith("gaussian_conditional."):
                    checkpoint["state_dict"][prefix + key] = value
        checkpoint["onedc"] = {
            "format": CHECKPOINT_FORMAT,
            "stage": self.identity.stage,
            "model": self.identity.model,
            "tokenizer": self.identity.tokenizer,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # CDF buffers change size with update(): resize ours before Lightning's strict load.
        codec = getattr(self, "codec", None)
        if codec is not None:
            from compressai.models.utils import update_registered_buffers

            update_registered_buffers(
                codec.gaussian_conditional, "codec.gaussian_conditional",
                ["_quantized_cdf", "_offset", "_cdf_length", "scale_table"], checkpoint["state_dict"],
            )
