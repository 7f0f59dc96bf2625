"""Every training source (hf, webdataset, streaming, folder): exact resume, rank splits, bad samples, captions."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from source_helpers import batch_hash, build_all, build_folder, data_overrides  # noqa: E402

from onedc.datamodules.source_data import (AuthorsCropProtocol, GlobalOrderSampler, Position,  # noqa: E402
                                           SourceDataModule, position_after)
from onedc.errors import ConfigError, DataError  # noqa: E402

pytest.importorskip("datasets")
pytest.importorskip("wids")
pytest.importorskip("streaming")

SHARDED = ("hf", "webdataset", "streaming")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    return build_all(tmp_path_factory.mktemp("sources"))


def _module(kind, paths, *, step=0, world=1, rank=0, batch_size=4, state=None, workers=0, **kw):
    dm = SourceDataModule(crop_size=32, batch_size=batch_size, num_workers=workers, seed=3,
                          **data_overrides(kind, paths), **kw)
    dm.setup()
    if state is not None:
        dm.load_state_dict(state)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=step, accumulate_grad_batches=1,
                                 accelerator=None, logger=None)
    return dm


def _hashes(loader, epochs):
    out = []
    for _ in range(epochs):
        out.extend(batch_hash(b) for b in loader)
    return out


@pytest.mark.parametrize("kind", SHARDED)
def test_kill_and_resume_gives_the_uninterrupted_batch_sequence(kind, paths, tmp_path):
    """24 samples, batch 4: 6 batches an epoch; killed after 4, resumed from the saved state, 2 workers."""
    whole = _hashes(_module(kind, paths, workers=2).train_dataloader(), epochs=2)
    assert len(whole) == 12 and len(set(whole)) == 12
    first = _module(kind, paths, workers=2)
    loader = first.train_dataloader()
    done = [batch_hash(b) for _, b in zip(range(4), loader)]
    torch.save(first.state_dict(), tmp_path / "state.pt")  # what the checkpoint holds
    del loader
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    resumed = _module(kind, paths, step=4, state=state, workers=2).train_dataloader()
    rest = _hashes(resumed, epochs=2)  # the rest of epoch 0, then all of epoch 1
    assert done + rest == whole


@pytest.mark.parametrize("kind", SHARDED)
def test_two_ranks_split_an_epoch_without_overlap_or_gap(kind, paths):
    keys = []
    for rank in range(2):
        loader = _module(kind, paths, world=2, rank=rank, batch_size=3).train_dataloader()
        keys.append([k for b in loader for k in b["key"]])
    assert len(keys[0]) == len(keys[1]) == 12
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 24


def test_resume_on_another_world_size_continues_at_the_exact_sample():
    """Sampler level: 2 ranks x 3 for 3 steps, then 3 ranks x 2: the union of the run's batches is every sample once."""
    length, seen = 36, []
    for rank in range(2):
        sampler = GlobalOrderSampler(length, batch_size=3, seed=1, rank=rank, world_size=2)
        seen += [i for _, batch in zip(range(3), sampler) for i, _, _ in batch]
    now = position_after(Position(), 3, length, 6)  # the old run's anchor advanced to step 3
    assert now == Position(3, 0, 18)
    for rank in range(3):
        sampler = GlobalOrderSampler(length, batch_size=2, seed=1, rank=rank, world_size=3, start=now)
        seen += [i for batch in sampler for i, _, _ in batch]
    assert sorted(seen) == list(range(length))


def test_changed_source_length_is_refused_with_one_line(paths):
    state = _module("hf", paths).state_dict()
    state["length"] = 25
    dm = _module("hf", paths, step=2, state=state)
    with pytest.raises(ConfigError, match="cannot resume the data order") as err:
        dm.train_dataloader()
    assert "\n" not in str(err.value)


