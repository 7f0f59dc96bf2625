"""The anchor-row cache of ``onedc eval`` (onedc.eval.cache): a warm evaluation scores no anchor and
writes the same outputs; every key part invalidates; damaged files are ignored with a warning."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import onedc.eval.cache as cache_module
import onedc.eval.run as run
from onedc.cli import main
from onedc.eval import evaluate
from onedc.eval.cache import SCORE_FIELDS, AnchorCache, image_digest, module_digest

TIMINGS = ("enc_ms", "dec_ms")  # wall-clock times of the onedc rows differ from run to run


class PatchFeatures(nn.Module):
    """RANDOM stand-in for Inception (tests only: its values are not FID)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 6, 16, stride=16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() / 255).mean(dim=(2, 3))


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


@pytest.fixture()
def counted(monkeypatch):
    """Counts of the anchor encodes and decodes evaluate makes (the work a warm cache saves)."""
    counts = {"encode": 0, "decode": 0}

    def count(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run, "pillow_encode", count("encode", run.pillow_encode))
    monkeypatch.setattr(run, "pillow_decode", count("decode", run.pillow_decode))
    return counts


@pytest.fixture(scope="module")
def fid_images(tmp_path_factory, photo) -> Path:
    """A 384-px crop (2 FID patches: FID/KID have values) and a small one."""
    from onedc.coding.images import save_image

    folder = tmp_path_factory.mktemp("fid-images")
    save_image(photo[:, :384, 64:448], folder / "big.png")
    save_image(photo[:, 300:364, 20:100], folder / "small.png")
    return folder


def test_warm_cache_writes_the_outputs_of_an_evaluation_without_it(tmp_path, ladder, fid_images, no_weights,
                                                                   counted):
    """No cache, cold cache, warm cache, warm cache with a damaged entry: the same rows, aggregate,
    bd.json and rd.png; the warm run encodes and scores no anchor; the damaged entry is named once."""
    ladders = {"jpeg": (5, 50), "webp": (10,)}

    def run_eval(name: str, anchor_cache):
        notes: list[str] = []
        before = dict(counted)
        result = evaluate(ladder, fid_images, tmp_path / name, progress=False, anchors=("jpeg", "webp"),
                          ladders=ladders, feature_extractor=PatchFeatures(), say=notes.append,
                          anchor_cache=anchor_cache)
        work = {k: counted[k] - before[k] for k in counted}
        return result, work, [n for n in notes if "anchor cache" in n]

    cache = tmp_path / "cache"
    plain, plain_work, _ = run_eval("plain", False)
    cold, cold_work, _ = run_eval("cold", cache)
    warm, warm_work, warm_notes = run_eval("warm", cache)
    assert not list((tmp_path / "plain").glob("anchors*")) and (cache / "anchors-v1").is_dir()
    assert plain_work == cold_work and cold_work["decode"] > 0
    assert warm_work == {"encode": 0, "decode": 0} and warm_notes == []
    assert any(e["codec"] == "jpeg" and e["fid"] is not None for e in plain.aggregate)  # FID went through the cache
    for result in (cold, warm):
        assert untimed(result.rows) == untimed(plain.rows)
        assert untimed(result.aggregate) == untimed(plain.aggregate)
        assert result.bd == plain.bd
    for name in ("bd.json", "rd.png"):
        reference = (tmp_path / "plain" / name).read_bytes()
        assert (tmp_path / "cold" / name).read_bytes() == reference == (tmp_path / "warm" / name).read_bytes()
    reference = untimed(json.loads((tmp_path / "plain" / "aggregate.json").read_text()))
    assert untimed(json.loads((tmp_path / "warm" / "aggregate.json").read_text())) == reference

    damaged = sorted(cache.rglob("jpeg-q50-*.safetensors"))[0]
    damaged.write_bytes(b"\x00" * 40)
    again, again_work, again_notes = run_eval("damaged", cache)
    assert len(again_notes) == 1 and str(damaged) in again_notes[0] and "ignored" in again_notes[0]
    assert again_work == {"encode": 1, "decode": 1}  # that one row scored again
    assert untimed(again.rows) == untimed(plain.rows)
    assert damaged.stat().st_size > 40  # rewritten whole


