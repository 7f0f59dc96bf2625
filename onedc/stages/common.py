"""What every stage shares: optimiser specs, warm-up schedules, and checkpoint metadata.

A stage is a ``LightningModule`` that receives *built* modules (dependency injection) and an
:class:`OptimizerSpec`; it never reads a config. Submodule names are a contract with the rest
of onedc (inference, export, the next stage's ``init_from``):

``vae``        the frozen VAE (saved unless a file holds it: trainable-only checkpoints below)
``codec``      the codec of the model's family (:mod:`onedc.families`)
``generator``  the ``OneStepGenerator`` (stages 2-3; ``ReferenceGenerator`` is one)
``distill``    the training-only semantic predictor head (stage 1)
``discriminator`` the GAN critic (stage 3)

Every stage receives the model's family (:class:`~onedc.families.ModelFamily`) and drives the
codec through it alone: ``family.codec_pass(codec, x, v)`` gives ``features``/``tokens``/``y_hat``/
``z_hat`` (:class:`~onedc.families.CodecPass`), ``family.rate_bits`` the codec's own rate estimate
(:func:`estimated_bpp`), ``family.idle_parts`` what gets no gradient, and the family says whether
the codec's rANS tables are model state. No stage asks which family it trains.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from onedc.coding.checkpoints import CHECKPOINT_FORMAT, source_identity, tensors_hash
from onedc.errors import CheckpointError, ConfigError
from onedc.families import CodecPass, ModelFamily

__all__ = ["CHECKPOINT_FORMAT", "ModelIdentity", "OptimizerSpec", "StageModule", "WARMUP_STARTS", "batch_captions",
           "batch_images", "estimated_bpp", "freeze", "frozen_parts", "quadratic_ramp", "tensors_hash", "warmup_factor"]


def batch_images(batch: Tensor | dict[str, Any]) -> Tensor:
    """The (B, 3, H, W) images of a batch: a plain tensor (image folders) or a source batch dict's ``"image"``."""
    return batch["image"] if isinstance(batch, dict) else batch


def batch_captions(batch: Tensor | dict[str, Any]) -> list[str]:
    """The captions of a batch (``""`` per image when its source has none)."""
    if isinstance(batch, dict) and "caption" in batch:
        return list(batch["caption"])
    return [""] * len(batch_images(batch))


def estimated_bpp(family: ModelFamily, codec: nn.Module, out: CodecPass, num_pixels: int) -> Tensor:
    """(B,) estimated bits per pixel of a codec pass: ``family.rate_bits(codec, out) / num_pixels`` (padded pixels)."""
    return family.rate_bits(codec, out) / num_pixels


WARMUP_STARTS = ("first", "zero")


