"""``onedc make-shards``: write webdataset tars or MosaicML MDS shards from a folder or an HF dataset.

The images are copied as their encoded bytes (no re-encoding for JPEG/PNG/WebP; other formats
become PNG), captions too (a folder's sidecar ``.txt``, an HF caption column). Writers are the
libraries' own (``webdataset.TarWriter``, ``streaming.MDSWriter``); everything is written into a
temporary sibling directory that is renamed to ``OUT`` at the end, so an interrupted run leaves
no half-written dataset, and an existing ``OUT`` is never overwritten. The webdataset output
also gets ``index.wids.json`` (shard names and sample counts), which ``data=webdataset`` reads
instead of indexing every tar.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from onedc.datamodules.sources import FolderSource, HFSource, ImageSource, RawSample, _need
from onedc.errors import ConfigError

__all__ = ["make_shards", "open_source"]

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def open_source(src: str | Path, *, image_column: str = "image", caption_column: str | None = None,
                key_column: str | None = None) -> ImageSource:
    """A folder of images (captions from sidecar ``.txt``) or an HF dataset (``save_to_disk``/arrow/parquet)."""
    src = Path(src)
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    hf_markers = ("dataset_info.json", "dataset_dict.json")
    if src.is_file() or any((src / m).is_file() for m in hf_markers) or any(src.rglob("*.arrow")):
        return HFSource(src, image_column=image_column, caption_column=caption_column, key_column=key_column)
    return FolderSource(src)


def _encoded(sample: RawSample) -> tuple[bytes, str]:
    """The image bytes and their extension; formats other than JPEG/PNG/WebP re-encoded as PNG."""
    from PIL import Image

    data = sample.image
    if not isinstance(data, (bytes, bytearray)):
        raise ConfigError(f"sample {sample.key} has no image bytes")
    with Image.open(io.BytesIO(data)) as image:
        ext = _KEEP_FORMATS.get(image.format or "")
        if ext is not None:
            return bytes(data), ext
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png"


def _samples(source: ImageSource, progress: bool) -> Iterator[tuple[int, RawSample]]:
    from tqdm import tqdm

    for i in tqdm(range(len(source)), desc="make-shards", unit="img", disable=not progress):
        yield i, source[i]


def make_shards(src: str | Path, out: str | Path, *, fmt: str, shard_size: int, progress: bool = True,
                **source_kwargs: Any) -> dict[str, Any]:
    """Write ``src`` as ``fmt`` (``webdataset`` or ``mds``) shards of ``shard_size`` samples into ``out``.

    Returns a summary (``shards``, ``samples``, ``captions``, ``out``). Unreadable samples are
    skipped with their key in ``skipped``. ``out`` must not exist yet.
    """
    if fmt not in ("webdataset", "mds"):
        raise ConfigError(f"--format must be webdataset or mds, got {fmt!r}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; choose a new output directory (make-shards never overwrites)")
    source = open_source(src, **source_kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = _write_webdataset if fmt == "webdataset" else _write_mds
        summary = writer(source, tmp, shard_size, progress)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary


def _write_webdataset(source: ImageSource, tmp: Path, shard_size: int, progress: bool) -> dict[str, Any]:
    webdataset = _need("webdataset")
    shards: list[dict[str, Any]] = []
    skipped: list[str] = []
    writer, count, captions = None, 0, 0
    for i, sample in _samples(source, progress):
        try:
            data, ext = _encoded(sample)
        except Exception:  # noqa: BLE001 - an unreadable input is skipped and reported
            skipped.append(sample.key)
            continue
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
                shards[-1]["nsamples"] = count
            name = f"shard-{len(shards):06d}.tar"
            writer, count = webdataset.TarWriter(str(tmp / name)), 0
            shards.append({"url": name, "nsamples": 0})
        record = {"__key__": f"{i:09d}", ext: data}
        if sample.caption is not None:
            record["txt"] = sample.caption
            captions += 1
        writer.write(record)
        count += 1
    if writer is not None:
        writer.close()
        shards[-1]["nsamples"] = count
    index = {"wids_version": 1, "name": tmp.name, "shardlist": shards}
    (tmp / "index.wids.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return {"shards": len(shards), "samples": sum(s["nsamples"] for s in shards), "captions": captions,
            "skipped": skipped}


def _write_mds(source: ImageSource, tmp: Path, shard_size: int, progress: bool) -> dict[str, Any]:
    _need("streaming")
    from streaming import MDSWriter

    columns = {"key": "str", "jpg": "bytes", "ext": "str", "txt": "str"}
    skipped: list[str] = []
    samples, captions, in_shard, shards = 0, 0, 0, 0
    # size_limit is in bytes; shards are cut by sample count with flush_shard() instead.
    with MDSWriter(out=str(tmp), columns=columns, size_limit=1 << 31, progress_bar=False) as writer:
        for _, sample in _samples(source, progress):
            try:
                data, ext = _encoded(sample)
            except Exception:  # noqa: BLE001 - an unreadable input is skipped and reported
                skipped.append(sample.key)
                continue
            if in_shard == shard_size:
                # What MDSWriter.write does when size_limit is reached (flush, then a fresh cache).
                writer.flush_shard()
                writer._reset_cache()
                in_shard = 0
            shards += in_shard == 0
            writer.write({"key": sample.key, "jpg": data, "ext": ext, "txt": sample.caption or ""})
            captions += sample.caption is not None
            samples += 1
            in_shard += 1
    return {"shards": shards, "samples": samples, "captions": captions, "skipped": skipped}
