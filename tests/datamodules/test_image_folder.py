"""Image decoding, folder listing, splitting and cropping of ImageFolderDataModule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onedc.datamodules import (
    ImageCropDataset,
    ImageFolderDataModule,
    list_images,
    load_image,
    sample_photo_paths,
)
from onedc.errors import ConfigError, ImageReadError, OneDCError

CROP = 16


def _noise_rgb(path: Path, width: int, height: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    _noise_rgb(path, 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """One image per awkward Pillow mode, plus one smaller than the crop, in nested folders."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _noise_rgb(root / "rgb.jpg", 40, 30)
    Image.fromarray(np.full((24, 20), 90, np.uint8), mode="L").save(root / "gray.png")
    rgba = np.zeros((20, 28, 4), np.uint8)
    rgba[..., 0] = 255  # red but fully transparent: must come out white
    Image.fromarray(rgba, mode="RGBA").save(root / "sub" / "rgba.png")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 10, 20))
    palette.save(root / "sub" / "palette.png", transparency=0)
    Image.fromarray(np.full((22, 26), 65535, np.uint16)).save(root / "deep16.png")
    _noise_rgb(root / "tiny.png", 6, 9, seed=1)
    return root


def test_sample_photos_are_the_seven_shipped_photos() -> None:
    paths = sample_photo_paths()
    assert set(paths) == {"astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                          "motorcycle_right", "grace_hopper"}
    assert all(p.is_file() for p in paths.values())
    astronaut = load_image(paths["astronaut"])
    assert astronaut.shape == (3, 512, 512) and astronaut.dtype == torch.float32
    assert -1.0 <= astronaut.min() < -0.9 and 0.9 < astronaut.max() <= 1.0
    with Image.open(paths["grace_hopper"]) as image:
        assert image.size == (512, 600)


def test_sixteen_bit_png_is_scaled_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 32896, 255]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode in ("I;16", "I")  # really stored as 16-bit
    image = load_image(tmp_path / "g16.png")
    expected = torch.tensor([0, 65535, 32896, 255], dtype=torch.float32) / 65535 * 2 - 1
    assert image.shape == (3, 1, 4)
    torch.testing.assert_close(image[:, 0], expected.expand(3, 4))
    assert image[0, 0, 1] == 1.0 and image[0, 0, 3] < -0.99  # 255 is dark in 16-bit


