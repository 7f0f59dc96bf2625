"""What the TensorBoard-logging callbacks share: finding the logger and a fixed set of validation images."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor


def tensorboard_logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, or None when it logs elsewhere (the callbacks then do nothing)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def first_validation_images(trainer: pl.Trainer, count: int) -> Tensor | None:
    """The first ``count`` images (B, 3, H, W) on the CPU of the run's validation loader, None without one.

    The same images every call (the validation loader is not shuffled), drawn without touching the
    training run's random state.
    """
    datamodule = getattr(trainer, "datamodule", None)
    loaders: Any = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        return None
    images: list[Tensor] = []
    # Iterating a DataLoader draws its base seed from the global RNG: fork it, so logging
    # images does not change the training run's random crops.
    with torch.random.fork_rng(devices=[]):
        for batch in loaders:
            images.append((batch[0] if isinstance(batch, (list, tuple)) else batch).cpu())
            if sum(len(b) for b in images) >= count:
                break
    return torch.cat(images)[:count] if images else None
