"""A shuffled, rank-sharded sample order that resumes exactly, and the loader Lightning resumes.

Kept apart from the data module because it is the one piece whose behaviour is a contract
with checkpoints: a run resumed at global step ``k`` must see the batches an uninterrupted
run would.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, rank-sharded sample order that is a pure function of (seed, batches consumed).

    Epoch ``e`` visits a permutation drawn from ``seed`` and ``e``; rank ``r`` of ``w`` takes
    every ``w``-th entry (truncated so all ranks get the same number of full batches). Each key
    is ``(index, crop_seed)`` so that crops do not depend on a global RNG either. Built with
    ``start_batch`` (batches already consumed by this rank), the first pass skips ahead: a run
    resumed at global step ``k`` sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, length: int, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = max(1, (length // world_size) // batch_size)
        self.epoch, self._skip = divmod(start_batch, self.batches_per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def _key(self, *parts: int) -> int:
        value = self.seed
        for part in parts:
            value = (value * 1_000_003 + part) % (2**62)
        return value

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self._key(self.epoch)))
        shard = order[self.rank :: self.world_size][: len(self)].tolist()
        start = self._skip * self.batch_size
        epoch, self._skip = self.epoch, 0
        self.epoch += 1
        for position in range(start, len(shard)):
            yield shard[position], self._key(epoch, position, self.rank)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable (it has ``state_dict``).

    The position is not stored in the loader state: :class:`ResumableSampler` derives it from
    the restored global step when the loader is built, which is exact even though Lightning
    prefetches a batch ahead of the one being trained on.
    """

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        return {"order": "onedc-resumable-v1", "seed": getattr(sampler, "seed", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        if state.get("seed") not in (None, getattr(sampler, "seed", None)):
            rank_zero_warn(f"resuming with data seed {getattr(sampler, 'seed', None)} but the checkpoint "
                           f"used {state.get('seed')}: the sample order differs from the interrupted run")
