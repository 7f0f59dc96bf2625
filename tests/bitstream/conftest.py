"""Shared fixtures: an untrained tiny-preset checkpoint (no training needed to test coding)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_checkpoint(model_config: dict, path: Path, seed: int = 0) -> Path:
    """Save a stage-style checkpoint of a randomly initialised tiny vae + codec (tables built)."""
    from onedc.training.build import codec_from_config, vae_from_config

    vae = vae_from_config(model_config)
    torch.manual_seed(seed)
    codec = codec_from_config(model_config, vae.latent_channels)
    codec.update(force=True)
    state_dict = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    state_dict.update({f"codec.{k}": v for k, v in codec.state_dict().items()})
    state_dict["distill.head.weight"] = torch.ones(3, 3)  # training-only part: must be ignored
    torch.save({"state_dict": state_dict,
                "onedc": {"format": 1, "stage": "distill", "model": model_config, "tokenizer": {"name": "vq_tiny"}}},
               path)
    return path


@pytest.fixture(scope="session")
def model_config() -> dict:
    """The resolved ``model=tiny_random`` config as the plain dict a checkpoint stores."""
    from omegaconf import OmegaConf

    from onedc.training.config import compose

    return OmegaConf.to_container(compose(["model=tiny_random"]).model, resolve=True)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, model_config) -> Path:
    """An untrained tiny checkpoint on disk."""
    return make_checkpoint(model_config, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory, tiny_ckpt) -> Path:
    """The same model with one decoder-side weight changed: a *different* model for the files."""
    checkpoint = torch.load(tiny_ckpt, weights_only=False)
    checkpoint["state_dict"]["codec.g_s.0.weight"] = checkpoint["state_dict"]["codec.g_s.0.weight"] + 1e-3
    path = tmp_path_factory.mktemp("ckpt") / "other.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def onedc_codec(tiny_ckpt):
    """The inference bundle loaded from ``tiny_ckpt``."""
    from onedc.coding.bundle import OneDCCodec

    return OneDCCodec.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def photo():
    """A real photo (the sample astronaut), (3, H, W) in [-1, 1]."""
    from onedc.datamodules import load_image, sample_photo_paths

    return load_image(sample_photo_paths()["astronaut"])


@pytest.fixture(scope="session")
def small_file(onedc_codec, photo) -> bytes:
    """A valid ``.onedc`` file of a 70x100 photo crop (padded to 128x128: 2x2 z grid)."""
    return onedc_codec.compress_image(photo[:, 100:170, 150:250])
