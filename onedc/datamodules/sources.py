"""Indexable image sources: folders, Hugging Face arrow/parquet, webdataset tars, MosaicML MDS shards.

Every source is a *random-access* sequence: ``len(source)`` and ``source[i]`` giving a
:class:`RawSample` (encoded image bytes, an optional caption, a key naming the sample). That is
what keeps onedc's sampler stateless: the order is a pure function of (seed, position), so a
run resumes exactly on any number of ranks and workers without replaying an epoch, for every
source. The readers are the field's libraries:

=============  ==========================================================================
folder         :func:`onedc.coding.images.list_images`; caption from a sidecar ``<stem>.txt``
hf             ``datasets``: ``load_from_disk`` dirs, ``Dataset.from_file`` arrow files
               (a ``datasets`` cache dir like CommonCatalog's), ``from_parquet`` parquet
webdataset     ``wids.IndexedTarSamples``: an mmap index over each tar (random access)
streaming      ``streaming``'s MDS shard readers (``reader_from_json`` on ``index.json``)
=============  ==========================================================================

Why not each library's own iterator: ``datasets``' iterable resume loses its shuffle buffer,
webdataset's shuffle is a buffer, and ``StreamingDataset``'s resume ties the order to its
``num_canonical_nodes`` and needs shared memory and a local cache; random access under one
sampler gives all four sources the same exact, O(1) resume. Handles that cannot be pickled
(mmaps, open tars) are opened lazily in each DataLoader worker.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from onedc.errors import ConfigError
from onedc.coding.images import list_images

__all__ = ["FolderSource", "HFSource", "ImageSource", "MDSSource", "RawSample", "SOURCE_KINDS",
           "WebDatasetSource", "build_source", "expand_shards"]

#: Webdataset extension keys tried, in order, for the image of a sample.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """One undecoded sample: ``image`` is encoded bytes (or a PIL image / None if missing)."""

    key: str
    image: Any
    caption: str | None


class ImageSource(Protocol):
    """What the data module needs of a source: a length, random access, and whether it has captions."""

    has_captions: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawSample: ...

    def describe(self) -> str: ...


def _need(module: str, extra: str = "data") -> Any:
    """Import an optional reader library or fail with one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"this data source needs the `{module}` package ({exc}); "
                          f"install it with `pip install 'onedc[{extra}]'`") from exc


class FolderSource:
    """Image files under ``root`` (sorted, recursive); the caption is ``<stem>.txt`` beside the image."""

    def __init__(self, root: str | Path | None = None, files: Sequence[Path] | None = None) -> None:
        if files is None:
            if root is None:
                from onedc.samples import sample_photo_paths

                files = sorted(sample_photo_paths().values())
            else:
                files = list_images(root)
        self.root = root
        self.files = [Path(f) for f in files]
        self.has_captions = any(f.with_suffix(".txt").is_file() for f in self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> RawSample:
        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        return RawSample(key=str(path), image=data, caption=caption)

    def describe(self) -> str:
        return f"folder {self.root or 'sample photos'}: {len(self)} images"


def _arrow_files(path: Path, pattern: str) -> list[str]:
    """Data files under ``path`` in sorted order; ``cache-*`` files (results of ``.map``) are not data."""
    found = sorted(glob.glob(str(path / "**" / pattern), recursive=True))
    return [f for f in found if not Path(f).name.startswith("cache-")]


class HFSource:
    """A Hugging Face ``datasets`` table read by random access.

    ``path`` is a ``save_to_disk`` directory (``split`` picks from a DatasetDict), a single
    ``.arrow``/``.parquet`` file, or a directory searched recursively for ``*.arrow`` (then
    ``*.parquet``) files, such as a ``datasets`` cache dir: the authors' CommonCatalog layout
    (image ``jpg``, caption ``blip2_caption``, name ``unickname``, the first 10,000 arrow files)
    is ``configs/data/commoncatalog.yaml``. ``max_files`` keeps the first N files in sorted
    order. The image column is read undecoded (``Image(decode=False)``) so that a bad image is
    onedc's to skip and count, not a crash inside ``datasets``.
    """

    def __init__(self, path: str | Path, *, image_column: str = "jpg", caption_column: str | None = None,
                 key_column: str | None = None, split: str = "train", max_files: int | None = None) -> None:
        datasets = _need("datasets")
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"data.path {path} does not exist")
        self.path, self.image_column = path, image_column
        self.caption_column, self.key_column = caption_column or None, key_column or None
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"split {split!r} not in {path} (has {', '.join(ds)})")
                ds = ds[split]
            self.files = [str(path)]
        else:
            files = [str(path)] if path.is_file() else _arrow_files(path, "*.arrow") or _arrow_files(path, "*.parquet")
            if not files:
                raise ConfigError(f"no save_to_disk dataset, .arrow or .parquet files under {path}")
            if max_files:
                files = files[: int(max_files)]
            if files[0].endswith(".parquet"):
                ds = datasets.Dataset.from_parquet(files)
            else:
                ds = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
            self.files = files
        missing = [c for c in (image_column, self.caption_column, self.key_column) if c and c not in ds.column_names]
        if missing:
            raise ConfigError(f"column(s) {', '.join(missing)} not in {path}; it has {', '.join(ds.column_names)}")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        keep = [c for c in (image_column, self.caption_column, self.key_column) if c]
        self.dataset = ds.select_columns(keep)
        self.has_captions = self.caption_column is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> RawSample:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        if isinstance(image, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            image = image.get("bytes") or (Path(image["path"]).read_bytes() if image.get("path") else None)
        key = str(row[self.key_column]) if self.key_column else f"{self.path.name}[{index}]"
        caption = row[self.caption_column] if self.caption_column else None
        return RawSample(key=key, image=image, caption=None if caption is None else str(caption))

    def describe(self) -> str:
        return f"hf {self.path} ({len(self.files)} file(s)): {len(self)} rows, image column {self.image_column!r}"


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """A brace pattern (``data/shard-{000000..000009}.tar``), a glob, or a list of either -> shard paths."""
    braceexpand = _need("braceexpand")
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(str(pattern)):
            out.extend(sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item])
    return out


