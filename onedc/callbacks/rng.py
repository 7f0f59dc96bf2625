"""Save and restore every RNG in checkpoints, so a resumed run draws the same random numbers."""
from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


class RNGStateCallback(pl.Callback):
    """Checkpoints the python, numpy, torch (and CUDA) RNG states of this rank.

    Restored at ``on_train_start``, i.e. after the sanity validation pass, which an
    uninterrupted run does not repeat at the resume point.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Plain python values and tensors only: Lightning loads checkpoints with weights_only=True.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        random.setstate(self._pending["python"])
        kind, keys, pos, has_gauss, cached = self._pending["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
        torch.set_rng_state(self._pending["torch"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None
