"""`onedc export`: inference-only weights that compress and decompress like the checkpoint."""
import pytest
import torch
from safetensors.torch import load_file

from onedc.cli import main
from onedc.training.config import compose
from onedc.datamodules import load_image, sample_photo_paths
from onedc.errors import CheckpointError
from onedc.coding.bundle import OneDCCodec
from onedc.training.pipeline import run


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export-run")
    fast = ["trainer.logger=none", "trainer.enable_progress_bar=false", "data.batch_size=2", "data.crop_size=128",
            "stage.chain=[distill,latent]", f"run_dir={run_dir}"]
    for name in ("distill", "latent"):
        fast += [f"stage.{name}.max_steps=3", f"stage.{name}.val_every_n_steps=3",
                 f"stage.{name}.checkpoint_every_n_steps=3"]
    results = run(compose(["stage=all", *fast]))
    return results[-1].run_dir / "checkpoints" / "last.ckpt"


def test_export_keeps_only_inference_weights_and_is_smaller(latent_ckpt, tmp_path, capsys):
    out = tmp_path / "codec.safetensors"
    assert main(["export", str(latent_ckpt), "-o", str(out)]) == 0
    tensors = load_file(str(out))
    prefixes = {k.split(".", 1)[0] for k in tensors}
    assert prefixes == {"vae", "codec", "generator"}  # no distill head, no optimiser, no EMA copy
    assert "codec.gaussian_conditional._quantized_cdf" in tensors  # can compress at once
    assert out.stat().st_size < latent_ckpt.stat().st_size
    assert "MB" in capsys.readouterr().out


def test_exported_file_codes_identically_to_the_checkpoint(latent_ckpt, tmp_path):
    out = tmp_path / "codec.safetensors"
    assert main(["export", str(latent_ckpt), "-o", str(out)]) == 0
    from_ckpt, from_export = OneDCCodec.from_checkpoint(latent_ckpt), OneDCCodec.from_checkpoint(out)
    assert from_export.generator is not None
    assert from_ckpt.model_id == from_export.model_id
    x = load_image(sample_photo_paths()["chelsea"])[:, :128, :192]
    data = from_export.compress_image(x)
    assert data == from_ckpt.compress_image(x)
    assert torch.equal(from_export.decompress_bytes(data).image, from_ckpt.decompress_bytes(data).image)

    # ... and through the CLI, as a user would
    image = tmp_path / "in.png"
    from onedc.coding.images import save_image

    save_image(x, image)
    assert main(["compress", str(image), "-o", str(tmp_path / "bits"), "--ckpt", str(out)]) == 0
    assert main(["decompress", str(tmp_path / "bits" / "in.onedc"), "-o", str(tmp_path / "png"),
                 "--ckpt", str(out)]) == 0
    assert load_image(tmp_path / "png" / "in.png").shape == x.shape


def test_a_safetensors_file_without_onedc_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="onedc export"):
        OneDCCodec.from_checkpoint(path)
