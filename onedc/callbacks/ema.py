"""Exponential moving average of chosen submodules' trainable weights (the generator's, usually).

Lightning's ``WeightAveraging``/``EMAWeightAveraging`` average the *whole* LightningModule:
a second copy of the frozen VAE, codec and (under LoRA) the frozen base UNet, plus averaged
buffers, which breaks on the codec's CDF tables (their size changes with ``update()``). This
callback keeps the same contract on a chosen part only:

* after every optimiser step: ``ema = d·ema + (1-d)·w`` over the *trainable* parameters of the
  named submodules, with the usual warm-up ``d = min(decay, (1+n)/(10+n))`` (diffusers'
  ``EMAModel``) so short runs are not dominated by the initial weights;
* validation runs on the EMA weights (swapped in and back);
* every full checkpoint stores the EMA weights in ``state_dict`` (what ``init_from``, inference
  and the next stage read) and the raw training weights under ``checkpoint["ema"]``, from which
  resume restores both;
* at the end of fit the EMA weights are copied into the module, so the weights-only
  ``final.ckpt`` the pipeline writes afterwards holds them.

Sharded parameters (DeepSpeed ZeRO-3) cannot be averaged locally: the callback refuses them.
"""
from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from onedc.errors import ConfigError


class EMACallback(Callback):
    """EMA of the trainable parameters of ``modules`` (attribute names of the LightningModule).

    Args:
        decay: the long-run EMA decay (e.g. 0.999).
        modules: submodule names whose trainable parameters are averaged.
        warmup: use the ``(1+n)/(10+n)`` decay warm-up.
    """

    def __init__(self, decay: float = 0.999, modules: Sequence[str] = ("generator",), warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.modules = tuple(modules)
        self.warmup = warmup
        self.shadow: dict[str, Tensor] | None = None
        self.updates = 0
        self._last_step = -1
        self._swapped = False

    @property
    def state_key(self) -> str:
        return f"EMACallback{{modules={','.join(self.modules)}}}"

    # ------------------------------------------------------------------ helpers
    def tracked(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The averaged parameters, keyed by their name in the module's ``state_dict``."""
        params: dict[str, nn.Parameter] = {}
        for name in self.modules:
            for key, param in getattr(pl_module, name).named_parameters():
                if param.requires_grad:
                    params[f"{name}.{key}"] = param
        return params

    def current_decay(self) -> float:
        """The decay applied at the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def _swap(self, pl_module: nn.Module) -> None:
        assert self.shadow is not None
        for key, param in self.tracked(pl_module).items():
            tmp = param.detach().clone()
            param.copy_(self.shadow[key])
            self.shadow[key].copy_(tmp)
        self._swapped = not self._swapped

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.shadow is not None:
            return
        params = self.tracked(pl_module)
        if any(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()):
            raise ConfigError("the EMA callback cannot average ZeRO-3-sharded parameters: use "
                              "trainer=deepspeed_stage_2 (or ddp), or disable the EMA (stage.ema_decay=null)")
        if not params:
            raise ConfigError(f"EMA: no trainable parameters in {', '.join(self.modules)}")
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # (resumed) step count: no update before the next step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimiser steps: with gradient accumulation, update once per step.
        if trainer.global_step == self._last_step or self.shadow is None:
            return
        self._last_step = trainer.global_step
        weight = 1.0 - self.current_decay()
        for key, param in self.tracked(pl_module).items():
            self.shadow[key].lerp_(param.detach().to(self.shadow[key].dtype), weight)
        self.updates += 1

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.shadow is not None and trainer.state.fn == "fit" and not self._swapped:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    @torch.no_grad()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.shadow is None:
            return
        if self._swapped:
            self._swap(pl_module)
        for key, param in self.tracked(pl_module).items():
            param.copy_(self.shadow[key])

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.shadow is None:
            return
        state = checkpoint["state_dict"]
        training: dict[str, Tensor] = {}
        for key, value in self.shadow.items():
            # While swapped (mid-validation) the module holds the EMA and the shadow the raw weights.
            ema, raw = (state[key], value) if self._swapped else (value, state[key])
            training[key] = raw.detach().clone()
            state[key] = ema.detach().clone()
        checkpoint["ema"] = {"training_weights": training, "updates": self.updates, "decay": self.decay}

    @torch.no_grad()
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # The module was just loaded from state_dict, i.e. with the EMA weights: take those as the
        # shadow and put the raw training weights back into the module.
        if trainer.state.fn != "fit":
            return  # validate/test/predict from a checkpoint: keep its (EMA) state_dict weights
        params = self.tracked(pl_module)
        self.shadow = {k: p.detach().clone() for k, p in params.items()}
        saved = checkpoint.get("ema")
        if saved is None:
            return  # a checkpoint without EMA: average from its weights on
        for key, param in params.items():
            if key in saved["training_weights"]:
                param.copy_(saved["training_weights"][key])
        self.updates = int(saved["updates"])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", self.updates))
