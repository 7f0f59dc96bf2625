"""Trainable-only training checkpoints (trainer.trainable_only_checkpoints=true): last.ckpt holds what trains and
the optimizer state, names the frozen parts by identity, resumes bit-identically, and refuses a changed or
missing frozen part with one line. Every stage of the light family and the published family's latent stage."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from onedc.errors import CheckpointError
from onedc.training import build, pipeline
from onedc.training.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reference_stages import LATENT, reference_cfg  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bitstream"))
from test_reference_bundle import imported, small_model_config  # noqa: E402,F401

BASE = ["model=tiny_random", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128",
        "trainer.logger=none", "data.val_crop_size=128", "stage.val_every_n_steps=100",
        "stage.checkpoint_every_n_steps=2", "trainer.trainable_only_checkpoints=true"]
STAGES = {
    "distill": ["stage=distill", "stage.warmup_steps=1"],
    "latent": ["stage=latent", "stage.image_every_n_steps=null", "stage.ema_decay=0.5", "stage.lr=1e-3"],
    "finetune": ["stage=finetune", "stage.image_every_n_steps=null", "stage.lpips.random_backbone=true",
                 "stage.gan_start_step=1", "stage.lr=1e-3"],
    "dmd": ["stage=dmd", "stage.image_every_n_steps=null", "stage.lpips.random_backbone=true",
            "stage.generator_every=2", "stage.lr=1e-3", "stage.guidance_lr=1e-3"],
}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _run(overrides: list[str], run_dir: Path, steps: int):
    return pipeline.run(compose(BASE + overrides + [f"run_dir={run_dir}", f"trainer.max_steps={steps}"]))[0]


@pytest.mark.parametrize("stage", list(STAGES))
def test_trainable_only_checkpoint_resumes_bit_identically(stage, request, tmp_path):
    init = [] if stage == "distill" else [f"init_from={request.getfixturevalue('distill_ckpt' if stage == 'latent' else 'latent_ckpt')}"]
    overrides = STAGES[stage] + init
    whole = _run(overrides, tmp_path / "a", 4)
    _run(overrides, tmp_path / "b", 2)
    sdir = tmp_path / "b" / stage
    last = _load(sdir / "checkpoints" / "last.ckpt")
    frozen = last["onedc"]["frozen"]
    full = _load(whole.final_ckpt)["state_dict"]  # final.ckpt stays whole
    left_out = set(full) - set(last["state_dict"])
    assert "vae" in frozen and len(left_out) == sum(info["count"] for info in frozen.values())
    assert {k.split(".", 1)[0] for k in left_out} == set(frozen)
    assert all(len(info["hash"]) == 64 for info in frozen.values())
    assert last["optimizer_states"]
    if stage != "distill":
        assert frozen["codec"]["source"].startswith("init_from:")
    (sdir / pipeline.DONE_MARKER).unlink()
    resumed = _run(overrides, tmp_path / "b", 4)
    a, b = full, _load(resumed.final_ckpt)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_frozen_parts_are_left_out_and_counted(latent_ckpt, tmp_path):
    result = _run(STAGES["latent"] + [f"init_from={latent_ckpt}"], tmp_path, 2)
    last = _load(result.run_dir / "checkpoints" / "last.ckpt")
    final = _load(result.final_ckpt)["state_dict"]
    frozen = last["onedc"]["frozen"]
    vae_params = [k for k in final if k.startswith("vae.")]
    assert not any(k.startswith("vae.") for k in last["state_dict"]) and frozen["vae"]["count"] == len(vae_params)
    codec_left = [k for k in last["state_dict"] if k.startswith("codec.")]  # the frozen codec's buffers only
    assert frozen["codec"]["count"] + len(codec_left) == sum(k.startswith("codec.") for k in final)
    assert frozen["codec"]["count"] > len(codec_left)
    assert any(k.startswith("generator.") for k in last["state_dict"])
    assert result.final_ckpt.stat().st_size < (result.run_dir / "checkpoints" / "last.ckpt").stat().st_size * 10


def test_a_changed_or_missing_frozen_source_is_refused(distill_ckpt, tmp_path, monkeypatch):
    source = tmp_path / "init.ckpt"
    source.write_bytes(distill_ckpt.read_bytes())
    overrides = STAGES["latent"] + [f"init_from={source}"]
    _run(overrides, tmp_path / "run", 2)
    (tmp_path / "run" / "latent" / pipeline.DONE_MARKER).unlink()
    # Changed: the init_from file now holds other codec weights.
    checkpoint = _load(source)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("codec.") and k.endswith("weight"))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1.0
    torch.save(checkpoint, source)
    with pytest.raises(CheckpointError) as err:
        _run(overrides, tmp_path / "run", 4)
    assert "\n" not in str(err.value) and "'codec.'" in str(err.value) and "hash" in str(err.value)
    # Missing: the file is gone.
    source.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        _run(STAGES["latent"], tmp_path / "run", 4)
    # A part built from the config whose weights changed (as a pretrained dir overwritten in place would).
    d = tmp_path / "d"
    _run(STAGES["distill"], d, 2)
    (d / "distill" / pipeline.DONE_MARKER).unlink()
    original = build.vae_from_config

    def other_vae(*args, **kwargs):
        vae = original(*args, **kwargs)
        with torch.no_grad():
            next(vae.parameters()).add_(1e-3)
        return vae

    monkeypatch.setattr(build, "vae_from_config", other_vae)
    with pytest.raises(CheckpointError, match="'vae.'"):
        _run(STAGES["distill"], d, 4)


def test_the_published_family_resumes_from_trainable_only(imported, tmp_path):
    steps = ["trainer.trainable_only_checkpoints=true", "stage.checkpoint_every_n_steps=2", "stage.val_every_n_steps=100"]
    whole = pipeline.run(reference_cfg(LATENT + steps + ["trainer.max_steps=4"], tmp_path / "a", imported))[0]
    pipeline.run(reference_cfg(LATENT + steps + ["trainer.max_steps=2"], tmp_path / "b", imported))
    last = _load(tmp_path / "b" / "latent" / "checkpoints" / "last.ckpt")
    assert set(last["onedc"]["frozen"]) == {"vae", "codec", "generator"}  # generator: the UNet base under LoRA
    assert not any(".base_layer." in k for k in last["state_dict"])
    (tmp_path / "b" / "latent" / pipeline.DONE_MARKER).unlink()
    resumed = pipeline.run(reference_cfg(LATENT + steps + ["trainer.max_steps=4"], tmp_path / "b", imported))[0]
    a, b = _load(whole.final_ckpt)["state_dict"], _load(resumed.final_ckpt)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
