"""Fault tolerance: kill and resume, skipping finished stages, corrupt checkpoints, run-dir rules."""
import json
import signal
import subprocess
import time

import pytest
import torch

from onedc.training.config import compose
from onedc.errors import CheckpointError, ConfigError
from onedc.training.pipeline import run

from pipeline_helpers import FAST, REPO, run_train, train_cmd

SINGLE = ["trainer.logger=none", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128",
          "stage.val_every_n_steps=6", "stage.checkpoint_every_n_steps=3", "stage.warmup_steps=2",
          "stage.lmbda_warmup_steps=4"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    whole = run(compose(SINGLE + [f"run_dir={tmp_path / 'a'}", "trainer.max_steps=12"]))[0]
    run(compose(SINGLE + [f"run_dir={tmp_path / 'b'}", "trainer.max_steps=6"]))
    (tmp_path / "b" / "distill" / "DONE.json").unlink()  # as if killed right after step 6
    resumed = run(compose(SINGLE + [f"run_dir={tmp_path / 'b'}", "trainer.max_steps=12"]))[0]
    assert whole.global_step == resumed.global_step == 12
    a, b = _weights(whole.final_ckpt), _weights(resumed.final_ckpt)
    assert a.keys() == b.keys()
    for key in a:  # same data order, same crops, same quantisation noise: bit-identical
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sigkill_mid_chain_then_rerun_skips_done_stage_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["stage=all", f"run_dir={run_dir}", "stage.chain=[distill,latent]", "stage.distill.max_steps=4",
            "stage.latent.max_steps=40", *FAST]
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latent_ckpts = run_dir / "latent" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (latent_ckpts / "last.ckpt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "distill" / "DONE.json").exists()
    assert not (run_dir / "latent" / "DONE.json").exists(), "killed too late: the stage had finished"
    distill_done = (run_dir / "distill" / "DONE.json").stat().st_mtime_ns
    killed_at = torch.load(latent_ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 40

    again = run_train(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "stage distill already finished at step 4" in log
    assert "resuming stage latent from" in log
    assert (run_dir / "distill" / "DONE.json").stat().st_mtime_ns == distill_done  # not re-run
    assert json.loads((run_dir / "latent" / "DONE.json").read_text())["global_step"] == 40

    # The same chain without the kill ends with the same weights.
    clean_dir = tmp_path / "clean"
    clean = run_train(*[a if not a.startswith("run_dir=") else f"run_dir={clean_dir}" for a in args])
    assert clean.returncode == 0, clean.stderr[-3000:]
    a, b = _weights(run_dir / "latent" / "final.ckpt"), _weights(clean_dir / "latent" / "final.ckpt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_corrupt_last_checkpoint_names_file_and_fallback(tmp_path):
    cfg = compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=6"])
    run(cfg)
    (tmp_path / "distill" / "DONE.json").unlink()
    last = tmp_path / "distill" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    with pytest.raises(CheckpointError) as err:
        run(compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=9"]))
    message = str(err.value)
    assert str(last) in message and "corrupt or truncated" in message
    assert "step=000006.ckpt" in message or "step=000003.ckpt" in message  # the intact fallback


def test_finished_stage_is_skipped_and_resume_never_refuses_existing_run(tmp_path):
    cfg = compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=3"])
    first = run(cfg)[0]
    again = run(cfg)[0]
    assert again.skipped and again.global_step == first.global_step == 3
    with pytest.raises(ConfigError, match="overwrite=true"):
        run(compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=3", "resume=never"]))
    fresh = run(compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=2", "resume=never", "overwrite=true"]))[0]
    assert not fresh.skipped and fresh.global_step == 2


def test_init_from_and_explicit_resume_are_exclusive(tmp_path):
    cfg = compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=3"])
    done = run(cfg)[0]
    with pytest.raises(ConfigError, match="mutually exclusive"):
        run(compose(SINGLE + [f"run_dir={tmp_path / 'x'}", f"init_from={done.final_ckpt}",
                              f"resume={done.final_ckpt}"]))


def test_resuming_with_another_teacher_is_refused(tmp_path):
    cfg = compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=3"])
    run(cfg)
    (tmp_path / "distill" / "DONE.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer=vq_tiny"):
        run(compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=6", "tokenizer=timm_vit_tiny"]))


def test_init_from_a_checkpoint_with_another_vae_is_refused(tmp_path):
    done = run(compose(SINGLE + [f"run_dir={tmp_path}", "trainer.max_steps=2"]))[0]
    with pytest.raises(CheckpointError, match="model.vae"):
        run(compose(["trainer.logger=none", f"run_dir={tmp_path / 'other'}", "stage=latent",
                     f"init_from={done.final_ckpt}", "model.vae.pretrained=null", "trainer.max_steps=2"]))
