"""Tiny datasets of every source kind, cut from the bundled sample photos into tmp dirs."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from onedc.datamodules.shards import make_shards
from onedc.samples import sample_photo_paths

CORRUPT = b"\xff\xd8\xff\xe0 not really a jpeg"


def build_folder(root: Path, count: int = 24, size: int = 48, bad: set[int] = frozenset()) -> Path:
    """``count`` distinct small JPEG crops of the sample photos with ``caption i`` sidecars; ``bad`` are corrupt."""
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(sample_photo_paths().values())]
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - 2 * size))
        left = int(rng.integers(0, photo.shape[1] - 2 * size))
        crop = Image.fromarray(photo[top: top + 2 * size: 2, left: left + int(2.5 * size): 2])
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        (root / f"img{i:03d}.jpg").write_bytes(CORRUPT if i in bad else buffer.getvalue())
        (root / f"img{i:03d}.txt").write_text(f"caption {i}", encoding="utf-8")
    return root


def build_hf(root: Path, folder: Path) -> Path:
    """A ``save_to_disk`` dataset (columns image, text, name) of the folder's files, corrupt ones included."""
    import datasets

    files = sorted(folder.glob("*.jpg"))
    table = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
             "text": [f.with_suffix(".txt").read_text() for f in files], "name": [f.stem for f in files]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "name": datasets.Value("string")})
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(root))
    return root


def write_raw_webdataset(folder: Path, out: Path, shard_size: int) -> Path:
    """The folder's files as webdataset tars byte for byte (corrupt ones too), without an index .json."""
    import webdataset

    out.mkdir(parents=True)
    files = sorted(folder.glob("*.jpg"))
    for start in range(0, len(files), shard_size):
        with webdataset.TarWriter(str(out / f"shard-{start // shard_size:06d}.tar")) as writer:
            for f in files[start: start + shard_size]:
                writer.write({"__key__": f.stem, "jpg": f.read_bytes(), "txt": f.with_suffix(".txt").read_text()})
    return out


def build_all(tmp: Path, count: int = 24, bad: set[int] = frozenset()) -> dict[str, Path]:
    """Folder, hf, webdataset and streaming copies of the same samples under ``tmp``."""
    folder = build_folder(tmp / "folder", count, bad=bad)
    out = {"folder": folder, "hf": build_hf(tmp / "hf", folder)}
    out["webdataset"] = tmp / "wds"
    if bad:  # make-shards would drop the corrupt files: write the tars as they are
        write_raw_webdataset(folder, out["webdataset"], shard_size=5)
    else:
        make_shards(folder, out["webdataset"], fmt="webdataset", shard_size=5, progress=False)
    out["streaming"] = tmp / "mds"
    make_shards(folder, out["streaming"], fmt="mds", shard_size=5, progress=False)
    return out


def data_overrides(kind: str, paths: dict[str, Path]) -> dict:
    """SourceDataModule keyword arguments reading ``paths[kind]``."""
    if kind == "hf":
        return {"source": "hf", "path": str(paths["hf"]), "image_column": "image", "caption_column": "text",
                "key_column": "name"}
    if kind == "webdataset":
        index = paths["webdataset"] / "index.wids.json"
        last = len(list(paths["webdataset"].glob("*.tar"))) - 1
        shards = str(index) if index.is_file() else str(paths["webdataset"] / f"shard-{{000000..{last:06d}}}.tar")
        return {"source": "webdataset", "shards": shards, "caption_key": "txt"}
    if kind == "streaming":
        return {"source": "streaming", "path": str(paths["streaming"]), "image_column": "jpg",
                "caption_column": "txt", "key_column": "key"}
    return {"source": "folder", "root": str(paths["folder"])}


def batch_hash(batch: dict) -> str:
    """A digest of a batch's pixels and captions."""
    digest = hashlib.sha256(batch["image"].numpy().tobytes())
    digest.update("|".join(batch["caption"]).encode())
    return digest.hexdigest()[:16]