def test_position_restore_is_constant_time_at_scale():
    """10M samples, 64 ranks x 8 per batch, a million steps in: one arithmetic step, not a replay."""
    pos = position_after(Position(), 1_000_000, 10_000_000, 512)
    per_epoch = 10_000_000 // 512
    assert pos == Position(1_000_000, 1_000_000 // per_epoch, (1_000_000 % per_epoch) * 512)


@pytest.mark.parametrize("length", [1, 2, 3, 24, 1000, 4099])
def test_epoch_permutation_is_a_bijection_that_shuffles(length):
    from onedc.datamodules.source_data import EpochPermutation

    perm = EpochPermutation(length, key=7)
    order = [perm[p] for p in range(length)]
    assert sorted(order) == list(range(length))
    if length >= 1000:  # shuffled: few fixed points (expected 1) and another key gives another order
        assert sum(o == p for p, o in enumerate(order)) < 10
        assert order != [EpochPermutation(length, key=8)[p] for p in range(length)]


def test_commoncatalog_config_reads_a_datasets_cache_dir_by_config_alone(paths, tmp_path):
    """The authors' layout: arrow files deep in a cache dir, jpg / blip2_caption / unickname, first N files."""
    import datasets

    from onedc.training.build import build_datamodule
    from onedc.training.config import compose

    files = sorted(paths["folder"].glob("*.jpg"))
    table = datasets.Dataset.from_dict(
        {"jpg": [{"bytes": f.read_bytes(), "path": None} for f in files],
         "blip2_caption": [f.with_suffix(".txt").read_text() for f in files], "unickname": [f.stem for f in files]},
        features=datasets.Features({"jpg": datasets.Image(), "blip2_caption": datasets.Value("string"),
                                    "unickname": datasets.Value("string")}))
    cache = tmp_path / "cache" / "common-canvas___commoncatalog-cc-by-nd" / "default" / "0.0.0" / "abc123"
    cache.mkdir(parents=True)
    for i in range(3):  # 8 rows per arrow file, named as `datasets` names them
        table.select(range(8 * i, 8 * i + 8)).save_to_disk(str(tmp_path / f"part{i}"))
        arrow = next((tmp_path / f"part{i}").glob("*.arrow"))
        arrow.rename(cache / f"commoncatalog-cc-by-nd-train-{i:05d}-of-00003.arrow")
    (cache / "cache-0123.arrow").write_bytes(b"not data")  # a .map() cache file is not read
    cfg = compose(["data=commoncatalog", f"data.path={tmp_path / 'cache'}", "data.max_files=2",
                   "data.protocol.size=64", "data.protocol.small=32", "data.num_workers=0"])
    dm = build_datamodule(cfg.data, seed=0)
    dm.setup()
    assert len(dm.train_set) == 16 and dm.source.has_captions
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[-1] in (32, 64) and all(c.startswith("caption ") for c in batch["caption"])
    assert all(k.startswith("img0") and int(k[3:]) < 16 for k in batch["key"])


def test_all_four_sources_give_the_same_batches(paths):
    firsts = {kind: batch_hash(next(iter(_module(kind, paths).train_dataloader())))
              for kind in ("folder",) + SHARDED}
    assert len(set(firsts.values())) == 1, firsts


def test_captions_travel_with_the_batch_and_default_to_empty(paths, tmp_path):
    batch = next(iter(_module("webdataset", paths).train_dataloader()))
    assert all(c.startswith("caption ") for c in batch["caption"]) and len(batch["caption"]) == 4
    plain = build_folder(tmp_path / "plain", 8)
    for txt in plain.glob("*.txt"):
        txt.unlink()
    dm = SourceDataModule("folder", root=str(plain), crop_size=32, batch_size=4)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["caption"] == ["", "", "", ""]


def test_corrupt_image_inside_a_shard_is_skipped_and_counted(tmp_path):
    paths = build_all(tmp_path, bad={5})  # img005 is not a JPEG, inside the hf table and a tar
    for kind in ("hf", "webdataset"):
        dm = _module(kind, paths, workers=0, max_bad_fraction=0.1)
        logged = []
        dm.trainer.logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
        batches = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]  # as Lightning calls it
        assert len(batches) == 6 and all(b["image"].shape == (4, 3, 32, 32) for b in batches)
        assert dm.bad_count == 1 and dm.checked == 25
        assert "img005" in dm.bad_keys[0]  # hf names it by its key column, webdataset by shard/key
        assert len(logged) == 1 and logged[0]["data/bad_samples"] == 1.0  # the TensorBoard scalar


def test_mostly_bad_source_stops_with_one_line(tmp_path):
    folder = build_folder(tmp_path / "bad", 20, bad=set(range(2, 20)))
    dm = SourceDataModule("folder", root=str(folder), crop_size=32, batch_size=4, max_bad_fraction=0.2)
    dm.setup()
    with pytest.raises(DataError) as err:
        for batch in dm.train_dataloader():
            dm.on_after_batch_transfer(batch, 0)
    message = str(err.value)
    assert "\n" not in message and "max_bad_fraction=0.2" in message and ".jpg" in message


def test_authors_protocol_is_one_transform_per_batch_from_seed_and_step(paths):
    protocol = {"size": 64, "small": 32, "keep_batch": 2}
    dm = _module("streaming", paths, crop_protocol="authors", protocol=protocol)
    shapes = [tuple(b["image"].shape) for b in dm.train_dataloader()]
    modes = [AuthorsCropProtocol(**protocol).mode(3, g) for g in range(6)]
    expected = [(2, 3, 64, 64) if m == "keep" else (4, 3, 32, 32) for m in modes]
    assert shapes == expected
    draws = [AuthorsCropProtocol().mode(0, g) for g in range(4000)]
    for mode, p in (("resize", 0.2), ("crop", 0.5), ("keep", 0.3)):
        assert abs(draws.count(mode) / 4000 - p) < 0.03  # binomial sd <= 0.008