def test_alpha_and_palette_transparency_composite_on_white(mixed_folder: Path) -> None:
    rgba = load_image(mixed_folder / "sub" / "rgba.png")
    assert torch.equal(rgba, torch.ones(3, 20, 28))
    palette = load_image(mixed_folder / "sub" / "palette.png")
    assert torch.equal(palette[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # opaque blue
    assert torch.equal(palette[:, 0, 15], torch.ones(3))  # transparent index 0 -> white


def test_grayscale_is_repeated_over_channels(mixed_folder: Path) -> None:
    gray = load_image(mixed_folder / "gray.png")
    assert gray.shape == (3, 24, 20)
    assert torch.allclose(gray, torch.full_like(gray, 90 / 255 * 2 - 1))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 30x20 is shown 20x30
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (3, 30, 20)


@pytest.mark.parametrize("make", ["truncated", "not_image", "missing"])
def test_unreadable_file_raises_error_naming_it(tmp_path: Path, make: str) -> None:
    path = tmp_path / f"{make}.jpg"
    if make == "truncated":
        _truncated_jpeg(path)
    elif make == "not_image":
        path.write_text("hello")
    with pytest.raises(ImageReadError, match=f"{make}.jpg"):
        load_image(path)


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    for name in ["b.PNG", "a/c.jpeg", "a.Jpg", "notes.txt", ".hidden/x.png", "._d.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a.Jpg", "a/c.jpeg", "b.PNG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(OneDCError, match="empty"):
        list_images(tmp_path / "empty")


def test_mixed_folder_gives_crop_batches_in_range(mixed_folder: Path) -> None:
    dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, val_crop_size=CROP, batch_size=3,
                               val_names=["deep16"])
    dm.setup("fit")
    assert len(dm.train_set) == 5
    batches = list(dm.train_dataloader())
    assert len(batches) == 1  # 5 items, batch 3, drop_last
    assert batches[0].shape == (3, 3, CROP, CROP) and batches[0].dtype == torch.float32
    assert batches[0].min() >= -1.0 and batches[0].max() <= 1.0
    (val,) = list(dm.val_dataloader())
    assert torch.equal(val, torch.ones(1, 3, CROP, CROP))  # 16-bit 65535 -> 1.0


def test_small_image_policies(tmp_path: Path) -> None:
    pixels = np.array([[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [0, 0, 255]]], np.uint8)
    Image.fromarray(pixels).save(tmp_path / "two.png")
    image = load_image(tmp_path / "two.png")
    padded = ImageCropDataset([tmp_path / "two.png"], 4, train=False, small_images="pad")[0]
    expected = np.pad(image.numpy(), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    assert torch.equal(padded, torch.from_numpy(expected))
    # A one-pixel-wide image still pads (no reflection possible) to the full crop.
    Image.fromarray(np.full((9, 1, 3), 200, np.uint8)).save(tmp_path / "line.png")
    line = ImageCropDataset([tmp_path / "line.png"], 8, train=True, small_images="pad")[0]
    assert torch.allclose(line, torch.full((3, 8, 8), 200 / 255 * 2 - 1))
    Image.fromarray(np.full((3, 5, 3), 51, np.uint8)).save(tmp_path / "flat.png")
    up = ImageCropDataset([tmp_path / "flat.png"], 8, train=False, small_images="upscale")[0]
    assert torch.allclose(up, torch.full((3, 8, 8), 51 / 255 * 2 - 1), atol=1e-6)


def test_skip_small_images_drops_them_with_warning(mixed_folder: Path) -> None:
    dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, small_images="skip")
    with pytest.warns(UserWarning, match="tiny.png"):
        dm.setup()
    assert [p.name for p in dm.dropped["small"]] == ["tiny.png"]
    assert len(dm.train_set) == 5


def test_bad_file_fails_setup_or_is_skipped(mixed_folder: Path) -> None:
    _truncated_jpeg(mixed_folder / "sub" / "broken.jpg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        ImageFolderDataModule(mixed_folder, crop_size=CROP).setup()
    dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, skip_bad=True, repeat=2)
    with pytest.warns(UserWarning, match="broken.jpg"):
        dm.setup()
    assert len(dm.train_set.files) == 6 and len(dm.train_set) == 12  # 7 files, one dropped
    assert "dropped 1 unreadable" in dm.describe()


def test_val_names_split_and_unknown_name(mixed_folder: Path) -> None:
    dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, val_crop_size=8,
                               val_names=("gray", "rgba"), batch_size=4, repeat=3)
    dm.setup()
    assert sorted(p.stem for p in dm.val_set.files) == ["gray", "rgba"]
    assert "gray" not in {p.stem for p in dm.train_set.files}
    assert len(dm.train_set) == 12
    (val,) = list(dm.val_dataloader())
    assert val.shape == (2, 3, 8, 8)  # batch size shrinks to the val set
    assert dm.describe().startswith(f"ImageFolderDataModule({mixed_folder}): 4 train images x3")
    with pytest.raises(ConfigError, match=r"nope.*Available stems: deep16, gray"):
        ImageFolderDataModule(mixed_folder, val_names=["nope"]).setup()


def test_val_fraction_is_seeded_and_no_split_means_no_val(mixed_folder: Path) -> None:
    def val_stems(seed: int) -> list[str]:
        dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, val_fraction=0.1, seed=seed)
        dm.setup()
        return [p.stem for p in dm.val_set.files]

    assert len(val_stems(0)) == 1  # 0.1 * 6 rounds to 0, but at least one
    assert val_stems(3) == val_stems(3)
    assert len({val_stems(s)[0] for s in range(8)}) > 1
    dm = ImageFolderDataModule(mixed_folder, crop_size=CROP)
    dm.setup()
    assert dm.val_set is None and dm.val_dataloader() == []


def test_val_root_and_conflicting_splits(mixed_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    _noise_rgb(tmp_path / "val" / "v.png", 20, 20)
    dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, val_root=tmp_path / "val")
    dm.setup()
    assert len(dm.train_set.files) == 6 and [p.name for p in dm.val_set.files] == ["v.png"]
    with pytest.raises(ConfigError, match="val_root and val_names"):
        ImageFolderDataModule(mixed_folder, val_root=tmp_path / "val", val_names=["gray"])


def test_center_crop_is_deterministic_and_random_crops_vary(tmp_path: Path) -> None:
    path = _noise_rgb(tmp_path / "noise.png", 48, 40)
    image = load_image(path)
    val = ImageCropDataset([path], CROP, train=False)
    assert torch.equal(val[0], val[0])
    assert torch.equal(val[0], image[:, 12:28, 16:32])
    train = ImageCropDataset([path], CROP, train=True)
    draws = torch.stack([train[0] for _ in range(6)])
    assert len({tuple(d.flatten()[:8].tolist()) for d in draws}) > 1


def test_sample_photos_are_the_default_root() -> None:
    dm = ImageFolderDataModule(crop_size=CROP, batch_size=2, val_names=["grace_hopper"])
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 1
    assert "the sample photos" in dm.describe()


def test_trainer_fit_runs_with_and_without_val(mixed_folder: Path) -> None:
    import lightning

    class TinyModule(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.conv(batch).pow(2).mean()

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("val", self.conv(batch).mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_names, expected_val_batches in (((), [0]), (("gray", "rgba"), [1])):
        dm = ImageFolderDataModule(mixed_folder, crop_size=CROP, val_crop_size=8, batch_size=2,
                                   val_names=val_names)
        trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        trainer.fit(TinyModule(), dm)
        assert trainer.num_val_batches == expected_val_batches
        assert trainer.global_step == len(dm.train_set) // 2
