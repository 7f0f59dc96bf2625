"""The published OneDC behind `onedc compress/decompress`: a small-width release, imported, codes real files."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from onedc.coding.bitstream import decode_container
from onedc.cli import main
from onedc.datamodules import load_image, sample_photo_paths
from onedc.coding.bundle import OneDCCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modules"))
from reference_testdata import SMALL_UNET  # noqa: E402  (the reference tests' small UNet)

# An f8 VAE (four blocks) at test width: the codec fuses its latent at 1/8.
SMALL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "scaling_factor": 0.18215,
}

CODEC = {"internal_ch": 64, "bottleneck_ch": 32, "unet_ch_config": [32, 32, 32], "z_fsq_levels": [4] * 7,
         "semantic_ch": 32, "feature_ch": 32, "pix_emb_ch": 8}


def small_model_config() -> dict:
    """The onedc_sd15 preset at test width (same classes and key layout, fewer channels)."""
    from onedc.training.config import compose, to_dict

    model = to_dict(compose(["model=onedc_sd15"]).model)
    model["vae"].update(config=dict(SMALL_VAE), attention_window=16)
    model["codec"] = dict(CODEC)
    model["generator"].update(unet={**SMALL_UNET, "cross_attention_dim": 32}, gs_channels=32,
                              lora={"rank": 4, "alpha": 0.5}, gradient_checkpointing=False)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    from onedc.modules.reference.codec import ReferenceCodec
    from onedc.modules.reference.generator import build_reference_generator
    from onedc.families.reference.released import ReferenceArchitecture, import_reference, save_released_checkpoint

    root = tmp_path_factory.mktemp("release")
    model = small_model_config()
    generator = build_reference_generator(unet_config=model["generator"]["unet"], gs_channels=32, lora_rank=4,
                                          lora_alpha=0.5, seed=2)
    torch.manual_seed(6)
    save_released_checkpoint(generator, ReferenceCodec(**CODEC), root / "ckpt")
    AutoencoderKL(**SMALL_VAE).save_pretrained(root / "vae")
    architecture = ReferenceArchitecture(
        generator={"unet_config": model["generator"]["unet"], "gs_channels": 32, "lora_rank": 4, "lora_alpha": 0.5},
        codec=CODEC, vae=SMALL_VAE)
    return import_reference(root / "ckpt", root / "vae", root / "ref.ckpt", model_config=model,
                            architecture=architecture)


def test_imported_release_codes_and_decodes_files(imported):
    codec = OneDCCodec.from_checkpoint(imported)
    photo = load_image(sample_photo_paths()["astronaut"])[:, 100:228, 60:230]  # 128x170 -> padded 128x192
    data, y_hat = codec.compress_images([photo], return_y_hat=True)
    header = decode_container(data[0])
    assert header.version == 2 and (header.z_height, header.z_width) == (2, 3)
    decoded = codec.decompress_bytes(data[0])
    assert torch.equal(decoded.y_hat, y_hat)  # every decision repeated: the same ŷ bit for bit
    assert torch.equal(codec.quantised_forward(photo).y_hat, y_hat)  # the no-file pass agrees
    assert torch.equal(codec.codec.fsq.codes_to_indices(decoded.z_hat),
                       codec.codec.fsq.codes_to_indices(codec.quantised_forward(photo).z_hat))
    assert decoded.image.shape == (3, 128, 170) and torch.isfinite(decoded.image).all()
    assert decoded.latent.shape == (1, 4, 16, 24)


def test_cli_round_trip_on_the_imported_checkpoint(imported, tmp_path):
    from PIL import Image

    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    crop = load_image(sample_photo_paths()["coffee"])[:, :64, :100]
    Image.fromarray(((crop + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "bits"), "--ckpt", str(imported)]) == 0
    assert main(["decompress", str(tmp_path / "bits" / "a.onedc"), "-o", str(tmp_path / "out"),
                 "--ckpt", str(imported)]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (100, 64)


def test_import_reference_cli_needs_the_vae(tmp_path, capsys):
    assert main(["import-reference", str(tmp_path), "-o", str(tmp_path / "x.ckpt")]) != 0
    assert "--vae" in capsys.readouterr().err
