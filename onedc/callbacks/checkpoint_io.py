"""Atomic checkpoint writes: a kill during a save never leaves a truncated ``.ckpt`` behind."""
from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from onedc.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but written to a temp file, fsync'ed, then renamed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))
