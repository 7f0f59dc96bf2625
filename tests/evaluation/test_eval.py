"""``onedc eval`` and the evaluation core: real-file bpp, PSNR/MS-SSIM, JPEG/WebP at matched bpp,
perceptual metrics only from local weights, multi-step decoding, and the RD callback."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from onedc.coding.bitstream import decode_container
from onedc.cli import SUBCOMMANDS, main
from onedc.errors import OneDCError
from onedc.eval import (
    ALEXNET_FILE, ANCHOR_LADDERS, ANCHORS, INCEPTION_FILE, VGG16_FILE, PerceptualMetrics, evaluate,
    fid_kid, fid_patches, ms_ssim_settings, ms_ssim_uint8, pillow_encode, to_uint8)
from onedc.coding.bundle import OneDCCodec


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def hand_psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - decoded.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, ladder, image_dir):
    """``onedc eval`` with a 2-checkpoint ladder on 3 images, no perceptual weights: (out dir, stdout, stderr)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    weights = tmp_path_factory.mktemp("no-weights")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONEDC_WEIGHTS", str(weights))
        import contextlib
        import io

        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["eval", "--ckpt", *map(str, ladder), str(image_dir), "-o", str(out)])
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue(), weights


def test_eval_is_a_registered_subcommand():
    assert "eval" in SUBCOMMANDS


def test_eval_writes_csv_json_plot_and_real_files(cli_run):
    out, stdout, _, _ = cli_run
    rows = read_csv(out / "per_image.csv")
    images, ckpts = 3, 2
    per_image = ckpts + sum(map(len, ANCHOR_LADDERS.values())) + len(ANCHORS) * ckpts  # onedc, ladders, matched
    assert len(rows) == images * per_image
    assert json.loads((out / "per_image.json").read_text())[0]["image"] == rows[0]["image"]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "files").rglob("*.onedc")) == [
        f"files/{c}/{i}.onedc" for c in ("high", "low") for i in ("face", "sub/rocket", "tiny")]
    with Image.open(out / "rd.png") as plot:
        assert plot.format == "PNG" and plot.width > 500
    aggregate = json.loads((out / "aggregate.json").read_text())
    settings = {(e["codec"], e["setting"]) for e in aggregate["results"]}
    assert {("onedc", "low"), ("onedc", "high"), ("jpeg", "q=50"), ("webp", "matched:high")} <= settings
    assert "onedc  high" in stdout and "rd.png" in stdout
    # All four anchors ran (Pillow's AVIF and pillow-jxl-plugin are installed here), and the BD table
    # compares onedc with each, for the metrics that have values, printed and in bd.json.
    assert aggregate["anchors"] == ["jpeg", "webp", "avif", "jxl"]
    bd_rows = json.loads((out / "bd.json").read_text())["rows"]
    assert {(r["test"], r["anchor"]) for r in bd_rows} == {("onedc", a) for a in ("jpeg", "webp", "avif", "jxl")}
    assert {r["metric"] for r in bd_rows} == {"psnr", "ms_ssim"}
    assert "BD-rate" in stdout and "onedc vs avif" in stdout and "onedc vs jxl" in stdout


def test_bpp_is_the_file_size(cli_run):
    out = cli_run[0]
    onedc = [r for r in read_csv(out / "per_image.csv") if r["codec"] == "onedc"]
    assert len(onedc) == 6
    for row in onedc:
        size = os.path.getsize(out / row["file"])
        assert int(row["bytes"]) == size
        assert float(row["bpp"]) == size * 8 / (int(row["height"]) * int(row["width"]))  # exact: repr round-trips
    json_rows = [r for r in json.loads((out / "per_image.json").read_text()) if r["codec"] == "onedc"]
    assert [r["bpp"] for r in json_rows] == [float(r["bpp"]) for r in onedc]
    mean_high = np.mean([float(r["bpp"]) for r in onedc if r["setting"] == "high"])
    entry = next(e for e in json.loads((out / "aggregate.json").read_text())["results"] if e["setting"] == "high")
    assert entry["bpp"] == pytest.approx(mean_high, rel=1e-12)


