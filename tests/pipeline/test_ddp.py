"""DDP on the CPU (2 processes, gloo): a killed run resumes from its global step."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from pipeline_helpers import REPO, run_train, train_cmd

DDP = ["stage=distill", "trainer=ddp", "trainer.devices=2", "trainer.logger=none", "trainer.enable_progress_bar=false",
       "data.batch_size=2", "data.crop_size=128", "stage.max_steps=24", "stage.val_every_n_steps=12", "stage.checkpoint_every_n_steps=2"]


@pytest.mark.slow
def test_ddp_run_killed_and_resumed_continues_from_its_step(tmp_path, free_master_port):
    args = [*DDP, f"run_dir={tmp_path}"]
    # A new session: the kill takes the rank-1 process Lightning spawned along with rank 0.
    # One thread per rank: two ranks beside another pytest worker on 2 cores otherwise crawl.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    last = tmp_path / "distill" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 480
    while time.time() < deadline and not last.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "distill" / "DONE.json").exists(), "killed too late"
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 24

    again = run_train(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming stage distill from" in again.stdout + again.stderr
    assert json.loads((tmp_path / "distill" / "DONE.json").read_text())["global_step"] == 24
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 24