class WebDatasetSource:
    """Webdataset ``.tar`` shards read by random access through ``wids``.

    ``shards`` is a brace pattern, a list, or a wids descriptor ``.json`` (``{"shardlist":
    [{"url", "nsamples"}]}``, written by ``onedc make-shards``; without one every tar's headers
    are indexed once in ``setup``). A sample's image is its first ``image_keys`` extension
    present, its caption the ``caption_key`` extension (UTF-8). ``wids.IndexedTarSamples`` is
    used per shard (an mmap header index, opened lazily per worker and kept in a small LRU)
    rather than ``wids.ShardListDataset``, which copies or lock-files local shards into a cache.
    """

    def __init__(self, shards: str | Sequence[str], *, image_keys: Sequence[str] = IMAGE_EXTENSIONS,
                 caption_key: str | None = "txt", open_shards: int = 8) -> None:
        _need("wids")
        self.image_keys = tuple(k.lstrip(".") for k in image_keys)
        self.caption_key = caption_key.lstrip(".") if caption_key else None
        self.open_shards = max(1, int(open_shards))
        if isinstance(shards, (str, os.PathLike)) and str(shards).endswith(".json"):
            spec = json.loads(Path(shards).read_text(encoding="utf-8"))
            base = Path(shards).parent
            self.urls = [str(base / s["url"]) for s in spec["shardlist"]]
            lengths = [int(s["nsamples"]) for s in spec["shardlist"]]
        else:
            self.urls = expand_shards(shards)
            lengths = []
        missing = [u for u in self.urls if not Path(u).is_file()]
        if not self.urls or missing:
            raise ConfigError(f"webdataset shards not found: {', '.join(missing[:3]) or shards}")
        if not lengths:
            lengths = [len(self._open(i)) for i in range(len(self.urls))]
            self._close_all()
        self.starts = [0]
        for n in lengths:
            self.starts.append(self.starts[-1] + n)
        self.has_captions = self.caption_key is not None
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def _open(self, shard: int) -> Any:
        from wids.wids import IndexedTarSamples

        cache = self.__dict__.setdefault("_cache", OrderedDict())
        if shard in cache:
            cache.move_to_end(shard)
            return cache[shard]
        tar = IndexedTarSamples(path=self.urls[shard])
        cache[shard] = tar
        while len(cache) > self.open_shards:
            cache.popitem(last=False)[1].close()
        return tar

    def _close_all(self) -> None:
        for tar in self.__dict__.get("_cache", {}).values():
            tar.close()
        self._cache = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # mmaps stay in the process that opened them
        return state

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> RawSample:
        shard = bisect.bisect_right(self.starts, int(index)) - 1
        sample = self._open(shard)[int(index) - self.starts[shard]]
        image = next((sample[f".{k}"] for k in self.image_keys if f".{k}" in sample), None)
        caption = sample.get(f".{self.caption_key}") if self.caption_key else None
        if hasattr(image, "read"):
            image = image.read()
        if hasattr(caption, "read"):
            caption = caption.read()
        if isinstance(caption, (bytes, bytearray)):
            caption = caption.decode("utf-8", errors="replace").strip()
        return RawSample(key=f"{Path(self.urls[shard]).name}/{sample['__key__']}", image=image, caption=caption)

    def describe(self) -> str:
        return f"webdataset {len(self.urls)} shard(s): {len(self)} samples"