def test_psnr_matches_a_hand_computation(cli_run, ladder, image_dir):
    out = cli_run[0]
    row = next(r for r in read_csv(out / "per_image.csv") if r["codec"] == "onedc" and r["image"] == "face")
    codec = OneDCCodec.from_checkpoint(ladder[1] if row["setting"] == "high" else ladder[0])
    decoded = codec.decompress_bytes((out / row["file"]).read_bytes()).image
    decoded_u8 = np.clip(np.round((decoded.numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    reference = np.asarray(Image.open(image_dir / "face.png").convert("RGB")).transpose(2, 0, 1)
    assert float(row["psnr"]) == pytest.approx(hand_psnr(reference, decoded_u8), abs=1e-9)


def test_baselines_are_matched_to_the_onedc_bpp(cli_run, image_dir):
    out = cli_run[0]
    rows = read_csv(out / "per_image.csv")
    onedc = {(r["setting"], r["image"]): float(r["bpp"]) for r in rows if r["codec"] == "onedc"}
    for codec in ("jpeg", "webp"):
        assert {r["setting"] for r in rows if r["codec"] == codec} >= {f"q={q}" for q in ANCHOR_LADDERS[codec]}
        for row in (r for r in rows if r["codec"] == codec and r["setting"].startswith("matched:")):
            target = onedc[(row["setting"].split(":", 1)[1], row["image"])]
            assert float(row["target_bpp"]) == target
            reference = to_uint8(torch.from_numpy(np.asarray(
                Image.open(image_dir / f"{row['image']}.png").convert("RGB")).transpose(2, 0, 1).copy()).float()
                / 127.5 - 1)
            pixels = int(row["height"]) * int(row["width"])
            low = 1 if codec == "jpeg" else 0
            reachable = [len(pillow_encode(reference, codec, q)) * 8 / pixels for q in range(low, 101)]
            error = abs(float(row["bpp"]) - target)
            assert error == pytest.approx(min(abs(b - target) for b in reachable))  # the closest quality
            assert float(row["bpp"]) == len(pillow_encode(reference, codec, int(row["quality"]))) * 8 / pixels
            if row["setting"] == "matched:high" and row["image"] != "tiny":
                assert error <= 0.1 * target  # reachable: within 10 %


def test_missing_perceptual_weights_give_one_message_and_empty_columns(cli_run):
    out, _, stderr, weights = cli_run
    notes = [line for line in stderr.splitlines() if "perceptual metrics skipped" in line]
    assert len(notes) == 1
    for name in (ALEXNET_FILE, VGG16_FILE, INCEPTION_FILE, str(weights)):
        assert name in notes[0]
    rows = read_csv(out / "per_image.csv")
    assert all(r["lpips"] == "" and r["dists"] == "" for r in rows)
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert set(aggregate["missing_weights"]) == {"LPIPS", "DISTS", "FID/KID"}
    assert all(e["lpips"] is None and e["fid"] is None for e in aggregate["results"])
    assert "3/3" in stderr  # the progress bar ran over the images


def test_ms_ssim_on_small_images():
    assert ms_ssim_settings(176, 300) == (11, 1.5, (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    assert sum(ms_ssim_settings(100, 100)[2]) == pytest.approx(1.0)
    assert [len(ms_ssim_settings(s, s)[2]) for s in (175, 99, 44, 43, 11)] == [4, 4, 3, 2, 1]
    assert ms_ssim_settings(7, 9) == (7, 6 / 7, (1.0,)) and ms_ssim_settings(2, 50) is None
    torch.manual_seed(0)
    for side in (4, 8, 12, 30, 60, 120):
        x = torch.randint(0, 256, (3, side, side + 3), dtype=torch.uint8)
        y = (x.int() + torch.randint(-20, 21, x.shape)).clamp(0, 255).to(torch.uint8)
        same, _ = ms_ssim_uint8(x, x)
        noisy, scales = ms_ssim_uint8(x, y)
        assert same == pytest.approx(1.0, abs=1e-6) and 0 < noisy < 1 and scales >= 1
    # Large enough: exactly torchmetrics' standard MS-SSIM.
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    x = torch.randint(0, 256, (3, 180, 190), dtype=torch.uint8)
    y = (x.int() + torch.randint(-30, 31, x.shape)).clamp(0, 255).to(torch.uint8)
    standard = MultiScaleStructuralSimilarityIndexMeasure(data_range=255.0)(y[None].float(), x[None].float())
    assert ms_ssim_uint8(x, y) == (pytest.approx(float(standard), abs=1e-12), 5)


def test_fid_patches_follow_the_half_shifted_protocol():
    image = torch.arange(3 * 600 * 520).reshape(1, 3, 600, 520)
    patches = fid_patches(image)
    assert patches.shape == (4 + 1, 3, 256, 256)  # 2x2 grid + 1 patch of the image shifted by 128
    assert torch.equal(patches[1], image[0, :, :256, 256:512])
    assert torch.equal(patches[4], image[0, :, 128:384, 128:384])
    assert fid_patches(image[..., :255, :]).shape[0] == 0


def test_fid_kid_of_pooled_features():
    torch.manual_seed(0)
    real = [torch.randn(3, 8, dtype=torch.float64) for _ in range(4)]
    same = fid_kid(real, real)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["fid_patches"] == 12
    shifted = fid_kid(real, [r + 3.0 for r in real])
    assert shifted["fid"] == pytest.approx(8 * 9.0, rel=1e-6)  # ||Δμ||² = 8 · 3², same covariances
    # KID is an unbiased MMD estimate over random subsets (lowered to the 12 patches): ~0 for the same set.
    assert shifted["kid"] > 20 * abs(same["kid"]) and shifted["kid_std"] >= 0
    assert fid_kid(real[:1], [torch.zeros(0, 0)])["fid"] is None


def test_kid_subsets_do_not_depend_on_the_global_rng():
    """Random subsets (5 of 12 patches) from KID's own seed: the same value whatever the process's RNG
    state (torch seeds each process at random), and that state is left as it was."""
    real = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
    fake = [r + 0.5 * torch.randn_like(r) for r in real]
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        values.append(fid_kid(real, fake, subsets=20, subset_size=5))
        assert torch.equal(torch.get_rng_state(), state)
    assert values[0] == values[1] and values[0]["kid_std"] > 0  # subsets differed from one another


class RandomPatchFeatures(nn.Module):
    """RANDOM stand-in for Inception (tests only: its values are not FID)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 16, stride=16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() / 255).mean(dim=(2, 3))


def test_fid_kid_columns_with_a_feature_extractor(tmp_path, ladder, photo, no_weights):
    from onedc.coding.images import save_image

    save_image(photo[:, :384, :384], tmp_path / "big.png")  # 1 grid patch + 1 shifted patch
    notes: list[str] = []
    result = evaluate([ladder[0]], tmp_path / "big.png", tmp_path / "ev", baselines=False, progress=False,
                      feature_extractor=RandomPatchFeatures(), say=notes.append)
    (entry,) = result.aggregate
    assert entry["fid_patches"] == 2 and math.isfinite(entry["fid"]) and entry["kid"] is not None
    assert len(notes) == 1 and ALEXNET_FILE in notes[0] and INCEPTION_FILE not in notes[0]


def test_local_backbones_enable_lpips_and_dists(tmp_path):
    """RANDOM AlexNet / VGG16 weights saved under the expected names (tests only: not LPIPS/DISTS values)."""
    from torchvision.models import alexnet
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()}, tmp_path / ALEXNET_FILE)
    (tmp_path / "checkpoints").mkdir()
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()},
               tmp_path / "checkpoints" / VGG16_FILE)
    metrics = PerceptualMetrics.load(tmp_path)
    assert metrics.lpips is not None and metrics.dists is not None and set(metrics.missing) == {"FID/KID"}
    assert VGG16_FILE not in (metrics.message() or "") and INCEPTION_FILE in metrics.message()
    x = torch.randint(0, 256, (3, 64, 72), dtype=torch.uint8)
    y = (x.int() + 40).clamp(0, 255).to(torch.uint8)
    same, different = metrics.distances(x, x), metrics.distances(x, y)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6) and same["dists"] == pytest.approx(0.0, abs=1e-5)
    assert different["lpips"] > 0 and different["dists"] > 0


def test_steps_decode_through_the_multi_step_generator(generator_ckpt, ladder, photo, tmp_path, image_dir, no_weights):
    bundle = OneDCCodec.from_checkpoint(generator_ckpt)
    x = photo[:, :64, :64]
    data = bundle.compress_image(x)
    two = bundle.decompress_bytes(data, steps=2)
    with torch.no_grad():
        coded = bundle._entropy_decode(decode_container(data))
        expected = bundle.generator.multi_step(coded.features, coded.tokens, 2)
    assert torch.equal(two.latent, expected)
    assert not torch.equal(two.latent, bundle.decompress_bytes(data).latent)
    with pytest.raises(OneDCError, match="needs a one-step generator"):
        OneDCCodec.from_checkpoint(ladder[0]).decompress_bytes(OneDCCodec.from_checkpoint(ladder[0]).compress_image(x),
                                                               steps=2)

    result = evaluate([generator_ckpt], image_dir / "face.png", tmp_path / "ev", baselines=False, steps=2,
                      progress=False, say=lambda _: None)
    assert [r["steps"] for r in result.rows] == [2]
    with pytest.raises(OneDCError, match="steps=2"):
        evaluate([ladder[0]], image_dir / "face.png", tmp_path / "ev2", baselines=False, steps=2, progress=False,
                 say=lambda _: None)


def test_decompress_cli_steps(generator_ckpt, ladder, photo, tmp_path, capsys):
    from onedc.coding.images import save_image

    save_image(photo[:, :64, :64], tmp_path / "in" / "a.png")
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "c"), "--ckpt", str(generator_ckpt)]) == 0
    assert main(["decompress", str(tmp_path / "c"), "-o", str(tmp_path / "d"), "--ckpt", str(generator_ckpt),
                 "--steps", "2", "--precision", "fp32"]) == 0  # the library's precision: equal bit for bit
    bundle = OneDCCodec.from_checkpoint(generator_ckpt)
    expected = to_uint8(bundle.decompress_bytes((tmp_path / "c" / "a.onedc").read_bytes(), steps=2).image)
    decoded = np.asarray(Image.open(tmp_path / "d" / "a.png")).copy()
    assert torch.equal(torch.from_numpy(decoded).permute(2, 0, 1), expected)
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "c1"), "--ckpt", str(ladder[0])]) == 0
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "c1"), "-o", str(tmp_path / "d1"), "--ckpt", str(ladder[0]),
                 "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --steps 3") and "generator" in err[0]


class LiveModule(nn.Module):
    """Stands in for a stage LightningModule: the attributes RDEvalCallback reads."""

    def __init__(self, bundle: OneDCCodec, model_config: dict) -> None:
        super().__init__()
        self.vae, self.codec = bundle.vae, bundle.codec
        self.identity = SimpleNamespace(model=model_config)


def test_rd_callback_logs_real_file_rates_and_leaves_training_alone(tmp_path, model_config, photo):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torch.utils.data import DataLoader

    from onedc.callbacks import RDEvalCallback

    module = LiveModule(OneDCCodec.from_config(model_config), model_config)
    module.codec.train().requires_grad_(True)  # as in the distill stage
    before = {k: v.clone() for k, v in module.codec.state_dict().items()}
    images = torch.stack([photo[:, :64, :64], photo[:, 64:128, 64:128]])
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True, strategy=SimpleNamespace(), global_step=7,
                              datamodule=SimpleNamespace(val_dataloader=lambda: DataLoader(images, batch_size=1)))
    callback = RDEvalCallback(max_images=2)
    callback.on_validation_epoch_end(trainer, module)
    logger.experiment.flush()

    assert module.codec.training and all(p.requires_grad for p in module.codec.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.codec.state_dict().items() if "quantized_cdf" not in k)
    snapshot = OneDCCodec.from_modules(module.vae, module.codec, model_config=model_config)
    expected_bpp = np.mean([len(snapshot.compress_image(x)) * 8 / x[0].numel() for x in images])
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    (bpp,) = events.Scalars("rd/bpp_real")
    assert bpp.step == 7 and bpp.value == pytest.approx(expected_bpp, rel=1e-6)
    assert {"rd/psnr", "rd/ms_ssim"} <= set(events.Tags()["scalars"]) and "rd/curve" in events.Tags()["images"]
    assert callback.history == [{"step": 7, **callback.evaluate(module)}]

    quiet = RDEvalCallback()
    quiet.on_validation_epoch_end(SimpleNamespace(loggers=[], is_global_zero=True), module)
    assert quiet.history == []  # no TensorBoard logger: nothing computed
