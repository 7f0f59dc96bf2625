"""What every stage shares: optimiser specs, warm-up schedules, and checkpoint metadata.

A stage is a ``LightningModule`` that receives *built* modules (dependency injection) and an
:class:`OptimizerSpec`; it never reads a config. Submodule names are a contract with the rest
of onedc (inference, export, the next stage's ``init_from``):

``vae``        the frozen VAE (saved so that a checkpoint is self-contained)
``codec``      the codec: ``HyperpriorCodec``, or the published ``CodingReferenceCodec``
``generator``  the ``OneStepGenerator`` (stages 2-3; ``ReferenceGenerator`` is one)
``distill``    the training-only semantic predictor head (stage 1)
``discriminator`` the GAN critic (stage 3)

The stages drive either codec family through :class:`StageCodec` alone (``codec(x, v)`` giving
``features``/``tokens``/``y_hat``/``z_hat``, through :func:`codec_pass`; ``codec.rate_bits(out)``
from the codec's own rate estimate: :func:`estimated_bpp`), so no stage asks which family it trains.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from onedc.checkpoints import CHECKPOINT_FORMAT
from onedc.modules.coding_tables import fit_cdf_buffers

__all__ = ["CHECKPOINT_FORMAT", "CodecPass", "batch_captions", "batch_images", "ModelIdentity", "OptimizerSpec", "StageCodec", "StageModule",
           "codec_pass", "estimated_bpp", "freeze", "holds_coding_tables", "quadratic_ramp"]


class CodecPass(Protocol):
    """What one codec pass gives the stages (``HyperpriorOutput`` and ``ReferenceCodecOutput`` both do)."""

    y_hat: Tensor     #: quantised y (straight-through in training)
    z_hat: Tensor     #: FSQ codes of z
    semantic: Tensor  #: decoder-side semantic map at 1/64 (the distillation head's input)
    features: Tensor  #: g_s output at 1/8: the generator's input

    @property
    def tokens(self) -> Tensor:
        """(B, L, d) cross-attention tokens of the generator."""


class StageCodec(Protocol):
    """The codec contract of the training stages, implemented by both codec families.

    ``forward(x, v)``: padded image in [-1, 1] and VAE latent -> :class:`CodecPass`; in training
    mode with straight-through rounding and the codec's training rate proxy, in eval mode exactly
    what the files decode to. ``rate_bits(out)``: (B,) estimated bits per image from the codec's
    own rate model (differentiable in training; ``onedc.rate`` uses the same seam):
    ``HyperpriorCodec``'s -log2 likelihoods + flush + z bits, the reference's §4.6 bits + 14 per
    z index. ``update(force)``: make the rANS tables current before a checkpoint is written.
    """

    def __call__(self, x: Tensor, v: Tensor) -> CodecPass: ...

    def rate_bits(self, out: Any) -> Tensor: ...

    def update(self, scale_table_values: Any = None, force: bool = False) -> bool: ...


def batch_images(batch: Tensor | dict[str, Any]) -> Tensor:
    """The (B, 3, H, W) images of a batch: a plain tensor (image folders) or a source batch dict's ``"image"``."""
    return batch["image"] if isinstance(batch, dict) else batch


def batch_captions(batch: Tensor | dict[str, Any]) -> list[str]:
    """The captions of a batch (``""`` per image when its source has none)."""
    if isinstance(batch, dict) and "caption" in batch:
        return list(batch["caption"])
    return [""] * len(batch_images(batch))


def codec_pass(codec: StageCodec, x: Tensor, v: Tensor) -> CodecPass:
    """One codec pass of a stage: ``codec.uncoded_forward(x, v)`` where the codec has it, else ``codec(x, v)``.

    A codec whose exact eval pass runs its entropy coder (the reference's: rANS plus float64
    decisions, 5.2× the time at 512²) offers the same pass without the coder; the stages need
    its features and rate estimate, not the file's last-bit ŷ (the RD evaluation codes real files).
    """
    uncoded = getattr(codec, "uncoded_forward", None)
    return codec(x, v) if uncoded is None else uncoded(x, v)


def estimated_bpp(codec: StageCodec, out: CodecPass, num_pixels: int) -> Tensor:
    """(B,) estimated bits per pixel of a codec pass: ``codec.rate_bits(out) / num_pixels`` (padded pixels)."""
    return codec.rate_bits(out) / num_pixels


def holds_coding_tables(codec: nn.Module) -> bool:
    """Whether ``codec``'s rANS tables are model state (a ``gaussian_conditional`` submodule whose CDF
    buffers are resized by ``update()`` and saved); the reference codec's tables are fixed and never saved."""
    return isinstance(dict(codec.named_children()).get("gaussian_conditional"), nn.Module)


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

    def __init__(self, identity: ModelIdentity) -> None:
        super().__init__()
        self.identity = identity
        self.val_history: list[dict[str, float]] = []
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
        codec = getattr(self, "codec", None)
        if codec is not None and holds_coding_tables(codec):
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_history = list(checkpoint.get("val_history", []))
        # CDF buffers change size with update(): resize ours before Lightning's strict load.
        codec = getattr(self, "codec", None)
        if codec is not None and holds_coding_tables(codec):
            fit_cdf_buffers(codec.gaussian_conditional, "codec.gaussian_conditional", checkpoint["state_dict"])
