"""``onedc sweep``: a λ ladder trained and evaluated in one command (tiny: 2 λ values, 2 steps of stage 1)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from onedc.cli import main

FAST = ["model=tiny_random", "trainer.max_steps=2", "data.batch_size=1", "data.crop_size=128",
        "data.val_crop_size=128", "trainer.logger=none", "trainer.enable_progress_bar=false",
        "stage.lmbda_warmup_steps=1"]


@pytest.mark.slow  # two Lightning runs: 285 s on the loaded 2-core machine
def test_sweep_trains_each_lambda_and_evaluates_one_curve(tmp_path, image_dir, no_weights):
    out = tmp_path / "sweep"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["sweep", "--lambdas", "0.5", "64", "-o", str(out), "--stage", "distill", "--data",
                     str(image_dir / "face.png"), "--no-baselines", *FAST])
    assert code == 0, stderr.getvalue()
    for name in ("lmbda_0.5", "lmbda_64"):
        assert (out / name / "distill" / "final.ckpt").exists()
    aggregate = json.loads((out / "eval" / "aggregate.json").read_text())
    assert {e["curve"] for e in aggregate["results"]} == {"sweep:sweep"}
    assert sorted(e["setting"] for e in aggregate["results"]) == ["lmbda_0.5/distill/final", "lmbda_64/distill/final"]
    assert (out / "eval" / "rd.png").exists() and (out / "eval" / "compressai" / "sweep_sweep.json").exists()
