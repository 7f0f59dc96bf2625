"""Checkpoints of the earlier stages, trained once per session for the later stages' tests.

A real (tiny, few-step) distill run and a latent run initialised from it: what ``init_from``
of the next stage reads in practice.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from onedc.training import pipeline
from onedc.training.config import compose
from shared_runs import shared_run

BASE = ["model=tiny_random", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128", "trainer.logger=none"]
LATENT_CKPT_STEPS = 16


@pytest.fixture(scope="session")
def distill_ckpt(tmp_path_factory) -> Path:
    """final.ckpt of a 2-step distill run."""
    def make(run_dir: Path) -> Path:
        cfg = compose(BASE + ["stage=distill", f"run_dir={run_dir}", "trainer.max_steps=2",
                              "stage.val_every_n_steps=2", "stage.checkpoint_every_n_steps=2"])
        return pipeline.run(cfg)[0].final_ckpt
    return shared_run(tmp_path_factory, "distill-2", make)


@pytest.fixture(scope="session")
def latent_ckpt(distill_ckpt, tmp_path_factory) -> Path:
    """final.ckpt (EMA generator) of a short latent run initialised from :func:`distill_ckpt`."""
    def make(run_dir: Path) -> Path:
        cfg = compose(BASE + ["stage=latent", f"run_dir={run_dir}", f"init_from={distill_ckpt}",
                              f"trainer.max_steps={LATENT_CKPT_STEPS}", f"stage.val_every_n_steps={LATENT_CKPT_STEPS}",
                              f"stage.checkpoint_every_n_steps={LATENT_CKPT_STEPS}", "stage.lr=2e-3",
                              "stage.warmup_steps=1", "stage.ema_decay=0.5", "stage.image_every_n_steps=null"])
        return pipeline.run(cfg)[0].final_ckpt
    return shared_run(tmp_path_factory, f"latent-{LATENT_CKPT_STEPS}", make)


@pytest.fixture
def isolated_distributed(monkeypatch):
    """In-process DeepSpeed tests: no inherited rank variables, one thread, and no process group or
    DeepSpeed group reference left from another test in this worker (before and after)."""
    from deepspeed_cpu import release_distributed

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    # Lightning's distributed strategies set torch's threads to cores/processes unless OMP_NUM_THREADS
    # is set: 2 threads on a shared 2-core box made each step ~7x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    release_distributed()
    yield
    release_distributed()
    # Lightning sets these in os.environ during an in-process DeepSpeed run; monkeypatch restores only the ones it
    # deleted, so drop the rest: a DDP subprocess started later in this worker (tests/pipeline/test_ddp.py)
    # inherited RANK/LOCAL_RANK/NODE_RANK and waited for ranks that never came.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        os.environ.pop(key, None)
