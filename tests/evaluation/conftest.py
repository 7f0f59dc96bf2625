"""Fixtures of the evaluation tests: untrained tiny checkpoints (a 2-point λ ladder, one with a
generator) and a folder of small photo crops."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image


def save_bundle(bundle, model_config: dict, path: Path, stage: str) -> Path:
    """Write an inference bundle as a stage-style checkpoint (its state dict has the stage prefixes)."""
    torch.save({"state_dict": bundle.state_dict(),
                "onedc": {"format": 1, "stage": stage, "model": model_config, "tokenizer": {"name": "vq_tiny"}}}, path)
    return path


def write_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture(scope="session")
def model_config() -> dict:
    from omegaconf import OmegaConf

    from onedc.training.config import compose

    return OmegaConf.to_container(compose(["model=tiny_random"]).model, resolve=True)


@pytest.fixture(scope="session")
def ladder(tmp_path_factory, model_config) -> list[Path]:
    """Two untrained checkpoints whose y spreads over fewer bins than a fresh codec's (last g_a
    layer scaled by 1/25 and 10/25), so that both JPEG and WebP can reach their bpp; the
    high one's y carries ~30x more bits than the low one's."""
    from onedc.coding.bundle import OneDCCodec
    from onedc.modules.light.codec import Y_INIT_GAIN

    folder = tmp_path_factory.mktemp("ladder")
    low = OneDCCodec.from_config(model_config)
    high = OneDCCodec.from_config(model_config)
    for bundle, gain in ((low, 1.0), (high, 10.0)):
        with torch.no_grad():
            bundle.codec.g_a_y[1].weight.mul_(gain / Y_INIT_GAIN)
            bundle.codec.g_a_y[1].bias.mul_(gain / Y_INIT_GAIN)
        bundle.codec.update(force=True)
    return [save_bundle(low, model_config, folder / "low.ckpt", "distill"),
            save_bundle(high, model_config, folder / "high.ckpt", "distill")]


@pytest.fixture(scope="session")
def generator_ckpt(tmp_path_factory, model_config) -> Path:
    """An untrained tiny checkpoint with a one-step generator (a latent-stage layout)."""
    from onedc.training.build import generator_from_config
    from onedc.coding.bundle import OneDCCodec
    from onedc.families import generator_settings

    plain = OneDCCodec.from_config(model_config)
    bundle = OneDCCodec(plain.vae, plain.codec, generator_from_config(model_config),
                        generator_settings=generator_settings(model_config))
    return save_bundle(bundle, model_config, tmp_path_factory.mktemp("gen") / "latent.ckpt", "latent")


@pytest.fixture(scope="session")
def photo() -> torch.Tensor:
    from onedc.datamodules import load_image, sample_photo_paths

    return load_image(sample_photo_paths()["astronaut"])


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory, photo) -> Path:
    """Three crops: 96x128, 64x80 (in a subfolder) and 30x40 (too small for 5-scale MS-SSIM)."""
    folder = tmp_path_factory.mktemp("images")
    write_png(folder / "face.png", photo[:, 100:196, 150:278])
    write_png(folder / "sub" / "rocket.png", photo[:, 300:364, 20:100])
    write_png(folder / "tiny.png", photo[:, 200:230, 200:240])
    return folder


@pytest.fixture()
def no_weights(tmp_path, monkeypatch) -> Path:
    """An empty weights folder as $ONEDC_WEIGHTS: no perceptual backbone is found."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("ONEDC_WEIGHTS", str(folder))
    return folder