def test_another_feature_network_scores_the_anchors_again(tmp_path, ladder, fid_images, no_weights, counted):
    kwargs = dict(progress=False, anchors=("jpeg",), ladders={"jpeg": (20,)}, max_images=1, say=lambda m: None,
                  anchor_cache=tmp_path / "cache")
    evaluate(ladder[:1], fid_images, tmp_path / "a", feature_extractor=PatchFeatures(0), **kwargs)
    first = dict(counted)
    evaluate(ladder[:1], fid_images, tmp_path / "b", feature_extractor=PatchFeatures(0), **kwargs)
    assert counted == first  # same network: all anchors from the cache
    evaluate(ladder[:1], fid_images, tmp_path / "c", feature_extractor=PatchFeatures(1), **kwargs)
    assert counted["decode"] == 2 * first["decode"] > 0  # another network: every anchor row scored again


def open_cache(folder: Path, networks=None, say=None) -> AnchorCache:
    return AnchorCache.open(folder, networks or {"features": PatchFeatures(0)}, torch.device("cpu"),
                            say or (lambda m: None))


VALUES = {"bytes": 1234, "bpp": 0.123456789012345, "psnr": float("inf"), "ms_ssim": 0.987654321, "ms_ssim_scales": 5,
          "lpips": None, "dists": 0.1 + 0.2}


def test_entries_round_trip_exactly_and_every_key_part_misses(tmp_path, monkeypatch):
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    digest = image_digest(image)
    features = torch.randn(3, 6, dtype=torch.float64)
    cache = open_cache(tmp_path)
    cache.put(digest, "jpeg", 10, dict(VALUES, extra="not stored"), features)
    cache.put(digest, "webp", 10, VALUES, None)
    values, read = cache.get(digest, "jpeg", 10)
    assert values == VALUES and torch.equal(read, features) and read.dtype == torch.float64
    assert cache.get(digest, "webp", 10) == (VALUES, None)
    assert set(values) == set(SCORE_FIELDS)

    other_pixels = image.clone()
    other_pixels[0, 0, 0] ^= 1
    assert cache.get(digest, "jpeg", 11) is None  # another quality
    assert cache.get(image_digest(other_pixels), "jpeg", 10) is None  # one pixel differs
    assert image_digest(image.reshape(3, 24, 20)) != digest  # same bytes, other shape
    changed = PatchFeatures(0)
    with torch.no_grad():
        changed.conv.bias[0] += 1e-6
    assert module_digest(changed) != module_digest(PatchFeatures(0))
    assert open_cache(tmp_path, {"features": changed}).get(digest, "jpeg", 10) is None  # another network
    assert open_cache(tmp_path, {"features": None}).get(digest, "jpeg", 10) is None  # no network
    assert open_cache(tmp_path).get(digest, "jpeg", 10) is not None  # the same again: found
    real = cache_module.codec_environment
    monkeypatch.setattr(cache_module, "codec_environment", lambda codec: dict(real(codec), library="0.0"))
    assert open_cache(tmp_path).get(digest, "jpeg", 10) is None  # another encoder library
    monkeypatch.setattr(cache_module, "codec_environment", real)
    monkeypatch.setattr(cache_module, "METRIC_CODE_VERSION", cache_module.METRIC_CODE_VERSION + 1)
    assert open_cache(tmp_path).get(digest, "jpeg", 10) is None  # onedc's scoring code changed


def test_lpips_weight_files_are_part_of_the_key(tmp_path):
    """Two AlexNet files (RANDOM weights, tests only) differing in one value give two keys."""
    from torchvision.models import alexnet

    from onedc.eval import ALEXNET_FILE, PerceptualMetrics

    state = {f"features.{k}": v for k, v in alexnet().features.state_dict().items()}
    digests = []
    for name, delta in (("a", 0.0), ("b", 1e-3)):
        (tmp_path / name).mkdir()
        torch.save(dict(state, **{"features.0.bias": state["features.0.bias"] + delta}), tmp_path / name / ALEXNET_FILE)
        metrics = PerceptualMetrics.load(tmp_path / name)
        digests.append(module_digest(metrics.networks()["lpips"]))
    assert digests[0] != digests[1]


