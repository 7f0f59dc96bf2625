"""TensorBoard image grids (original | decoded) of a fixed validation batch, every N steps.

The stage provides the decoding through a ``reconstruct(x) -> x_hat`` method (images in
[-1, 1]); the callback owns when and where: the same validation images every time, so the grids
of successive steps are comparable, and only when the run logs to TensorBoard.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from onedc.callbacks.tensorboard import first_validation_images, tensorboard_logger

__all__ = ["ImageGridCallback", "first_validation_images", "image_grid"]


def image_grid(original: Tensor, decoded: Tensor) -> Tensor:
    """(B,3,H,W) pairs in [-1,1] -> one (3, H', W') grid in [0,1], a row per image: original | decoded."""
    from torchvision.utils import make_grid

    pairs = torch.stack([original, decoded], dim=1).flatten(0, 1)  # o0, d0, o1, d1, ...
    return make_grid(((pairs.float() + 1) / 2).clamp(0, 1), nrow=2, padding=2)


class ImageGridCallback(Callback):
    """Every ``every_n_steps`` optimiser steps, log ``images/reconstruction`` to TensorBoard.

    The grid shows the module's training weights at that step (the EMA, where a stage has one,
    is what validation metrics and ``final.ckpt`` show).

    Args:
        every_n_steps: logging period in optimiser steps.
        num_images: how many images of the first validation batch to show.
        tag: TensorBoard tag of the grid.
    """

    def __init__(self, every_n_steps: int, num_images: int = 4, tag: str = "images/reconstruction") -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.num_images = int(num_images)
        self.tag = tag
        self._batch: Tensor | None = None
        self._last_step = -1

    def _fixed_batch(self, trainer: pl.Trainer) -> Tensor | None:
        if self._batch is None:
            self._batch = first_validation_images(trainer, self.num_images)
        return self._batch

    @torch.no_grad()
    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Decode the fixed batch with ``pl_module.reconstruct`` and log the grid; returns it (or None)."""
        logger = tensorboard_logger(trainer)
        batch = self._fixed_batch(trainer) if logger is not None else None
        if batch is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            decoded = pl_module.reconstruct(batch.to(pl_module.device))
        finally:
            pl_module.train(was_training)
        grid = image_grid(batch, decoded.cpu())
        logger.experiment.add_image(self.tag, grid, global_step=trainer.global_step)
        return grid

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # Every rank decodes (a sharded model needs all ranks in the forward); the logger writes on rank 0 only.
        if step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self.log_grid(trainer, pl_module)
