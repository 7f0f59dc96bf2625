"""Trainable-only checkpoints, the default (trainer.trainable_only_checkpoints): every checkpoint a stage writes,
last/step/best and final.ckpt, holds what trains (plus the optimizer state) and names each frozen part that a file
holds by identity (keys, sha256 of the tensors, absolute source); resume is bit-identical; readers (init_from of
the next stage, OneDCCodec, export) fill the parts back from their sources, recursively through a chain of
trainable-only final.ckpt files, and refuse a missing or changed source with one line.

The embedded default (model=tiny) is used: its VAE is a shipped file (asset:tiny_vae), so every stage leaves it
out; the codec of the later stages comes from init_from. Seeded parts (tiny_random's VAE, the dmd stage's random
real score UNet) stay in the file. Every stage of the light family and the published family's latent stage.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from onedc.coding.bundle import OneDCCodec
from onedc.coding.checkpoints import read_full_checkpoint, read_weights
from onedc.coding.export import export_inference_weights
from onedc.datamodules import load_image, sample_photo_paths
from onedc.errors import CheckpointError
from onedc.training import build, pipeline
from onedc.training.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reference_stages import LATENT, reference_cfg  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bitstream"))
from test_reference_bundle import imported, small_model_config  # noqa: E402,F401

BASE = ["trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128",
        "trainer.logger=none", "data.val_crop_size=128", "stage.val_every_n_steps=100",
        "stage.checkpoint_every_n_steps=2"]
STAGES = {
    "distill": ["stage=distill", "stage.warmup_steps=1"],
    "latent": ["stage=latent", "stage.image_every_n_steps=null", "stage.ema_decay=0.5", "stage.lr=1e-3"],
    "finetune": ["stage=finetune", "stage.image_every_n_steps=null", "stage.lpips.random_backbone=true",
                 "stage.gan_start_step=1", "stage.lr=1e-3"],
    "dmd": ["stage=dmd", "stage.image_every_n_steps=null", "stage.lpips.random_backbone=true",
            "stage.generator_every=2", "stage.lr=1e-3", "stage.guidance_lr=1e-3"],
}
VAE_SOURCE = "model.vae.pretrained:asset:tiny_vae"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _run(overrides: list[str], run_dir: Path, steps: int, model: str = "tiny"):
    return pipeline.run(compose([f"model={model}"] + BASE + overrides + [f"run_dir={run_dir}", f"trainer.max_steps={steps}"]))[0]


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory) -> dict[str, Path]:
    """final.ckpt of a 2-step distill run of model=tiny and of a 2-step latent run initialised from it."""
    root = tmp_path_factory.mktemp("chain")
    distill = _run(STAGES["distill"], root / "d", 2).final_ckpt
    latent = _run(STAGES["latent"] + [f"init_from={distill}"], root / "l", 2).final_ckpt
    return {"distill": distill, "latent": latent}


def _init(stage: str, chain: dict[str, Path]) -> list[str]:
    return [] if stage == "distill" else [f"init_from={chain['distill' if stage == 'latent' else 'latent']}"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stage", list(STAGES))
def test_trainable_only_checkpoints_resume_bit_identically(stage, tiny_chain, tmp_path):
    overrides = STAGES[stage] + _init(stage, tiny_chain)
    whole = _run(overrides, tmp_path / "a", 4)
    _run(overrides, tmp_path / "b", 2)
    sdir = tmp_path / "b" / stage
    last = _load(sdir / "checkpoints" / "last.ckpt")
    frozen = last["onedc"]["frozen"]
    filled = read_full_checkpoint(sdir / "checkpoints" / "last.ckpt")["state_dict"]
    left_out = set(filled) - set(last["state_dict"])
    assert left_out == {k for info in frozen.values() for k in info["keys"]}
    assert len(left_out) == sum(info["count"] for info in frozen.values())
    assert all(len(info["hash"]) == 64 for info in frozen.values()) and last["optimizer_states"]
    assert frozen["vae"]["source"] == VAE_SOURCE
    if stage != "distill":  # the frozen codec, from the init_from file (absolute)
        assert frozen["codec"]["source"] == f"init_from:{tiny_chain['distill' if stage == 'latent' else 'latent'].resolve()}"
        assert frozen["codec"]["source_file"]["sha256"] and frozen["codec"]["source_file"]["bytes"] > 0
    if stage == "dmd":  # the real score UNet is drawn from a seed here (guidance.real_pretrained=null): kept
        assert "guidance" not in frozen and any(k.startswith("guidance.real_unet.") for k in last["state_dict"])
    # final.ckpt is trainable-only too, and names the same parts.
    final = _load(whole.final_ckpt)
    assert final["onedc"]["frozen"].keys() == frozen.keys() and not any(k.startswith("vae.") for k in final["state_dict"])
    (sdir / pipeline.DONE_MARKER).unlink()
    resumed = _run(overrides, tmp_path / "b", 4)
    _same(final["state_dict"], _load(resumed.final_ckpt)["state_dict"])
    _same(read_full_checkpoint(whole.final_ckpt)["state_dict"], read_full_checkpoint(resumed.final_ckpt)["state_dict"])


def test_a_trainable_only_chain_equals_whole_checkpoints(tiny_chain, tmp_path):
    """finetune initialised from latent's trainable-only final.ckpt (whose codec names distill's final.ckpt): its
    final.ckpt, read back through two init_from files, equals bit for bit the one a run of whole checkpoints writes,
    and it compresses and decodes as the whole one does."""
    whole_dir = tmp_path / "whole"
    whole = [_run(STAGES["distill"] + ["trainer.trainable_only_checkpoints=false"], whole_dir, 2).final_ckpt]
    whole.append(_run(STAGES["latent"] + [f"init_from={whole[0]}", "trainer.trainable_only_checkpoints=false"],
                      whole_dir, 2).final_ckpt)
    whole.append(_run(STAGES["finetune"] + [f"init_from={whole[1]}", "trainer.trainable_only_checkpoints=false"],
                      whole_dir, 2).final_ckpt)
    slim = _run(STAGES["finetune"] + [f"init_from={tiny_chain['latent']}"], tmp_path / "slim", 2).final_ckpt
    assert "frozen" not in _load(whole[2])["onedc"]
    stored = _load(slim)
    assert stored["onedc"]["frozen"]["codec"]["source"] == f"init_from:{tiny_chain['latent'].resolve()}"
    # latent's final.ckpt holds no frozen codec weights either: the finetune codec comes from distill's, two files up.
    assert _load(tiny_chain["latent"])["onedc"]["frozen"]["codec"]["source"] == f"init_from:{tiny_chain['distill'].resolve()}"
    _same(read_full_checkpoint(whole[2])["state_dict"], read_full_checkpoint(slim)["state_dict"])
    assert slim.stat().st_size < 0.8 * whole[2].stat().st_size
    photo = load_image(sample_photo_paths()["astronaut"])[:, 100:228, 60:188]
    files = [OneDCCodec.from_checkpoint(path).compress_images([photo])[0] for path in (whole[2], slim)]
    assert files[0] == files[1]


def test_readers_refuse_a_missing_or_changed_source_with_one_line(tiny_chain, tmp_path):
    source = tmp_path / "init.ckpt"
    source.write_bytes(tiny_chain["distill"].read_bytes())
    final = _run(STAGES["latent"] + [f"init_from={source}"], tmp_path / "run", 2).final_ckpt
    exported = export_inference_weights(final, tmp_path / "model.safetensors")
    OneDCCodec.from_checkpoint(final)
    # Changed: the init_from file now holds other codec weights.
    checkpoint = _load(source)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("codec.") and k.endswith("weight"))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1.0
    torch.save(checkpoint, source)
    for read in (OneDCCodec.from_checkpoint, read_weights,
                 lambda path: _run(STAGES["finetune"] + [f"init_from={path}"], tmp_path / "next", 1)):
        with pytest.raises(CheckpointError) as err:
            read(final)
        text = str(err.value)
        assert "\n" not in text and "'codec.'" in text and str(source.resolve()) in text and "other weights" in text
        assert "the file itself changed" in text
    # Missing: the file is gone.
    source.unlink()
    with pytest.raises(CheckpointError) as err:
        OneDCCodec.from_checkpoint(final)
    assert "\n" not in str(err.value) and "'codec.'" in str(err.value) and "missing" in str(err.value)
    # The exported file is self-contained: it decodes without the source.
    OneDCCodec.from_checkpoint(exported)


def test_a_changed_or_missing_frozen_source_refuses_resume(tiny_chain, tmp_path, monkeypatch):
    source = tmp_path / "init.ckpt"
    source.write_bytes(tiny_chain["distill"].read_bytes())
    overrides = STAGES["latent"] + [f"init_from={source}"]
    _run(overrides, tmp_path / "run", 2)
    (tmp_path / "run" / "latent" / pipeline.DONE_MARKER).unlink()
    checkpoint = _load(source)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("codec.") and k.endswith("weight"))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1.0
    torch.save(checkpoint, source)
    with pytest.raises(CheckpointError) as err:
        _run(overrides, tmp_path / "run", 4)
    assert "\n" not in str(err.value) and "'codec.'" in str(err.value) and "hash" in str(err.value)
    source.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        _run(STAGES["latent"], tmp_path / "run", 4)
    # A part built from its pretrained source whose weights changed (as a file overwritten in place would).
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


def test_seeded_parts_stay_and_whole_checkpoints_stay_whole(tmp_path):
    """tiny_random's VAE is drawn from a seed: no file holds it, so its checkpoints keep it (nothing else is frozen in
    distill); with trainable_only_checkpoints=false every file holds every weight and names no part."""
    seeded = _run(STAGES["distill"], tmp_path / "s", 2, model="tiny_random")
    for path in (seeded.final_ckpt, seeded.run_dir / "checkpoints" / "last.ckpt"):
        stored = _load(path)
        assert "frozen" not in stored["onedc"] and any(k.startswith("vae.") for k in stored["state_dict"])
    whole = _run(STAGES["distill"] + ["trainer.trainable_only_checkpoints=false"], tmp_path / "w", 2)
    assert "frozen" not in _load(whole.final_ckpt)["onedc"]
    assert any(k.startswith("vae.") for k in _load(whole.final_ckpt)["state_dict"])


def test_the_published_family_resumes_from_trainable_only(imported, tmp_path):
    steps = ["stage.checkpoint_every_n_steps=2", "stage.val_every_n_steps=100"]
    whole = pipeline.run(reference_cfg(LATENT + steps + ["trainer.max_steps=4"], tmp_path / "a", imported))[0]
    pipeline.run(reference_cfg(LATENT + steps + ["trainer.max_steps=2"], tmp_path / "b", imported))
    last = _load(tmp_path / "b" / "latent" / "checkpoints" / "last.ckpt")
    assert set(last["onedc"]["frozen"]) == {"vae", "codec", "generator"}  # generator: the UNet base under LoRA
    assert not any(".base_layer." in k for k in last["state_dict"])
    assert not any(".base_layer." in k for k in _load(whole.final_ckpt)["state_dict"])
    (tmp_path / "b" / "latent" / pipeline.DONE_MARKER).unlink()
    resumed = pipeline.run(reference_cfg(LATENT + steps + ["trainer.max_steps=4"], tmp_path / "b", imported))[0]
    _same(read_full_checkpoint(whole.final_ckpt)["state_dict"], read_full_checkpoint(resumed.final_ckpt)["state_dict"])
    OneDCCodec.from_checkpoint(resumed.final_ckpt)


def test_a_pretrained_unet_under_lora_is_read_back_from_its_file(tiny_chain, tmp_path):
    """model.generator.pretrained (a UNet state-dict file) with LoRA: the frozen UNet base is named by the file,
    left out of final.ckpt, rebuilt from it by the family on reading (equal to a whole run's weights), and a file
    overwritten with other weights is refused with one line."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet_file = tmp_path / "unet.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        unet = UNet2DConditionModel(**dict(compose(["model=tiny"]).model.generator.unet))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unet_file))
    overrides = STAGES["latent"] + [f"init_from={tiny_chain['distill']}", "model.generator.init=null",
                                    f"model.generator.pretrained={unet_file}",
                                    "model.generator.lora={rank: 4, alpha: 4, target_modules: [to_q, to_k, to_v]}"]
    whole = _run(overrides + ["trainer.trainable_only_checkpoints=false"], tmp_path / "w", 2).final_ckpt
    slim = _run(overrides, tmp_path / "s", 2).final_ckpt
    frozen = _load(slim)["onedc"]["frozen"]
    assert frozen["generator"]["source"] == f"model.generator.pretrained:{unet_file.resolve()}"
    assert any(".base_layer." in k for k in frozen["generator"]["keys"])
    assert not any(".base_layer." in k for k in _load(slim)["state_dict"])
    _same(_load(whole)["state_dict"], read_full_checkpoint(slim)["state_dict"])
    save_file({k: v.contiguous() + 0.01 for k, v in unet.state_dict().items()}, str(unet_file))
    with pytest.raises(CheckpointError) as err:
        OneDCCodec.from_checkpoint(slim)
    assert "\n" not in str(err.value) and "'generator.'" in str(err.value) and str(unet_file.resolve()) in str(err.value)
