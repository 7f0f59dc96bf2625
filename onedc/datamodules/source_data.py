"""Train on any indexable source (folder, hf, webdataset, streaming) with exact, O(1), elastic resume.

Data flow::

    source (onedc.datamodules.sources): len + [i] -> RawSample(key, image bytes, caption)
      │ GlobalOrderSampler: epoch e's permutation of the train indices (a Feistel bijection, O(1)
      │   memory); global batch g takes the next B*W entries, rank r the r-th B of them;
      │   keys (index, crop seed, mode)
      ▼
    SourceCropDataset: decode ─► fit / authors' protocol ─► crop (+flip), bad sample ─► fallback
      ▼
    collate: {"image": (B, 3, s, s) in [-1, 1], "caption": [str], "key": [str], "bad_keys": [str]}

The sample order is a pure function of (seed, epoch, sample offset): the position at training
step ``k`` follows from a small anchor ``(batch, epoch, offset)`` in O(1), so resuming never
replays an epoch. The anchor, world size and batch size go into the checkpoint (the data
module's ``state_dict``); a run resumed with another number of ranks or another batch size
continues from the exact sample offset where the interrupted run stopped, and a source whose
length changed is refused with one line. DataLoader workers receive whole batches of keys from
the main process, so they can neither overlap nor miss samples whatever their number.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from onedc.datamodules.image_folder import SMALL_IMAGE_POLICIES, _fit_to_crop
from onedc.datamodules.sources import ImageSource, build_source
from onedc.errors import ConfigError, DataError, ImageReadError
from onedc.coding.images import decode_image

__all__ = ["AuthorsCropProtocol", "EpochPermutation", "GlobalOrderSampler", "Position", "SourceCropDataset",
           "SourceDataModule", "collate_samples", "position_after"]

log = logging.getLogger(__name__)

STATE_VERSION = "onedc-source-order-v1"
_FALLBACK_STRIDE = 104_729  # a prime: the fallback chain of a bad sample walks the whole index space


def _mix(*parts: int) -> int:
    """A deterministic 62-bit key of integers (the same on every rank, worker and platform)."""
    value = 0x9E3779B97F4A7C15 & (2**62 - 1)
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**62)
    return value


def _splitmix(value: int) -> int:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


class EpochPermutation:
    """A pseudo-random permutation of ``range(length)`` evaluated one entry at a time, in O(1) memory.

    A 4-round Feistel network on the smallest even number of bits covering ``length``, keyed
    from ``key``, with cycle walking (re-encrypt while the result is out of range; on average
    fewer than 4 rounds trips): a bijection of ``range(length)``. Unlike ``torch.randperm`` it
    needs no O(length) table, so a rank resuming at 10^9 samples computes only the entries it
    serves (``randperm`` of 10M takes ~1 s and 80 MB per rank; of 2B, 16 GB).
    """

    def __init__(self, length: int, key: int) -> None:
        self.length = int(length)
        bits = max(2, (self.length - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_splitmix(key * 4 + r) for r in range(4)]

    def __len__(self) -> int:
        return self.length

    def _encrypt(self, value: int) -> int:
        left, right = value >> self.half, value & self.mask
        for round_key in self.keys:
            left, right = right, left ^ (_splitmix(right ^ round_key) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self.length:
            raise IndexError(position)
        value = self._encrypt(position)
        while value >= self.length:
            value = self._encrypt(value)
        return value


@dataclass(frozen=True)
class Position:
    """Where the sample stream stands: ``batch`` global batches consumed, now at ``offset`` of ``epoch``."""

    batch: int = 0
    epoch: int = 0
    offset: int = 0


def position_after(anchor: Position, batches: int, length: int, global_batch: int) -> Position:
    """The position ``batches`` global batches of ``global_batch`` samples after ``anchor``, in O(1).

    An epoch ends when fewer than ``global_batch`` samples of its permutation are left (they are
    dropped, as ``drop_last`` does); the next epoch starts at offset 0 of a new permutation.
    """
    if batches < 0:
        raise ConfigError(f"cannot move the data order back from batch {anchor.batch} by {-batches}")
    per_epoch = length // global_batch
    if per_epoch < 1:
        raise ConfigError(f"{length} training samples cannot fill one global batch of {global_batch} "
                          "(data.batch_size x ranks): lower data.batch_size or use more data")
    left = max(0, (length - anchor.offset) // global_batch)
    if batches < left:
        return Position(anchor.batch + batches, anchor.epoch, anchor.offset + batches * global_batch)
    rest = batches - left
    return Position(anchor.batch + batches, anchor.epoch + 1 + rest // per_epoch, (rest % per_epoch) * global_batch)


@dataclass(frozen=True)
class AuthorsCropProtocol:
    """The authors' training crops (docs/reference-model.md §10.1), with sizes as parameters.

    Per sample: the short side is resized up to ``size`` when smaller, then a random ``size``²
    crop with a random horizontal flip. Per global batch, one transform for all its samples on
    every rank, drawn from (seed, batch number): resize to ``small`` (p ``p_resize``), random
    ``small``² crop (p ``p_crop``), or keep ``size``² with the batch cut to ``keep_batch``.
    """

    size: int = 1024
    small: int = 512
    p_resize: float = 0.2
    p_crop: float = 0.5
    keep_batch: int = 2

    def mode(self, seed: int, batch: int) -> str:
        """``"resize"``, ``"crop"`` or ``"keep"`` for global batch ``batch`` of a run seeded ``seed``."""
        u = float(torch.rand((), generator=torch.Generator().manual_seed(_mix(seed, batch, 0xC0))))
        return "resize" if u < self.p_resize else "crop" if u < self.p_resize + self.p_crop else "keep"


class GlobalOrderSampler(Sampler[list[tuple[int, int, str]]]):
    """Batches of sample keys for one rank: a pure function of (seed, position), resumable in O(1).

    Epoch ``e`` is an :class:`EpochPermutation` keyed from (seed, e); global batch ``g`` of the epoch is
    entries ``[offset, offset + B*W)`` and rank ``r`` takes the ``r``-th ``B`` of them. Each key is
    ``(index, crop seed, mode)``: the crop seed comes from (seed, epoch, entry), so crops do not
    depend on rank, worker or world size; ``mode`` is the authors' per-batch transform (or
    ``"plain"``). One ``__iter__`` runs to the end of the current epoch; the next continues.
    """

    def __init__(self, length: int, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: Position = Position(), protocol: AuthorsCropProtocol | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of {world_size}")
        self.length, self.batch_size, self.seed = int(length), int(batch_size), int(seed)
        self.rank, self.world_size, self.protocol = int(rank), int(world_size), protocol
        self.global_batch = self.batch_size * self.world_size
        position_after(start, 0, self.length, self.global_batch)  # validates the sizes
        self.position = start

    def __len__(self) -> int:
        return self.length // self.global_batch

    def permutation(self, epoch: int) -> "EpochPermutation":
        """The order of epoch ``epoch`` (identical on every rank): entry ``p`` is ``permutation(epoch)[p]``."""
        return EpochPermutation(self.length, _mix(self.seed, epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int, str]]]:
        pos = self.position
        pos = position_after(pos, 0, self.length, self.global_batch)  # an epoch's dropped tail -> next epoch
        order = self.permutation(pos.epoch)
        while pos.offset + self.global_batch <= self.length:
            first = pos.offset + self.rank * self.batch_size
            mode = "plain" if self.protocol is None else self.protocol.mode(self.seed, pos.batch)
            count = self.protocol.keep_batch if mode == "keep" else self.batch_size
            keys = [(order[first + j], _mix(self.seed, pos.epoch, first + j), mode) for j in range(count)]
            pos = Position(pos.batch + 1, pos.epoch, pos.offset + self.global_batch)
            self.position = pos
            yield keys
        self.position = Position(pos.batch, pos.epoch + 1, 0)


class SourceCropDataset(Dataset[dict[str, Any]]):
    """Decoded, cropped samples of a source by key; a bad sample is replaced deterministically and reported.

    ``indices`` maps dataset positions to source indices (the train or val part of the source).
    A key ``(i, crop_seed, mode)`` (from :class:`GlobalOrderSampler`) gives a random crop +
    flip drawn from ``crop_seed``; a bare int gives the center crop (validation). A sample
    that cannot be decoded, has no image, or is below the crop with ``small_images="skip"`` is
    replaced by position ``(i + k * 104729) % len`` (k = 1, 2, ...; the same on every resume)
    and its key and reason travel in the item's ``bad`` list for the main process to count;
    after ``max_tries`` failures the item's image is None and the batch is short.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int] | range, crop_size: int, *, train: bool,
                 small_images: str = "upscale", protocol: AuthorsCropProtocol | None = None,
                 max_tries: int = 8) -> None:
        self.source, self.indices, self.crop_size, self.train = source, indices, int(crop_size), train
        self.small_images, self.protocol, self.max_tries = small_images, protocol, int(max_tries)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int, str]) -> dict[str, Any]:
        index, crop_seed, mode = (key, 0, "center") if isinstance(key, int) else key
        bad: list[str] = []
        for attempt in range(self.max_tries):
            position = (index + attempt * _FALLBACK_STRIDE) % len(self.indices)
            sample_key = f"#{self.indices[position]}"
            try:
                raw = self.source[self.indices[position]]
                sample_key = raw.key
                if raw.image is None:
                    raise ImageReadError(f"sample {raw.key} has no image")
                image = raw.image if isinstance(raw.image, (bytes, bytearray, memoryview)) else _pil_bytes(raw.image)
                tensor = decode_image(bytes(image), raw.key)
                image_out = self._transform(tensor, crop_seed, mode, raw.key)
            except Exception as exc:  # noqa: BLE001 - any reader/decoder failure is a bad sample
                # The first sentence is the reason; the rest is folder advice (skip_bad) that does not apply here.
                reason = " ".join(str(exc).split()).split(". ")[0].replace(f"cannot read image {sample_key}: ", "")
                bad.append(f"{sample_key} ({reason[:160]})")
                continue
            return {"image": image_out, "caption": raw.caption, "key": raw.key, "bad": bad}
        return {"image": None, "caption": None, "key": None, "bad": bad}

    def _transform(self, image: Tensor, crop_seed: int, mode: str, key: str) -> Tensor:
        generator = torch.Generator().manual_seed(int(crop_seed))
        if mode in ("resize", "crop", "keep"):
            protocol = self.protocol or AuthorsCropProtocol()
            image = _short_side_up_to(image, protocol.size)
            image = _random_crop(image, protocol.size, generator, flip=True)
            if mode == "resize":
                image = F.interpolate(image[None], size=(protocol.small, protocol.small), mode="bicubic",
                                      antialias=True, align_corners=False)[0].clamp_(-1.0, 1.0)
            elif mode == "crop":
                image = _random_crop(image, protocol.small, generator, flip=False)
            return image.contiguous()
        if min(image.shape[-2:]) < self.crop_size:
            if self.small_images == "skip":
                raise ImageReadError(f"sample {key}: short side {min(image.shape[-2:])} px < crop {self.crop_size} px")
            image = _fit_to_crop(image, self.crop_size, self.small_images)
        if mode == "center":
            height, width = image.shape[-2:]
            top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
            return image[:, top: top + self.crop_size, left: left + self.crop_size].contiguous()
        return _random_crop(image, self.crop_size, generator, flip=True).contiguous()