class MDSSource:
    """MosaicML MDS shards (an ``index.json`` directory) read by random access through ``streaming``'s readers.

    Columns: ``image_column`` (``bytes`` or an image encoding such as ``jpeg``/``pil``),
    optional ``caption_column`` (``str``) and ``key_column``. Shards must be uncompressed on
    local disk (``onedc make-shards --format mds`` writes them so). ``StreamingDataset`` is not
    used: its resume state depends on ``num_canonical_nodes`` and it needs shared memory; the
    shard readers give random access under onedc's own stateless sampler instead.
    """

    def __init__(self, path: str | Path, *, image_column: str = "jpg", caption_column: str | None = "txt",
                 key_column: str | None = "key", split: str | None = None) -> None:
        _need("streaming")
        from streaming.base.format import reader_from_json

        self.path = Path(path)
        index = self.path / (split or "") / "index.json"
        if not index.is_file():
            raise ConfigError(f"no MDS index.json at {index}")
        obj = json.loads(index.read_text(encoding="utf-8"))
        self.readers = [reader_from_json(str(self.path), split, shard) for shard in obj["shards"]]
        packed = [r.raw_data.basename for r in self.readers
                  if not (self.path / (split or "") / r.raw_data.basename).is_file()]
        if packed:
            raise ConfigError(f"MDS shard {packed[0]} of {index} is missing or only compressed "
                              f"({len(packed)} such); onedc reads uncompressed local shards: write them with "
                              "`onedc make-shards --format mds` or without compression")
        columns = set(self.readers[0].column_names) if self.readers else set()
        missing = [c for c in (image_column, caption_column, key_column) if c and c not in columns]
        if image_column in missing:
            raise ConfigError(f"column {image_column!r} not in {index}; it has {', '.join(sorted(columns))}")
        self.image_column = image_column
        self.caption_column = caption_column if caption_column in columns else None
        self.key_column = key_column if key_column in columns else None
        self.starts = [0]
        for reader in self.readers:
            self.starts.append(self.starts[-1] + reader.samples)
        self.has_captions = self.caption_column is not None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> RawSample:
        shard = bisect.bisect_right(self.starts, int(index)) - 1
        row = self.readers[shard].get_item(int(index) - self.starts[shard])
        key = str(row[self.key_column]) if self.key_column else f"{self.readers[shard].raw_data.basename}[{index}]"
        caption = row.get(self.caption_column) if self.caption_column else None
        return RawSample(key=key, image=row.get(self.image_column), caption=caption)

    def describe(self) -> str:
        return f"streaming MDS {self.path} ({len(self.readers)} shard(s)): {len(self)} samples"


SOURCE_KINDS: tuple[str, ...] = ("folder", "hf", "webdataset", "streaming")


def build_source(kind: str, cfg: dict[str, Any]) -> ImageSource:
    """The source of ``data.source=kind`` from the data config's keys (see configs/data/*.yaml)."""
    if kind == "folder":
        return FolderSource(cfg.get("root"))
    if kind == "hf":
        return HFSource(_required(cfg, "path"), image_column=cfg.get("image_column") or "jpg",
                        caption_column=cfg.get("caption_column"), key_column=cfg.get("key_column"),
                        split=cfg.get("split") or "train", max_files=cfg.get("max_files"))
    if kind == "webdataset":
        return WebDatasetSource(_required(cfg, "shards"), image_keys=cfg.get("image_keys") or IMAGE_EXTENSIONS,
                                caption_key=cfg.get("caption_key"))
    if kind == "streaming":
        return MDSSource(_required(cfg, "path"), image_column=cfg.get("image_column") or "jpg",
                         caption_column=cfg.get("caption_column"), key_column=cfg.get("key_column"),
                         split=cfg.get("split"))
    raise ConfigError(f"data.source must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")


def _required(cfg: dict[str, Any], key: str) -> Any:
    value = cfg.get(key)
    if value in (None, "", "???"):
        raise ConfigError(f"data.{key} is required for data.source={cfg.get('source')}")
    return value
