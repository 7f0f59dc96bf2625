"""Helpers for running train.py as a user would (subprocesses), shared by the pipeline tests."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Small, fast runs: no logger, no progress bar, frequent checkpoints.
FAST = ["trainer.logger=none", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128",
        "stage.distill.val_every_n_steps=4", "stage.distill.checkpoint_every_n_steps=2",
        "stage.latent.val_every_n_steps=10", "stage.latent.checkpoint_every_n_steps=2",
        "stage.finetune.val_every_n_steps=4", "stage.finetune.checkpoint_every_n_steps=2"]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def run_train(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(train_cmd(*overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