def test_make_shards_cli_writes_shards_and_refuses_an_existing_output(paths, tmp_path, capsys):
    from onedc.cli import main

    out = tmp_path / "mds"
    assert main(["make-shards", str(paths["hf"]), "-o", str(out), "--format", "mds", "--shard-size", "10",
                 "--caption-column", "text", "--key-column", "name", "-q"]) == 0
    assert "24 samples (24 with captions) in 3 mds shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds"]  # no temp dir left behind
    assert main(["make-shards", str(paths["folder"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "never overwrites" in err


def _train_args(kind, paths, run_dir):
    source = {"hf": [f"data.path={paths['hf']}", "data.caption_column=text"],
              "webdataset": [f"data.shards={paths['webdataset'] / 'index.wids.json'}"],
              "streaming": [f"data.path={paths['streaming']}"]}[kind]
    # random tiny VAE and teacher (no quick-training): the data path is what is under test
    return ["stage=distill", "model=tiny_random", "tokenizer=vq_tiny", f"data={kind}",
            *source, "data.crop_size=64", "data.batch_size=2",
            "data.num_workers=0", "stage.max_steps=2", f"run_dir={run_dir}", "trainer.logger=none",
            "trainer.enable_progress_bar=false"]


def test_train_py_runs_on_hf(paths, tmp_path):
    """The command line as the README shows it, in a subprocess."""
    proc = subprocess.run([sys.executable, "train.py", *_train_args("hf", paths, tmp_path / "run")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "distill" / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["SourceDataModule"]["source"] == "hf"


@pytest.mark.parametrize("kind", ["webdataset", "streaming"])
def test_training_runs_on_shards(kind, paths, tmp_path):
    """train.py's own entry (compose + run) in-process: the same pipeline without a second interpreter start."""
    from onedc.training.config import compose
    from onedc.training.pipeline import run

    result = run(compose(_train_args(kind, paths, tmp_path / "run")))[0]
    ckpt = torch.load(result.final_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["SourceDataModule"] == {
        "version": "onedc-source-order-v1", "seed": 0, "length": 24, "source": kind, "world_size": 1,
        "batch_size": 2, "anchor_batch": 0, "anchor_epoch": 0, "anchor_offset": 0}


@pytest.mark.slow
def test_lightning_kill_and_resume_on_shards_is_bit_identical(paths, tmp_path):
    """Through Lightning: 8 steps straight vs 4 + resume to 8 (6 batches an epoch, 2 workers): same weights."""
    from onedc.training.config import compose
    from onedc.training.pipeline import run

    def args(run_dir, steps):
        base = _train_args("streaming", paths, run_dir)
        return [a for a in base if not a.startswith(("stage.max_steps", "data.batch_size", "data.num_workers"))] + [
            f"stage.max_steps={steps}", "data.batch_size=4", "data.num_workers=2", "stage.checkpoint_every_n_steps=2"]

    whole = run(compose(args(tmp_path / "a", 8)))[0]
    run(compose(args(tmp_path / "b", 4)))
    (tmp_path / "b" / "distill" / "DONE.json").unlink()  # as if killed right after step 4
    resumed = run(compose(args(tmp_path / "b", 8)))[0]
    a = torch.load(whole.final_ckpt, map_location="cpu", weights_only=False)
    b = torch.load(resumed.final_ckpt, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_training_on_a_mostly_bad_source_stops_with_one_line(tmp_path):
    """Through Lightning's batch hook: the run stops with the DataError, not a traceback from a worker."""
    from onedc.training.config import compose
    from onedc.training.pipeline import run

    paths = build_all(tmp_path, bad=set(range(4, 24)))  # 20 of 24 images corrupt
    args = _train_args("hf", paths, tmp_path / "run") + ["data.max_bad_fraction=0.2", "data.min_checked=4"]
    with pytest.raises(DataError, match=r"samples of data=hf failed \(> data.max_bad_fraction=0.2\); e.g. hf\[\d+\] \(corrupt"):
        run(compose(args))


def test_checkpoint_state_resumes_on_another_number_of_ranks_at_the_exact_sample(paths):
    """2 ranks x 3 for 2 steps, checkpoint, then 3 ranks x 2: the epoch is covered once, nothing twice."""
    seen, state = [], None
    for rank in range(2):
        dm = _module("webdataset", paths, world=2, rank=rank, batch_size=3)
        seen += [k for _, b in zip(range(2), dm.train_dataloader()) for k in b["key"]]
        state = dm.state_dict()
    assert state["world_size"] == 2 and state["batch_size"] == 3
    for rank in range(3):
        dm = _module("webdataset", paths, world=3, rank=rank, batch_size=2, step=2, state=state)
        seen += [k for b in dm.train_dataloader() for k in b["key"]]  # the rest of epoch 0
    assert len(seen) == len(set(seen)) == 24
    assert dm.state_dict()["anchor_batch"] == 2 and dm.state_dict()["anchor_offset"] == 12  # the new anchor
