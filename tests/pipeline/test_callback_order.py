"""The run's callbacks come from one list whose order is checked: RD evaluation before the EMA swap."""
from __future__ import annotations

import pytest

from onedc.callbacks import EMACallback, ImageGridCallback, RDEvalCallback, RNGStateCallback, check_order, training_callbacks


def test_rd_evaluation_runs_before_the_ema_swaps_the_raw_weights_back():
    stage = [EMACallback(0.9, modules=("generator",)), ImageGridCallback(5)]
    callbacks = training_callbacks(stage, tensorboard=True, rd_eval_images=2)
    kinds = [type(c) for c in callbacks]
    assert kinds.index(RNGStateCallback) < kinds.index(RDEvalCallback) < kinds.index(EMACallback) < kinds.index(
        ImageGridCallback)
    assert next(c for c in callbacks if isinstance(c, RDEvalCallback)).max_images == 2
    # Without TensorBoard there is nothing to log RD points to: no RD evaluation at all.
    assert not any(isinstance(c, RDEvalCallback) for c in training_callbacks(stage, tensorboard=False))


def test_a_list_with_the_ema_first_is_refused():
    with pytest.raises(ValueError, match="RDEvalCallback must come before EMACallback"):
        check_order([EMACallback(0.9, modules=("generator",)), RDEvalCallback(max_images=1)])
