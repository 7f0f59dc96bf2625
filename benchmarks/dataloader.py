"""Loader throughput per source vs what a tiny-preset training step consumes, and the cost of a resume.

::

    tmp dir: N full-size JPEGs cut from the sample photos, as a folder (+ .txt captions), an HF
             save_to_disk dataset, webdataset tars (onedc make-shards) and MDS shards
    round r (twice, so machine-load drift hits every row alike):
      tiny-preset distill step (model=tiny_random, bare PyTorch step: forward, backward, AdamW)
        at B x 256 px and B x 512 px            -> images/s a training step consumes
      for source in folder, hf, webdataset, streaming; workers in 0, 2, 4; crop in 256, 512:
        SourceDataModule.train_dataloader(), first batch dropped (worker start), then K images
                                                -> images/s the loader delivers
    ratio = loader images/s / training-step images/s at the same crop (>= 1: the loader keeps up)

    resume: 10M samples, 64 ranks x 8 per batch, 8 workers each, 1M steps in: for every rank (one
    process) the O(1) position from the checkpoint anchor, its sampler, and its first batch of
    keys (Feistel permutation entries, no table). Workers restore nothing: they receive batches of
    keys from their rank's sampler.

Usage: ``python benchmarks/dataloader.py [--images 32] [--batch 4] [--threads 1] [--rounds 2]``.
"""
from __future__ import annotations

import argparse
import statistics
import warnings
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_sources(root: Path, count: int) -> dict[str, dict]:
    """``count`` full-size JPEGs of the sample photos as the four source kinds; SourceDataModule kwargs."""
    import io

    import datasets
    from PIL import Image

    from onedc.datamodules.shards import make_shards
    from onedc.samples import sample_photo_paths

    datasets.disable_progress_bars()
    folder = root / "folder"
    folder.mkdir(parents=True)
    photos = [Image.open(p).convert("RGB") for p in sorted(sample_photo_paths().values())]
    for i in range(count):
        photo = photos[i % len(photos)]
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (i // len(photos)) % 2 else photo
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=92)
        (folder / f"img{i:04d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"img{i:04d}.txt").write_text(f"photo {i}")
    files = sorted(folder.glob("*.jpg"))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                "text": [f.with_suffix(".txt").read_text() for f in files]},
                               features=features).save_to_disk(str(root / "hf"))
    make_shards(folder, root / "wds", fmt="webdataset", shard_size=16, progress=False)
    make_shards(folder, root / "mds", fmt="mds", shard_size=16, progress=False)
    return {"folder": {"source": "folder", "root": str(folder)},
            "hf": {"source": "hf", "path": str(root / "hf"), "image_column": "image", "caption_column": "text"},
            "webdataset": {"source": "webdataset", "shards": str(root / "wds" / "index.wids.json")},
            "streaming": {"source": "streaming", "path": str(root / "mds")}}


def loader_ips(kwargs: dict, workers: int, crop: int, batch: int, images: int, seed: int) -> float:
    """Images/s of the train loader after its first batch (worker start-up excluded)."""
    from onedc.datamodules.source_data import SourceDataModule

    dm = SourceDataModule(crop_size=crop, batch_size=batch, num_workers=workers, seed=seed, **kwargs)
    dm.setup()
    loader = iter(dm.train_dataloader())
    next(loader)
    start, seen = time.perf_counter(), 0
    while seen < images:
        try:
            seen += len(next(loader)["image"])
        except StopIteration:
            loader = iter(dm.train_dataloader())
    elapsed = time.perf_counter() - start
    del loader
    return seen / elapsed


class TrainStep:
    """A bare distill step of the tiny preset (random VAE: speed does not depend on weights)."""

    def __init__(self) -> None:
        from onedc.training.build import build_stage
        from onedc.training.config import compose

        cfg = compose(["stage=distill", "model=tiny_random"])
        self.module = build_stage(cfg, cfg.stage)
        config = self.module.configure_optimizers()
        self.optimizer = config["optimizer"]

    def ips(self, batch: int, crop: int, steps: int = 2) -> float:
        x = torch.rand(batch, 3, crop, crop) * 2 - 1
        self._step(x)  # warm-up (allocations at this size)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self._step(x)
            times.append(time.perf_counter() - start)
        return batch / statistics.median(times)

    def _step(self, x: torch.Tensor) -> None:
        loss = self.module._step(x)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def restore_cost(samples: int = 10_000_000, ranks: int = 64, batch: int = 8,
                 steps: int = 1_000_000) -> tuple[float, float]:
    """(seconds to compute all ranks' positions + samplers, seconds including each rank's first batch of keys)."""
    from onedc.datamodules.source_data import GlobalOrderSampler, Position, position_after

    anchor = Position(0, 0, 0)
    start = time.perf_counter()
    samplers = []
    for rank in range(ranks):
        pos = position_after(anchor, steps, samples, batch * ranks)
        samplers.append(GlobalOrderSampler(samples, batch_size=batch, seed=0, rank=rank, world_size=ranks, start=pos))
    positions = time.perf_counter() - start
    for sampler in samplers:
        next(iter(sampler))
    return positions, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images timed per loader configuration")
    parser.add_argument("--batch", type=int, default=4, help="batch size of loaders and training steps")
    parser.add_argument("--count", type=int, default=64, help="samples in each built dataset")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin rounds (median taken)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # 4 workers on a 2-core box is the point of the row; torch's "too many workers" warning is not.
    warnings.filterwarnings("ignore", message=".*worker.*")
    sources_kinds = ("folder", "hf", "webdataset", "streaming")
    crops, workers = (256, 512), (0, 2, 4)
    with tempfile.TemporaryDirectory() as tmp:
        sources = build_sources(Path(tmp), args.count)
        step = TrainStep()
        train: dict[int, list[float]] = {c: [] for c in crops}
        load: dict[tuple, list[float]] = {}
        for r in range(args.rounds):
            for crop in crops:
                train[crop].append(step.ips(args.batch, crop))
                for kind in sources_kinds:
                    for w in workers:
                        load.setdefault((kind, w, crop), []).append(
                            loader_ips(sources[kind], w, crop, args.batch, args.images, seed=r))
    print(f"dataloader benchmark: {args.count} JPEGs (sample photos, 300-512 px short side, upscaled to the crop), "
          f"batch {args.batch}, {args.images} images per row, median of {args.rounds} round-robin rounds, "
          f"{torch.get_num_threads()} main thread(s)")
    for crop in crops:
        t = statistics.median(train[crop])
        print(f"training step (tiny_random distill, bare loop) at {crop}px: {t:.1f} images/s")
    print(f"{'source':<11} {'workers':>7} " + " ".join(f"{f'{c}px img/s':>12} {'ratio':>6}" for c in crops))
    for kind in sources_kinds:
        for w in workers:
            cells = []
            for crop in crops:
                ips = statistics.median(load[(kind, w, crop)])
                cells.append(f"{ips:>12.1f} {ips / statistics.median(train[crop]):>6.1f}")
            print(f"{kind:<11} {w:>7} " + " ".join(cells))
    positions, with_batch = restore_cost()
    print(f"restore at 10M samples x 64 ranks x 8 per batch (8 workers each, 1M steps in): positions + samplers "
          f"{positions * 1e3:.2f} ms for all 64 ranks; with each rank's first batch of keys {with_batch * 1e3:.2f} ms "
          f"({with_batch / 64 * 1e6:.0f} us per rank)")


if __name__ == "__main__":
    main()