def test_damaged_or_foreign_files_are_ignored_with_a_warning(tmp_path):
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    digest = image_digest(image)
    notes: list[str] = []
    cache = open_cache(tmp_path, say=notes.append)
    cache.put(digest, "jpeg", 10, VALUES, None)
    cache.put_sizes(digest, "jpeg", {10: 1234})
    (entry,) = tmp_path.rglob("jpeg-q10-*.safetensors")
    (sizes,) = tmp_path.rglob("jpeg-sizes-*.json")
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])  # truncated
    sizes.write_text("{not json")
    assert cache.get(digest, "jpeg", 10) is None and cache.sizes(digest, "jpeg") == {}
    assert len(notes) == 2 and all(n.startswith("warning: anchor cache entry") for n in notes)
    assert str(entry) in notes[0] and str(sizes) in notes[1]
    # A file holding another key (copied by hand) is foreign: ignored too.
    cache.put(digest, "jpeg", 20, VALUES, None)
    (other,) = tmp_path.rglob("jpeg-q20-*.safetensors")
    entry.write_bytes(other.read_bytes())
    assert cache.get(digest, "jpeg", 10) is None and "key differs" in notes[-1]


def test_two_writers_at_once_leave_readable_entries_and_merged_sizes(tmp_path):
    """Two evaluations sharing the folder: atomic renames, sizes merged; a killed writer's temp file is inert."""
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    digest = image_digest(image)
    first, second = open_cache(tmp_path), open_cache(tmp_path)
    first.put(digest, "webp", 5, VALUES, torch.ones(2, 6, dtype=torch.float64))
    second.put(digest, "webp", 5, VALUES, torch.ones(2, 6, dtype=torch.float64))
    first.put_sizes(digest, "webp", {5: 100, 7: 120})
    second.put_sizes(digest, "webp", {6: 110})
    (entry,) = tmp_path.rglob("webp-q5-*.safetensors")
    (entry.parent / f".{entry.name}.999999.0123abcd.tmp").write_bytes(b"half a file")
    assert first.get(digest, "webp", 5)[0] == VALUES
    assert second.sizes(digest, "webp") == {5: 100, 6: 110, 7: 120}


def test_read_only_cache_folder_warns_once_and_evaluates_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    notes: list[str] = []
    cache = open_cache(blocker, say=notes.append)
    digest = image_digest(torch.zeros(3, 4, 4, dtype=torch.uint8))
    cache.put(digest, "jpeg", 1, VALUES, None)
    cache.put(digest, "jpeg", 2, VALUES, None)
    assert cache.get(digest, "jpeg", 1) is None
    assert len(notes) == 1 and "not written" in notes[0]


def test_cli_anchor_cache_flags(tmp_path, ladder, image_dir, no_weights, monkeypatch):
    default = tmp_path / "default-cache"
    monkeypatch.setenv("ONEDC_CACHE_DIR", str(default))
    common = ["eval", "--ckpt", str(ladder[0]), str(image_dir), "--max-images", "1", "--anchors", "jpeg"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*common, "-o", str(tmp_path / "a"), "--no-anchor-cache"]) == 0
        assert not default.exists()
        assert main([*common, "-o", str(tmp_path / "b"), "--anchor-cache", str(tmp_path / "mine")]) == 0
        assert list((tmp_path / "mine").rglob("jpeg-q*.safetensors")) and not default.exists()
        assert main([*common, "-o", str(tmp_path / "c")]) == 0
    assert list(default.rglob("jpeg-q*.safetensors"))
    assert (tmp_path / "a" / "per_image.csv").read_text().count("jpeg") == (
        tmp_path / "c" / "per_image.csv").read_text().count("jpeg")
