"""Lightning overhead benchmark: a distill-stage training step inside ``Trainer.fit`` vs a bare loop.

::

    Trainer(max_steps=N, logger off, progress bar off, no checkpoints, no validation,
            gradient_clip_val=stage.grad_clip).fit(module)
      step k:   Lightning's own iteration (fetch, hooks, training_step with its self.log calls,
                backward, clipping, AdamW + scheduler step)          -> time between batch starts
                minus the bare step below
      then, from on_train_batch_end: ONE bare step on the same module and batch
                loss = module._step(batch)["loss"]; zero_grad; backward; clip_grad_norm_;
                optimizer.step(); scheduler.step()                       -> timed on its own

The two loops are interleaved step by step, so machine-load drift (this runs on shared 2-core
boxes) hits both alike and the ratio of the median step times is stable where separate runs are
not. Both use the same module, the same batch (a ``DataLoader`` yielding the same tensor, no
collation), AdamW + warm-up schedules built by ``module.configure_optimizers()`` (one for each
loop) and the same gradient clipping. The first ``--warmup`` steps are dropped.

A second fit repeats the measurement with the module's ``self.log`` / ``self.log_dict`` made
no-ops, which shows how much of the overhead is Lightning's per-call logging bookkeeping
(``_ResultCollection.log`` moves its result object to the value's device on every call).

Usage: ``python benchmarks/lightning_overhead.py [--steps 40] [--warmup 5] [--threads 1] [KEY=VALUE ...]``
(the tiny preset on the CPU; extra arguments are config overrides). ``--log-every N`` sets the
Trainer's ``log_every_n_steps`` (default: the stage's).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class RepeatBatch(Dataset):
    """``length`` times the same batch; use with ``batch_size=None`` (no collation)."""

    def __init__(self, batch: torch.Tensor, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batch


class BareStep:
    """One plain-PyTorch training step of ``module`` on ``batch`` with its own optimiser and schedule."""

    def __init__(self, module: Any, batch: torch.Tensor, clip: float | None) -> None:
        config = module.configure_optimizers()
        self.optimizer, self.scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.module, self.batch, self.clip = module, batch, clip

    def __call__(self) -> None:
        loss = self.module._step(self.batch)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()


def interleaved_fit(module: Any, batch: torch.Tensor, steps: int, clip: float | None,
                    log_every: int) -> tuple[list[float], list[float]]:
    """(Lightning step seconds, bare step seconds): ``steps`` of each, interleaved step by step."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    bare = BareStep(module, batch, clip)
    lightning_t: list[float] = []
    bare_t: list[float] = []

    class Interleave(Callback):
        last_start: float | None = None
        inserted = 0.0  # time of the bare step (and this hook) inside the current Lightning interval

        def on_train_batch_start(self, *args: Any) -> None:
            now = time.perf_counter()
            if self.last_start is not None:
                lightning_t.append(now - self.last_start - self.inserted)
            self.last_start, self.inserted = now, 0.0

        def on_train_batch_end(self, *args: Any) -> None:
            enter = time.perf_counter()
            bare()
            done = time.perf_counter()
            bare_t.append(done - enter)
            self.inserted = time.perf_counter() - enter

    loader = DataLoader(RepeatBatch(batch, steps + 1), batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps + 1, max_epochs=-1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=clip,
                         log_every_n_steps=log_every, callbacks=[Interleave()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no val loader", "few batches", ...: not what is measured
        trainer.fit(module, train_dataloaders=loader)
    return lightning_t, bare_t[: len(lightning_t)]


def report(name: str, lightning_t: list[float], bare_t: list[float]) -> float:
    """Print one comparison line; return the ratio of the medians."""
    lm, bm = statistics.median(lightning_t), statistics.median(bare_t)
    pairs = statistics.median(a / b for a, b in zip(lightning_t, bare_t))
    print(f"{name:<28} {1e3 * lm:>9.1f} {1e3 * bm:>9.1f} {lm / bm:>7.3f} {pairs:>10.3f} {1e3 * (lm - bm):>+9.1f}"
          f" {len(lightning_t):>6}")
    return lm / bm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each loop per fit")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each fit")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--log-every", type=int, default=None, help="Trainer log_every_n_steps (default: the stage's)")
    parser.add_argument("overrides", nargs="*", help="config overrides (default: stage=distill, the tiny preset)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import lightning.pytorch as pl

    from onedc.training.build import build_datamodule, build_stage
    from onedc.training.config import compose

    cfg = compose(["stage=distill", *args.overrides])
    pl.seed_everything(int(cfg.seed), verbose=False)
    module = build_stage(cfg, cfg.stage)
    datamodule = build_datamodule(cfg.data, seed=int(cfg.seed))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = batch[0] if isinstance(batch, (list, tuple)) else batch
    clip = cfg.stage.get("grad_clip")
    log_every = int(args.log_every or cfg.stage.log_every_n_steps)
    total = args.steps + args.warmup

    print(f"lightning overhead benchmark: stage=distill, model={cfg.model.name}, tokenizer={cfg.tokenizer.name}, "
          f"batch {tuple(batch.shape)}, {torch.get_num_threads()} thread(s), {args.steps} steps per loop "
          f"interleaved step by step (first {args.warmup} dropped), log_every_n_steps={log_every}")
    print(f"{'variant':<28} {'Lit. ms':>9} {'bare ms':>9} {'ratio':>7} {'pair ratio':>10} {'+ms/step':>9} {'steps':>6}")
    lightning_t, bare_t = interleaved_fit(module, batch, total, clip, log_every)
    ratio = report("as configured", lightning_t[args.warmup:], bare_t[args.warmup:])
    module.log = module.log_dict = lambda *a, **k: None  # instance attributes shadow the methods
    try:
        lightning_t, bare_t = interleaved_fit(module, batch, total, clip, log_every)
    finally:
        del module.log, module.log_dict
    report("self.log / log_dict no-ops", lightning_t[args.warmup:], bare_t[args.warmup:])
    print(f"ratio lightning / bare: {ratio:.3f} (median step times; 'pair ratio' = median of per-step ratios)")


if __name__ == "__main__":
    main()