def _pil_bytes(image: Any) -> bytes:
    """Re-encode an already decoded image (a PIL image from an MDS ``pil``/``jpeg`` column) losslessly."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _short_side_up_to(image: Tensor, size: int) -> Tensor:
    height, width = image.shape[-2:]
    if min(height, width) >= size:
        return image
    scale = size / min(height, width)
    out = (max(size, round(height * scale)), max(size, round(width * scale)))
    return F.interpolate(image[None], size=out, mode="bicubic", align_corners=False)[0].clamp_(-1.0, 1.0)


def _random_crop(image: Tensor, size: int, generator: torch.Generator, *, flip: bool) -> Tensor:
    height, width = image.shape[-2:]
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    crop = image[:, top: top + size, left: left + size]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        crop = crop.flip(-1)
    return crop


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable items into ``{"image", "caption", "key", "bad_keys"}`` (captions ``""`` when absent)."""
    good = [it for it in items if it["image"] is not None]
    bad = [k for it in items for k in it["bad"]]
    image = torch.stack([it["image"] for it in good]) if good else torch.empty(0, 3, 0, 0)
    return {"image": image, "caption": [it["caption"] or "" for it in good], "key": [it["key"] for it in good],
            "bad_keys": bad}


class _SourceLoader(DataLoader):
    """A DataLoader Lightning treats as resumable; the position lives in the data module's state."""

    def state_dict(self) -> dict[str, Any]:
        return {"order": STATE_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SourceDataModule(lightning.LightningDataModule):
    """Train (and optional val) crops from any source, batches as dicts with captions.

    ``source`` is ``folder``, ``hf``, ``webdataset`` or ``streaming`` (the other keys of the data
    config are the source's, see :func:`onedc.datamodules.sources.build_source`). The last
    ``val_size`` samples of the source are held out as center-cropped validation images (plain
    tensors); the rest are the train set. ``crop_protocol="authors"`` replaces the plain random
    crop by :class:`AuthorsCropProtocol` (``protocol`` holds its sizes). Bad samples are counted
    in the main process (log + ``data/bad_samples`` in TensorBoard); once at least
    ``min_checked`` samples were tried, a failing fraction above ``max_bad_fraction`` stops the
    run with a :class:`~onedc.errors.DataError` naming a few bad keys.
    """

    def __init__(self, source: str, *, crop_size: int = 256, val_crop_size: int = 256, batch_size: int = 8,
                 num_workers: int = 0, val_size: int = 0, small_images: str = "upscale",
                 crop_protocol: str = "plain", protocol: dict[str, Any] | None = None,
                 max_bad_fraction: float = 0.05, min_checked: int = 16, seed: int = 0,
                 **source_cfg: Any) -> None:
        super().__init__()
        for key, value in (("crop_size", crop_size), ("val_crop_size", val_crop_size), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ConfigError(f"data.{key} must be a positive integer, got {value}")
        if small_images not in SMALL_IMAGE_POLICIES:
            raise ConfigError(f"data.small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}, "
                              f"got {small_images!r}")
        if crop_protocol not in ("plain", "authors"):
            raise ConfigError(f"data.crop_protocol must be plain or authors, got {crop_protocol!r}")
        if not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.kind, self.source_cfg = source, dict(source_cfg, source=source)
        self.crop_size, self.val_crop_size, self.batch_size = int(crop_size), int(val_crop_size), int(batch_size)
        self.num_workers, self.val_size, self.small_images = int(num_workers), int(val_size), small_images
        self.protocol = AuthorsCropProtocol(**(protocol or {})) if crop_protocol == "authors" else None
        self.max_bad_fraction, self.min_checked, self.seed = float(max_bad_fraction), int(min_checked), int(seed)
        self.source: ImageSource | None = None
        self.train_set: SourceCropDataset | None = None
        self.val_set: SourceCropDataset | None = None
        self.anchor, self.anchor_world, self.anchor_batch_size = Position(), None, None
        self._restored: dict[str, Any] | None = None
        self.checked, self.bad_count, self.bad_keys = 0, 0, []

    # -- setup -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open the source once (later calls are no-ops) and split off the val samples."""
        if self.train_set is not None:
            return
        self.source = build_source(self.kind, self.source_cfg)
        n = len(self.source)
        if not 0 <= self.val_size < n:
            raise ConfigError(f"data.val_size={self.val_size} leaves no training sample of {n}")
        if not self.source.has_captions:
            log.info("data source %s has no captions: batches carry the empty caption", self.kind)
        self.train_set = SourceCropDataset(self.source, range(n - self.val_size), self.crop_size, train=True,
                                           small_images=self.small_images, protocol=self.protocol)
        self.val_set = SourceCropDataset(self.source, range(n - self.val_size, n), self.val_crop_size,
                                         train=False, small_images=self.small_images) if self.val_size else None

    def describe(self) -> str:
        """One line for logs: the source, split sizes, crops."""
        if self.source is None or self.train_set is None:
            return f"SourceDataModule({self.kind}): not set up yet"
        protocol = "authors' protocol" if self.protocol else f"{self.crop_size}px random crops"
        return (f"SourceDataModule({self.source.describe()}): {len(self.train_set)} train, {self.val_size} val, "
                f"{protocol}, captions {'yes' if self.source.has_captions else 'no (empty)'}")

    # -- resume state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The O(1) order state stored in checkpoints: anchor, world and batch size, seed, length."""
        if self.train_set is None:
            return {}
        return {"version": STATE_VERSION, "seed": self.seed, "length": len(self.train_set), "source": self.kind,
                "world_size": self.anchor_world, "batch_size": self.anchor_batch_size,
                "anchor_batch": self.anchor.batch, "anchor_epoch": self.anchor.epoch,
                "anchor_offset": self.anchor.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the checkpoint's order state; :meth:`train_dataloader` continues from it."""
        if state.get("version") == STATE_VERSION:
            self._restored = dict(state)

    def resume_position(self, consumed: int, world: int) -> Position:
        """The anchor of this run at ``consumed`` global batches: exact across world/batch-size changes."""
        length = len(self._require())
        state = self._restored
        if state is None:
            return Position()
        if state["length"] != length or state["source"] != self.kind:
            raise ConfigError(f"cannot resume the data order: the checkpoint trained on {state['source']} with "
                              f"{state['length']} samples, this run has {self.kind} with {length}")
        if state["seed"] != self.seed:
            raise ConfigError(f"cannot resume the data order: the checkpoint used seed {state['seed']}, this run "
                              f"{self.seed}; resume with seed={state['seed']}")
        anchor = Position(state["anchor_batch"], state["anchor_epoch"], state["anchor_offset"])
        if state["world_size"] == world and state["batch_size"] == self.batch_size:
            return anchor
        old_global = state["world_size"] * state["batch_size"]
        now = position_after(anchor, consumed - anchor.batch, length, old_global)
        log.warning("data order: %d ranks x batch %d resumed as %d x %d at epoch %d, sample %d (exact continuation)",
                    state["world_size"], state["batch_size"], world, self.batch_size, now.epoch, now.offset)
        return now

    # -- loaders --------------------------------------------------------------------------------
    def _require(self) -> SourceCropDataset:
        if self.train_set is None:
            raise ConfigError("SourceDataModule.setup() must run before asking for loaders")
        return self.train_set

    def _pin_memory(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def train_sampler(self, rank: int = 0, world: int = 1, consumed: int = 0) -> GlobalOrderSampler:
        """This rank's batch sampler at ``consumed`` global batches (also used by tests and benchmarks)."""
        train_set = self._require()
        anchor = self.resume_position(consumed, world)
        self.anchor, self.anchor_world, self.anchor_batch_size = anchor, world, self.batch_size
        start = position_after(anchor, consumed - anchor.batch, len(train_set), self.batch_size * world)
        return GlobalOrderSampler(len(train_set), batch_size=self.batch_size, seed=self.seed, rank=rank,
                                  world_size=world, start=start, protocol=self.protocol)

    def train_dataloader(self) -> DataLoader:
        """Batches of this rank from the restored position; workers get whole batches of keys."""
        rank, world, consumed = 0, 1, 0
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        sampler = self.train_sampler(rank, world, consumed)
        return _SourceLoader(self._require(), batch_sampler=sampler, collate_fn=collate_samples,
                             num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                             pin_memory=self._pin_memory())

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Center crops of the held-out samples as plain image tensors, or ``[]`` (no validation)."""
        self._require()
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=min(self.batch_size, len(self.val_set)), shuffle=False,
                          num_workers=self.num_workers, collate_fn=_val_collate, pin_memory=self._pin_memory())

    # -- bad samples ----------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count bad samples of training batches in the main process; stop past ``max_bad_fraction``."""
        if isinstance(batch, dict) and "bad_keys" in batch:
            self.count_bad(len(batch["image"]), batch["bad_keys"])
        return batch

    def count_bad(self, good: int, bad: list[str]) -> None:
        """Add one batch's tally; log new bad keys, write ``data/bad_samples``, raise past the threshold."""
        self.checked += good + len(bad)
        if bad:
            self.bad_count += len(bad)
            self.bad_keys.extend(bad[: max(0, 5 - len(self.bad_keys))])
            log.warning("skipped %d bad sample(s) (%d of %d so far): %s", len(bad), self.bad_count, self.checked,
                        "; ".join(bad[:3]))
            trainer = self.trainer
            if trainer is not None and trainer.logger is not None:
                trainer.logger.log_metrics({"data/bad_samples": float(self.bad_count),
                                            "data/bad_fraction": self.bad_count / self.checked},
                                           step=trainer.global_step)
        fraction = self.bad_count / max(1, self.checked)
        if (self.checked >= self.min_checked and fraction > self.max_bad_fraction) or (good == 0 and bad):
            raise DataError(f"{self.bad_count} of {self.checked} samples of data={self.kind} failed "
                            f"(> data.max_bad_fraction={self.max_bad_fraction}); e.g. {'; '.join(self.bad_keys[:3])}")


def _val_collate(items: list[dict[str, Any]]) -> Tensor:
    good = [it["image"] for it in items if it["image"] is not None]
    if not good:
        raise DataError(f"no readable validation sample in a batch: {'; '.join(k for it in items for k in it['bad'])}")
    return torch.stack(good)
