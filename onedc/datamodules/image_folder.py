"""Folders of photos as a Lightning data module: splitting, cropping, the Lightning side.

Data flow::

    root/ (or the sample photos)
      │ list_images: recursive, sorted, image suffixes only
      ▼
    files ──split (val_root | val_names | seeded val_fraction)──► train files, val files
      │ setup(): every file is opened once, so a bad file fails here, not mid-epoch
      ▼
    ImageCropDataset: load_image ─► fit small images ─► crop (random+flip | center)
      ▼
    batch: float32 tensor (B, 3, crop, crop) in [-1, 1]

With ``root=None`` the module trains on photos that ship inside scikit-image and matplotlib
(see :func:`sample_photo_paths`), so a smoke run needs no dataset and no download.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from onedc.errors import ConfigError, ImageReadError, OneDCError
from onedc.coding.images import IMAGE_SUFFIXES, list_images, load_image, probe_short_side
from onedc.datamodules.sampler import ResumableDataLoader, ResumableSampler
from onedc.samples import sample_photo_paths

# Decoding lives in onedc.coding.images and the sample photos in onedc.samples; these names stay
# importable from here for older callers.
__all__ = ["FULL_DECODE_LIMIT", "IMAGE_SUFFIXES", "SMALL_IMAGE_POLICIES", "ImageCropDataset", "ImageFolderDataModule",
           "ResumableDataLoader", "ResumableSampler", "list_images", "load_image", "sample_photo_paths"]

SmallImagePolicy = Literal["upscale", "pad", "skip"]
SMALL_IMAGE_POLICIES: tuple[str, ...] = ("upscale", "pad", "skip")

# Above this many files, setup() only checks headers (Image.verify) instead of decoding every
# file: a full decode of a large folder would delay the first step by minutes.
FULL_DECODE_LIMIT = 2000


def _fit_to_crop(image: Tensor, crop_size: int, small_images: str) -> Tensor:
    """Make both sides of ``image`` at least ``crop_size`` by the ``small_images`` policy."""
    height, width = image.shape[-2:]
    if min(height, width) >= crop_size:
        return image
    if small_images == "pad":
        return _reflect_pad_to(image, crop_size)
    # "upscale", and "skip" should the file have changed since setup() filtered it out.
    scale = crop_size / min(height, width)
    size = (max(crop_size, round(height * scale)), max(crop_size, round(width * scale)))
    upscaled = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)[0]
    return upscaled.clamp_(-1.0, 1.0)  # bicubic overshoots near edges


def _reflect_pad_to(image: Tensor, crop_size: int) -> Tensor:
    """Reflect-pad ``image`` (centred) until both sides are at least ``crop_size``."""
    while True:
        height, width = image.shape[-2:]
        need_h, need_w = max(0, crop_size - height), max(0, crop_size - width)
        if need_h == 0 and need_w == 0:
            return image
        if (need_h and height == 1) or (need_w and width == 1):
            # A one-pixel side has nothing to reflect; repeat it once, then reflect.
            grow_h, grow_w = int(need_h > 0 and height == 1), int(need_w > 0 and width == 1)
            image = F.pad(image[None], (0, grow_w, 0, grow_h), mode="replicate")[0]
            continue
        # torch's reflect pad must be smaller than the side, so large pads take several rounds.
        top, left = min(need_h // 2, height - 1), min(need_w // 2, width - 1)
        bottom, right = min(need_h - need_h // 2, height - 1), min(need_w - need_w // 2, width - 1)
        image = F.pad(image[None], (left, right, top, bottom), mode="reflect")[0]


class ImageCropDataset(Dataset[Tensor]):
    """Image files as fixed-size crops: random crop + horizontal flip, or a center crop.

    Item ``i`` is a float32 tensor (3, ``crop_size``, ``crop_size``) in [-1, 1] cut from file
    ``i % len(files)``; the dataset is ``repeat`` times as long as ``files`` so that a tiny
    folder still yields enough steps per epoch. Images with a side shorter than the crop are
    upscaled or reflect-padded first (``small_images``). With ``skip_bad`` an unreadable file
    found only at load time (large folders are not fully decoded in setup) is replaced by the
    next readable one, with a warning; otherwise its ImageReadError propagates.
    """

    def __init__(
        self,
        files: Sequence[Path],
        crop_size: int,
        *,
        train: bool,
        small_images: SmallImagePolicy = "upscale",
        repeat: int = 1,
        skip_bad: bool = False,
    ) -> None:
        self.files = list(files)
        self.crop_size = crop_size
        self.train = train
        self.small_images = small_images
        self.repeat = repeat
        self.skip_bad = skip_bad
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def __getitem__(self, index: int | tuple[int, int]) -> Tensor:
        # A (index, crop_seed) key (from ResumableSampler) makes the random crop a function of
        # the sample's place in the run, not of a global RNG: that is what makes resume exact.
        generator = None
        if isinstance(index, tuple):
            index, crop_seed = index
            generator = torch.Generator().manual_seed(int(crop_seed))
        file_index = index % len(self.files)
        for offset in range(len(self.files)):
            candidate = (file_index + offset) % len(self.files)
            if candidate in self._bad:
                continue
            try:
                image = load_image(self.files[candidate])
            except ImageReadError as exc:
                if not self.skip_bad:
                    raise
                self._bad.add(candidate)
                rank_zero_warn(f"skipping unreadable image: {exc}")
                continue
            return self._crop(_fit_to_crop(image, self.crop_size, self.small_images), generator)
        raise ImageReadError(
            f"none of the {len(self.files)} images could be read. Check the image folder."
        )

    def _crop(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        height, width = image.shape[-2:]
        size = self.crop_size
        if self.train:
            top = int(torch.randint(0, height - size + 1, (), generator=generator))
            left = int(torch.randint(0, width - size + 1, (), generator=generator))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        crop = image[:, top : top + size, left : left + size]
        if self.train and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
        return crop.contiguous()


class ImageFolderDataModule(lightning.LightningDataModule):
    """Train/val crops from a folder of images (or the embedded sample photos).

    Batches are float32 tensors (B, 3, h, w) in [-1, 1]; train items are random
    ``crop_size`` crops with random horizontal flips, val items are ``val_crop_size`` center
    crops, so validation is deterministic.

    Split (first that applies): ``val_root`` -> every image there is val and every image
    under ``root`` is train; ``val_names`` -> files whose stem is listed are val (an unknown
    name is an error that lists the available stems); ``val_fraction > 0`` -> a ``seed``-ed
    random choice of ``max(1, round(val_fraction * n))`` of the sorted files is val; else there
    is no val set and :meth:`val_dataloader` returns an empty list, which Lightning treats as
    "no validation".

    ``small_images`` says what happens to an image whose short side is below the crop:
    ``"upscale"`` resizes it (bicubic, aspect kept) so the short side equals the crop;
    ``"pad"`` reflect-pads it up to the crop; ``"skip"`` drops it with a warning.

    ``setup()`` opens every file once, so a corrupt file fails before training starts with an
    :class:`~onedc.errors.ImageReadError` naming it; with ``skip_bad=True`` it is dropped with
    a warning instead. Up to :data:`FULL_DECODE_LIMIT` files are fully decoded; beyond that
    only headers are verified, and a decode error at load time is raised (or, with
    ``skip_bad``, the file is replaced by the next readable one). ``repeat`` repeats the train
    set within an epoch so that tiny folders (5 photos x 16) make useful epochs.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        crop_size: int = 128,
        val_crop_size: int = 128,
        batch_size: int = 4,
        num_workers: int = 0,
        val_names: Iterable[str] = (),
        val_fraction: float = 0.0,
        val_root: str | Path | None = None,
        skip_bad: bool = False,
        small_images: SmallImagePolicy = "upscale",
        repeat: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # A bare string would otherwise be split into single-character names.
        names = (val_names,) if isinstance(val_names, str) else tuple(str(n) for n in val_names)
        for key, value in (("crop_size", crop_size), ("val_crop_size", val_crop_size),
                           ("batch_size", batch_size), ("repeat", repeat)):
            if int(value) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value}.")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if small_images not in SMALL_IMAGE_POLICIES:
            raise ConfigError(
                f"small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}, "
                f"got {small_images!r}."
            )
        chosen = [k for k, on in (("val_root", val_root is not None), ("val_names", bool(names)),
                                  ("val_fraction", val_fraction > 0)) if on]
        if len(chosen) > 1:
            raise ConfigError(
                f"{' and '.join(chosen)} each define the val split; set only one of them."
            )
        self.root = None if root is None else Path(root)
        self.crop_size = int(crop_size)
        self.val_crop_size = int(val_crop_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.val_names = names
        self.val_fraction = float(val_fraction)
        self.val_root = None if val_root is None else Path(val_root)
        self.skip_bad = skip_bad
        self.small_images = small_images
        self.repeat = int(repeat)
        self.seed = int(seed)
        self.train_set: ImageCropDataset | None = None
        self.val_set: ImageCropDataset | None = None
        self.dropped: dict[str, list[Path]] = {"unreadable": [], "small": []}

    def setup(self, stage: str | None = None) -> None:
        """List, split and check the files once; later calls (other stages) are no-ops."""
        if self.train_set is not None:
            return
        if self.root is None:
            files = sorted(sample_photo_paths().values())
        else:
            files = list_images(self.root)
        train_files, val_files = self._split(files)
        full_decode = len(train_files) + len(val_files) <= FULL_DECODE_LIMIT
        train_files = self._usable(train_files, self.crop_size, full_decode)
        val_files = self._usable(val_files, self.val_crop_size, full_decode)
        if not train_files:
            raise OneDCError(
                f"no usable training images left in {self._source()} after the val split and "
                "dropping unreadable/small files. Add images or lower the crop size."
            )
        self.train_set = ImageCropDataset(
            train_files, self.crop_size, train=True, small_images=self.small_images,
            repeat=self.repeat, skip_bad=self.skip_bad,
        )
        self.val_set = ImageCropDataset(
            val_files, self.val_crop_size, train=False, small_images=self.small_images,
            skip_bad=self.skip_bad,
        ) if val_files else None

    def _source(self) -> str:
        return "the sample photos" if self.root is None else str(self.root)

    def _split(self, files: list[Path]) -> tuple[list[Path], list[Path]]:
        if self.val_root is not None:
            return files, list_images(self.val_root)
        if self.val_names:
            stems = {p.stem for p in files}
            unknown = [n for n in self.val_names if n not in stems]
            if unknown:
                available = sorted(stems)
                shown = ", ".join(available[:30]) + (", ..." if len(available) > 30 else "")
                raise ConfigError(
                    f"val_names {unknown} not found in {self._source()}. "
                    f"Available stems: {shown}."
                )
            wanted = set(self.val_names)
            return ([p for p in files if p.stem not in wanted],
                    [p for p in files if p.stem in wanted])
        if self.val_fraction > 0:
            n_val = max(1, round(self.val_fraction * len(files)))
            if n_val >= len(files):
                raise ConfigError(
                    f"val_fraction={self.val_fraction} of {len(files)} images leaves no "
                    "training image. Lower val_fraction or add images."
                )
            chosen = set(random.Random(self.seed).sample(range(len(files)), n_val))
            return ([p for i, p in enumerate(files) if i not in chosen],
                    [p for i, p in enumerate(files) if i in chosen])
        return files, []

    def _usable(self, files: list[Path], crop_size: int, full_decode: bool) -> list[Path]:
        """Drop unreadable files (if ``skip_bad``) and too-small ones (if policy is "skip")."""
        kept = []
        for path in files:
            try:
                short_side = probe_short_side(path, full_decode)
            except ImageReadError as exc:
                if not self.skip_bad:
                    raise
                self.dropped["unreadable"].append(path)
                rank_zero_warn(f"skipping unreadable image: {exc}")
                continue
            if short_side < crop_size and self.small_images == "skip":
                self.dropped["small"].append(path)
                rank_zero_warn(
                    f"skipping image {path}: short side {short_side} px < crop {crop_size} px "
                    "(small_images='skip'; use 'upscale' or 'pad' to keep it)."
                )
                continue
            kept.append(path)
        return kept

    def _pin_memory(self) -> bool:
        # Pinned host memory only helps copies to a CUDA device; on CPU it wastes RAM.
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _require_setup(self) -> ImageCropDataset:
        if self.train_set is None:
            raise OneDCError("ImageFolderDataModule.setup() must run before asking for loaders.")
        return self.train_set

    def train_dataloader(self) -> DataLoader[Tensor]:
        """Shuffled random crops; incomplete last batch dropped when a full one exists."""
        train_set = self._require_setup()
        trainer = self.trainer
        rank, world, consumed = 0, 1, 0
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
            # Lightning restores global_step before it asks for loaders: batches this rank consumed.
            consumed = trainer.global_step * trainer.accumulate_grad_batches
        if len(train_set) // world < self.batch_size:
            raise ConfigError(f"only {len(train_set) // world} training crops per process for data.batch_size="
                              f"{self.batch_size}: lower data.batch_size or raise data.repeat")
        sampler = ResumableSampler(len(train_set), batch_size=self.batch_size, seed=self.seed, rank=rank,
                                   world_size=world, start_batch=consumed)
        return ResumableDataLoader(
            train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
        )

    def val_dataloader(self) -> DataLoader[Tensor] | list[DataLoader[Tensor]]:
        """Center crops in file order, or ``[]`` when there is no val set (no validation)."""
        self._require_setup()
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=min(self.batch_size, len(self.val_set)),
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
        )

    def describe(self) -> str:
        """One line summarising source, split sizes, crops and dropped files, for logs."""
        if self.train_set is None:
            return f"ImageFolderDataModule({self._source()}): not set up yet"
        n_train = len(self.train_set.files)
        n_val = 0 if self.val_set is None else len(self.val_set.files)
        return (
            f"ImageFolderDataModule({self._source()}): {n_train} train images x{self.repeat} "
            f"= {len(self.train_set)} crops/epoch of {self.crop_size}px, {n_val} val images "
            f"(center {self.val_crop_size}px), dropped {len(self.dropped['unreadable'])} "
            f"unreadable and {len(self.dropped['small'])} small"
        )
