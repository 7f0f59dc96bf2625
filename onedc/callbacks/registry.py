"""The one list of a training run's callbacks, in the order Lightning must run them.

Lightning calls the callbacks of one hook in list order. Two of ours meet in
``on_validation_epoch_end``: :class:`~onedc.callbacks.rd_eval.RDEvalCallback` codes real files
with the weights validation used, and :class:`~onedc.callbacks.ema.EMACallback` swaps the raw
training weights back in that same hook. The RD evaluation must therefore come first, or it
would score the raw weights instead of the EMA ones. :func:`training_callbacks` builds the list
in that order and :func:`check_order` refuses any other (docs/architecture.md, "Callbacks").
"""
from __future__ import annotations

from typing import Sequence

from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from onedc.callbacks.ema import EMACallback
from onedc.callbacks.rd_eval import RDEvalCallback
from onedc.callbacks.rng import RNGStateCallback


def training_callbacks(stage_callbacks: Sequence[Callback], *, checkpoints: Sequence[Callback] = (),
                       tensorboard: bool = False, rd_eval_images: int = 4,
                       extra: Sequence[Callback] = ()) -> list[Callback]:
    """Every callback of one stage's Trainer: ``checkpoints``, RNG state, [LR monitor, RD
    evaluation: TensorBoard runs only], the stage's own (EMA, image grids), then ``extra``.

    ``stage_callbacks`` come from :meth:`onedc.stages.common.StageModule.stage_callbacks`;
    Lightning moves ``ModelCheckpoint``s to the end of the list whatever their place here.
    """
    callbacks: list[Callback] = [*checkpoints, RNGStateCallback()]
    if tensorboard:
        callbacks += [LearningRateMonitor(logging_interval="step"), RDEvalCallback(max_images=int(rd_eval_images))]
    callbacks += [*stage_callbacks, *extra]
    check_order(callbacks)
    return callbacks


def check_order(callbacks: Sequence[Callback]) -> None:
    """Raise ``ValueError`` when an RD evaluation would run after an EMA callback (see the module docstring)."""
    rd_eval = [i for i, c in enumerate(callbacks) if isinstance(c, RDEvalCallback)]
    ema = [i for i, c in enumerate(callbacks) if isinstance(c, EMACallback)]
    if rd_eval and ema and max(rd_eval) > min(ema):
        raise ValueError("RDEvalCallback must come before EMACallback: in on_validation_epoch_end the EMA swaps the "
                         "raw weights back, and the RD evaluation must score the weights validation scored")
