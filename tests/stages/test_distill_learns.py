"""Issue 2's must-show as a test: a 300-step tiny distill run on the embedded sample photos.

Validation token accuracy on the two held-out photos must rise clearly above the majority-code
baseline (always predicting the most frequent validation code), and the estimated bpp must fall
from its value before training. Deterministic: seeded data order, weights and teacher, one thread.
"""
import json

import pytest

from onedc.config import compose
from onedc.pipeline import run


@pytest.mark.slow
def test_300_distill_steps_beat_the_majority_code_and_lower_the_rate(tmp_path):
    result = run(compose(["stage=distill", f"run_dir={tmp_path}", "trainer.logger=none",
                          "trainer.enable_progress_bar=false", "stage.val_every_n_steps=300",
                          "stage.checkpoint_every_n_steps=300"]))[0]
    assert result.global_step == 300
    history = json.loads((result.run_dir / "val_history.json").read_text())
    start, end = history[0], history[-1]
    assert (start["step"], end["step"]) == (0, 300)
    assert end["token_acc"] > 1.5 * end["majority_acc"], end
    assert end["token_acc"] > 2 * start["token_acc"], (start, end)
    assert end["bpp"] < 0.2 * start["bpp"], (start, end)
