"""Every README command that needs no files of the user's own runs as written on the embedded
default (shortened with trainer.max_steps and small crops), with nothing downloaded; decoding on
a machine trains nothing; the full-size preset keeps LPIPS."""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest

import onedc.quicktrain.vae as vae_recipe
from onedc.training import pipeline
from onedc.cli import main as onedc_main
from onedc.training.config import compose
from onedc.datamodules import sample_photo_paths
from onedc.errors import WeightsError

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
RUN = "runs/tiny-vq_tiny"
# Appended to each train.py command: the same code paths, seconds instead of minutes.
SHORT = ["trainer.max_steps=2", "data.crop_size=128", "data.val_crop_size=128", "trainer.logger=none",
         "trainer.enable_progress_bar=false"]
TRAIN = [
    "python train.py stage=distill",
    f"python train.py stage=latent init_from={RUN}/distill/final.ckpt",
    f"python train.py stage=finetune init_from={RUN}/latent/final.ckpt",
    "python train.py stage=all",  # the three stages are done: it skips them
]
SMOKE = "python train.py experiment=smoke"
# photos/ and kodak/ stand for the user's folders (the README's names), a.ckpt b.ckpt c.ckpt for
# a lambda ladder: here the three stages' final checkpoints.
ONEDC = [
    f"onedc compress photos/ -o bits/ --ckpt {RUN}/finetune/final.ckpt",
    f"onedc decompress bits/ -o recon/ --ckpt {RUN}/finetune/final.ckpt",
    "onedc info bits/astronaut.onedc",
    f"onedc export {RUN}/finetune/final.ckpt -o codec.safetensors",
    "onedc eval --ckpt a.ckpt b.ckpt c.ckpt kodak/ -o eval/",
]


def _train_main():
    spec = importlib.util.spec_from_file_location("onedc_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_readme_lists_the_commands_this_test_runs():
    for command in TRAIN + [SMOKE] + ONEDC:
        assert command in README, f"README no longer shows: {command}"


def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = _train_main()
    for command in TRAIN:
        # The report on the full held-out photos takes a minute: it is checked below on a small one.
        overrides = ["stage.report=false"] if command.endswith("stage=all") else []
        assert train(shlex.split(command)[2:] + SHORT + overrides) == 0, command
    smoke = shlex.split(SMOKE)[2:] + SHORT + ["stage.report=false"]
    assert train(smoke) == 0 and Path("runs/smoke-tiny-vq_tiny/finetune/DONE.json").is_file()

    photos = sample_photo_paths()
    for folder, name in (("photos", "astronaut"), ("kodak", "chelsea")):
        Path(folder).mkdir()
        shutil.copy(photos[name], Path(folder) / photos[name].name)
    for ckpt, stage in zip(("a.ckpt", "b.ckpt", "c.ckpt"), ("distill", "latent", "finetune")):
        shutil.copy(Path(RUN, stage, "final.ckpt"), ckpt)
    # A machine that only decodes trains nothing and writes no cache.
    monkeypatch.setenv("ONEDC_CACHE", str(tmp_path / "empty-cache"))

    def no_training(*args, **kwargs):
        raise AssertionError("a command that loads a checkpoint trained the VAE")

    monkeypatch.setattr(vae_recipe, "quick_train_vae", no_training)
    for command in ONEDC:
        assert onedc_main(shlex.split(command)[1:]) == 0, command
    assert Path("recon/astronaut.png").is_file() and Path("codec.safetensors").is_file()
    assert Path("eval/rd.png").is_file() and not (tmp_path / "empty-cache").exists()

    # The end-of-chain report, on kodak/'s one small photo as the validation set.
    cfg = compose(["stage=all", "data=folder", "data.root=kodak", "data.val_root=kodak", "data.val_fraction=0",
                   f"run_dir={RUN}"])
    results = [pipeline.StageResult(s, Path(RUN, s), Path(RUN, s, "final.ckpt"), 2) for s in ("distill", "latent",
                                                                                              "finetune")]
    out = pipeline.report(cfg, results)
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["distill", "latent", "finetune"] and report["images"] == ["chelsea"]
    finetune = report["stages"]["finetune"]
    assert finetune["bpp"] == pytest.approx(Path(out, finetune["per_image"]["chelsea"]["file"]).stat().st_size * 8
                                            / (451 * 300))
    assert finetune["jpeg"]["per_image"]["chelsea"]["quality"] is not None and 5 < report["vae_only"]["psnr"] < 40
    assert all((out / name).stat().st_size > 10_000 for name in ("rd.png", "reconstructions.png"))


def test_model_preset_decides_lpips():
    assert compose(["stage=all"]).stage.finetune.lpips_weight == 0  # tiny: no AlexNet file needed
    cfg = compose(["stage=all", "model=sd15"])
    assert cfg.stage.finetune.lpips_weight == pytest.approx(0.625)
    with pytest.raises(WeightsError, match="alexnet-owt-7be5be79.pth"):
        pipeline.preflight(cfg, [cfg.stage[name] for name in cfg.stage.chain])
