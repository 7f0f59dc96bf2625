"""Training runs that several test files share, built once per test session even across xdist workers.

``make test`` runs pytest with one worker per core (pytest-xdist); a session fixture there is
built once per *worker*. :func:`shared_run` builds it once per *session*: the first worker that
asks trains it in a folder under the session's common temp dir while holding a file lock, and
every other caller waits and reuses the result (the pattern of pytest-xdist's docs). Without
xdist it is a plain session-level cache in the session's temp dir.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from filelock import FileLock


def shared_run(tmp_path_factory, name: str, make: Callable[[Path], Path]) -> Path:
    """The path ``make(folder)`` returns, computed once per test session under the name ``name``."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by its workers
    folder = root / f"shared-{name}"
    result = folder / "RESULT"
    with FileLock(str(root / f"shared-{name}.lock")):
        if result.is_file():
            return Path(result.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        made = Path(make(folder))
        result.write_text(str(made))
        return made


SHORT_DISTILL_STEPS = 120


def short_distill_run(run_dir: Path, overrides: list[str] = ()) -> Path:
    """final.ckpt of the 120-step distill run of the embedded default on 2 x 128 px crops.

    The run behind the end-to-end PSNR and file-rate tests (the ``short_distill_ckpt`` fixture);
    ``benchmarks/learning_spread.py`` runs it under other kernels and seeds (``overrides``).
    """
    from onedc.training import pipeline
    from onedc.training.config import compose

    steps = SHORT_DISTILL_STEPS
    cfg = compose(["stage=distill", f"run_dir={run_dir}", f"trainer.max_steps={steps}", "data.crop_size=128",
                   "trainer.logger=none", "trainer.enable_progress_bar=false", f"stage.val_every_n_steps={steps}",
                   f"stage.checkpoint_every_n_steps={steps}", *overrides])
    return pipeline.run(cfg)[0].final_ckpt