def warmup_factor(step: int, warmup_steps: int, start: str = "first") -> float:
    """The lr multiplier at optimiser step ``step`` (0-based) of a linear warm-up, then constant.

    ``start="first"`` (onedc's): ``min(1, (step + 1) / warmup_steps)``, so the first update already
    uses 1/warmup_steps of the lr and step ``warmup_steps − 1`` the full lr. ``start="zero"``:
    ``min(1, step / warmup_steps)``, diffusers' ``get_scheduler("constant_with_warmup")`` (the
    authors' schedule, docs/reference-model.md §10.1), whose step 0 has lr 0 (an AdamW step that
    moves nothing, weight decay included, but fills the moment estimates) and whose full lr
    comes at step ``warmup_steps``. ``warmup_steps`` ≤ 0: 1 everywhere.
    """
    if start not in WARMUP_STARTS:
        raise ValueError(f"warm-up start must be one of {', '.join(WARMUP_STARTS)}, got {start!r}")
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + (1 if start == "first" else 0)) / warmup_steps)


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW with linear warm-up (the reference recipe: betas (0.9, 0.999), wd 0.01).

    ``warmup_start``: ``first`` (onedc's, lr/warmup_steps at step 0) or ``zero`` (diffusers'
    ``constant_with_warmup``: lr 0 at step 0); see :func:`warmup_factor`.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    warmup_start: str = "first"

    def __post_init__(self) -> None:
        if self.warmup_start not in WARMUP_STARTS:
            raise ConfigError(f"warmup_start must be one of {', '.join(WARMUP_STARTS)}, got {self.warmup_start!r}")

    def build(self, params: Iterable[nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer:
        """An AdamW over ``params`` (tensors or parameter-group dicts)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    def lr_lambda(self) -> Callable[[int], float]:
        """The per-step lr multiplier of this spec (for a ``LambdaLR`` with one lambda per parameter group)."""
        warmup, start = int(self.warmup_steps), self.warmup_start
        return lambda step: warmup_factor(step, warmup, start)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Lightning scheduler dict: linear warm-up over ``warmup_steps`` optimiser steps, then flat."""
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda())
        return {"scheduler": schedule, "interval": "step", "frequency": 1}


def quadratic_ramp(step: int, target: float, ramp_steps: int, start: float = 0.0, step0: str = "ramp") -> float:
    """``start + (target − start)·min(1, step / ramp_steps)²``: the reference λ warm-up.

    The authors' ramp (docs/reference-model.md §10.1) starts at ``start`` = 1e-4 and applies only for
    0 < step ≤ ramp_steps: at step 0 their code uses the final λ (``step0="final"``, their quirk);
    ``step0="ramp"`` evaluates the ramp at 0 too (= ``start``).
    """
    if step0 not in ("ramp", "final"):
        raise ValueError(f"step0 must be 'ramp' or 'final', got {step0!r}")
    if ramp_steps <= 0 or (step == 0 and step0 == "final"):
        return float(target)
    return float(start) + (float(target) - float(start)) * min(1.0, step / ramp_steps) ** 2


def frozen_parts(module: nn.Module) -> dict[str, list[str]]:
    """Top-level part -> state-dict keys of its frozen parameters (``requires_grad`` False), sorted."""
    parts: dict[str, list[str]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            parts.setdefault(name.split(".", 1)[0], []).append(name)
    return {part: sorted(keys) for part, keys in sorted(parts.items())}


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
    """Base of the stage LightningModules: checkpoint metadata, coding-table upkeep, and a
    validation history (``val_history``: one dict of epoch-mean metrics per validation run,
    the step-0 sanity pass included) that survives resume and ends in a first-vs-last summary.
    """

    summary_keys: tuple[str, ...] = ("loss",)

    def stage_callbacks(self) -> list[pl.Callback]:
        """Callbacks this stage needs (EMA, image grids); none by default.

        Not Lightning's ``configure_callbacks``: the pipeline merges them into the one ordered
        list of :func:`onedc.callbacks.training_callbacks`, where their place is checked.
        """
        return []

    def __init__(self, identity: ModelIdentity, family: ModelFamily) -> None:
        super().__init__()
        self.identity = identity
        self.family = family
        self.val_history: list[dict[str, float]] = []
        # Trainable-only checkpoints (set by the pipeline from trainer.trainable_only_checkpoints, the default):
        # the frozen parameters of every part that has a file source (frozen_sources: part -> "KIND:LOCATION",
        # e.g. "init_from:/abs/final.ckpt", "model.vae.pretrained:asset:tiny_vae") are left out of every
        # checkpoint and named by identity; parts drawn from a seed have no source and stay in the file.
        self.trainable_only = False
        self.frozen_sources: dict[str, str] = {}
        self._frozen_identity: dict[str, dict[str, Any]] | None = None
        self._val_sums: dict[str, float] = {}
        self._val_count = 0

    # ------------------------------------------------------------- validation history
    def record_val(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Accumulate batch metrics for this validation run (sanity pass included)."""
        for key, value in metrics.items():
            self._val_sums[key] = self._val_sums.get(key, 0.0) + float(value.detach()) * batch_size
        self._val_count += batch_size

    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_count = {}, 0

    def on_validation_epoch_end(self) -> None:
        if not self._val_count:
            return
        sums = torch.tensor(list(self._val_sums.values()) + [float(self._val_count)], device=self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self.trainer.world_size > 1 else sums
        entry = {k: float(v) / float(sums[-1]) for k, v in zip(self._val_sums, sums[:-1].tolist())}
        entry["step"] = int(self.global_step)
        self.val_history.append(entry)

    def summary(self) -> str:
        """One line: each summary metric at the first and the last validation."""
        if not self.val_history:
            return "no validation ran"
        first, last = self.val_history[0], self.val_history[-1]
        parts = [f"{k} {first[k]:.4f} -> {last[k]:.4f}" for k in self.summary_keys if k in first and k in last]
        return f"val (step {first['step']} -> {last['step']}): " + "; ".join(parts)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            logging.getLogger("onedc").info("%s %s", self.identity.stage, self.summary())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The rANS tables must be current in every checkpoint so that it can compress at once.
        codec = self._codec_with_tables()
        if codec is not None:
            codec.update(force=True)
            prefix = "codec."
            for key, value in codec.state_dict().items():
                if key.startswith("gaussian_conditional."):
                    checkpoint["state_dict"][prefix + key] = value
        checkpoint["val_history"] = list(self.val_history)
        checkpoint["onedc"] = {
            "format": CHECKPOINT_FORMAT,
            "stage": self.identity.stage,
            "model": self.identity.model,
            "tokenizer": self.identity.tokenizer,
        }
        # Every checkpoint (last/step/best with optimizer state, and the weights-only final.ckpt) leaves out the
        # frozen parts a file holds; readers put them back (onedc.coding.checkpoints.fill_frozen).
        if self.trainable_only and "state_dict" in checkpoint:
            identity = self.frozen_identity()
            state = checkpoint["state_dict"]
            for part in identity.values():
                for key in part["keys"]:
                    state.pop(key, None)
            if identity:
                checkpoint["onedc"]["frozen"] = copy.deepcopy(identity)

    def set_frozen_sources(self, sources: dict[str, str]) -> None:
        """Name the file source of each frozen part (part -> ``KIND:LOCATION``); parts without one stay in checkpoints."""
        self.frozen_sources = dict(sources)
        self._frozen_identity = None

    def frozen_identity(self) -> dict[str, dict[str, Any]]:
        """Part -> {keys, count, hash, source, source_file} of the frozen parameters of every part with a
        file source (computed once: they never change)."""
        if self._frozen_identity is None:
            params = dict(self.named_parameters())
            self._frozen_identity = {
                part: {"keys": keys, "count": len(keys), "hash": tensors_hash((k, params[k]) for k in keys),
                       "source": self.frozen_sources[part], "source_file": source_identity(self.frozen_sources[part])}
                for part, keys in frozen_parts(self).items() if part in self.frozen_sources}
        return self._frozen_identity

    def restore_frozen(self, checkpoint: dict[str, Any], path: str = "the checkpoint") -> None:
        """Put this module's frozen parameters back into a trainable-only checkpoint's state dict, after
        checking that each part is the one the checkpoint was trained with; CheckpointError (one line) if not."""
        recorded = (checkpoint.get("onedc") or {}).get("frozen")
        if not recorded or "state_dict" not in checkpoint:
            return
        self._frozen_identity = None
        mine = self.frozen_identity()
        for part, want in recorded.items():
            have = mine.get(part)
            if have is None or have["count"] != want["count"] or have["hash"] != want["hash"]:
                found = "no frozen parameters" if have is None else f"{have['count']} with hash {have['hash'][:12]}"
                raise CheckpointError(
                    f"{path} stores only trained weights and names its frozen part '{part}.' by identity "
                    f"({want['count']} tensors, hash {want['hash'][:12]}, from {want['source']}), but this run built "
                    f"{found}: give the source it was trained with (the init_from file, pretrained dir or file)")
        params = dict(self.named_parameters())
        for part in recorded:
            for key in mine[part]["keys"]:
                checkpoint["state_dict"][key] = params[key].detach()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore_frozen(checkpoint)
        self.val_history = list(checkpoint.get("val_history", []))
        # CDF buffers change size with update(): resize ours before Lightning's strict load.
        codec = self._codec_with_tables()
        if codec is not None:
            self.family.fit_init_state(codec, "codec.", checkpoint["state_dict"])

    def _codec_with_tables(self) -> nn.Module | None:
        """The codec when its rANS tables are model state (its family saves them), else None."""
        codec = self._modules.get("codec")
        return codec if codec is not None and self.family.saves_coding_tables else None
