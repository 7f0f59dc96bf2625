"""The embedded default's frozen parts ship as weights (onedc/assets): model=tiny's VAE reaches its
measured figures on the held-out photos, building model=tiny / tokenizer=vq_tiny loads the files
and trains nothing, checkpoints record which weights they are, and the recipe that makes the VAE
(python -m onedc.assets.make) is deterministic and learns."""
from __future__ import annotations

import math
import time

import pytest
import torch
from diffusers import AutoencoderKL

import onedc.quicktrain.vae as vae_recipe
import onedc.quicktrain.vq as vq_recipe
from onedc.assets import asset_metadata, asset_path, resolve_pretrained
from onedc.assets.make import tensors_sha256
from onedc.training.build import identity, teacher_from_config, vae_from_config
from onedc.training.config import compose, to_dict
from onedc.errors import WeightsError
from onedc.quicktrain import HELD_OUT_IMAGES, QUICK_TRAIN_IMAGES, VAEQuickTrainRecipe
from onedc.quicktrain.vae import held_out_figures, quick_train_vae

# The shipped VAE on the whole held-out photos (8-bit PSNR, onedc.eval.pixels.psnr) and its mean
# colour error per channel (decoded - original, 8-bit units), measured with native AVX-512 kernels
# and with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41: the two agree to 1e-5 dB and
# 1e-4 levels (fixed weights: only the evaluation's rounding moves). The VAE shipped before it
# (2000 + 600 steps, L1 + 5 MSE, the photos without the colour wheel): 22.241 / 22.000 dB, colour
# error PREVIOUS_COLOUR_ERROR; the one before that (recipe version 2): 21.89 / 21.51 dB,
# -4.88 / +2.20 / -8.14 and -4.62 / +1.55 / -3.66; the 600 + 200-step VAE quick-trained on first
# use before that: 20.19 / 20.57 dB.
SHIPPED_PSNR = {"grace_hopper": 23.591, "motorcycle_right": 22.489}
SHIPPED_COLOUR_ERROR = {"grace_hopper": [-1.72, -1.19, -1.67], "motorcycle_right": [-0.62, 2.07, -0.49]}
PREVIOUS_COLOUR_ERROR = {"grace_hopper": [5.73, 1.40, -7.53], "motorcycle_right": [1.93, 1.59, -2.58]}
CAST_BOUND = 2.5               # 8-bit levels: no channel of either photo off by more (the old: 7.5)
PSNR_TOLERANCE = 0.05          # dB, thousands of times the kernel-set spread
COLOUR_TOLERANCE = 0.1         # 8-bit units
RANDOM_PSNR_CEILING = 12.0     # model=tiny_random: 8.5 / 10.8 dB

# A small VAE for the recipe's determinism check (a second).
SMALL_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4}


def tiny_vae_config() -> tuple[dict, int]:
    vae = to_dict(compose(["model=tiny"]).model)["vae"]
    return dict(vae["config"]), int(vae["seed"])


def seeded_vae(config: dict, seed: int) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**config)


def test_shipped_tiny_vae_reaches_its_measured_figures():
    vae, random = vae_from_config(compose([]).model), vae_from_config(compose(["model=tiny_random"]).model)
    figures = held_out_figures(vae.autoencoder)
    for name in HELD_OUT_IMAGES:
        assert figures[name]["psnr"] == pytest.approx(SHIPPED_PSNR[name], abs=PSNR_TOLERANCE), name
        assert figures[name]["colour_error"] == pytest.approx(SHIPPED_COLOUR_ERROR[name], abs=COLOUR_TOLERANCE), name
    assert all(fig["psnr"] < RANDOM_PSNR_CEILING for fig in held_out_figures(random.autoencoder).values())
    assert min(SHIPPED_PSNR.values()) >= 22.0  # issue 19's aim for the VAE alone
    for name in HELD_OUT_IMAGES:  # the cast of the VAE shipped before is gone
        assert sum(map(abs, SHIPPED_COLOUR_ERROR[name])) < sum(map(abs, PREVIOUS_COLOUR_ERROR[name])), name
        assert max(map(abs, figures[name]["colour_error"])) < CAST_BOUND, name


def test_shipped_files_carry_their_identity():
    for name, cls in (("tiny_vae", "diffusers.AutoencoderKL"), ("vq_tiny_teacher", "diffusers.VQModel")):
        path = asset_path(name)
        assert path.stat().st_size < 2_000_000  # package data stays small
        meta = asset_metadata(path)
        assert meta["onedc_asset"] == name and meta["class"] == cls and meta["made_by"].endswith("onedc.assets.make")
        assert {"config", "seed", "recipe", "recipe_version", "onedc_version", "torch_version"} <= set(meta)
        from safetensors.torch import load_file

        assert tensors_sha256(load_file(str(path))) == meta["tensors_sha256"]  # the weights are the recorded ones
    config, seed = tiny_vae_config()
    assert asset_metadata(asset_path("tiny_vae"))["config"] == config
    assert asset_metadata(asset_path("tiny_vae"))["seed"] == seed
    tokenizer = to_dict(compose(["tokenizer=vq_tiny"]).tokenizer)
    teacher_meta = asset_metadata(asset_path("vq_tiny_teacher"))
    assert teacher_meta["config"] == tokenizer["config"] and teacher_meta["seed"] == tokenizer["seed"]
    assert teacher_meta["protocol"]["tile_size"] == tokenizer["tile_size"]
    assert not set(HELD_OUT_IMAGES) & {name.rsplit(".", 1)[0] for name in QUICK_TRAIN_IMAGES}
    assert "motorcycle_left.png" not in QUICK_TRAIN_IMAGES  # motorcycle_right's stereo twin


def test_building_the_default_loads_the_files_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEDC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def no_training(*args, **kwargs):
        raise AssertionError("building a model trained it")

    monkeypatch.setattr(vae_recipe, "quick_train_vae", no_training)
    monkeypatch.setattr(vq_recipe, "quick_train_vq", no_training)
    cfg = compose([])
    assert cfg.model.name == "tiny" and cfg.tokenizer.name == "vq_tiny"
    start = time.perf_counter()
    vae, teacher = vae_from_config(cfg.model), teacher_from_config(cfg.tokenizer)
    assert time.perf_counter() - start < 20  # loading: about a second; training took minutes
    assert not (tmp_path / "cache").exists() and not (tmp_path / "xdg").exists()
    # The same code path as a user's pretrained=/path/file: same weights, same identity.
    path = asset_path("tiny_vae")
    by_path = vae_from_config({**to_dict(cfg.model), "vae": {**to_dict(cfg.model)["vae"], "pretrained": str(path)}})
    assert vae.identity == by_path.identity and vae.identity.startswith("AutoencoderKL:sha256=")
    for (key, a), b in zip(vae.state_dict().items(), by_path.state_dict().values()):
        assert torch.equal(a, b), key
    assert teacher.identity.startswith("VQTeacher:sha256=")
    assert resolve_pretrained("asset:tiny_vae") == str(path) and resolve_pretrained("/x/y") == "/x/y"
    with pytest.raises(WeightsError, match="unknown packaged weights asset:nope; known: asset:tiny_vae"):
        vae_from_config({**to_dict(cfg.model), "vae": {**to_dict(cfg.model)["vae"], "pretrained": "asset:nope"}})


def test_a_vae_file_of_another_architecture_is_one_clear_error():
    model = to_dict(compose([]).model)
    other = {**model["vae"], "config": {**model["vae"]["config"], "latent_channels": 8}}
    with pytest.raises(WeightsError, match="tiny_vae.safetensors does not fit the AutoencoderKL of model.vae.config"):
        vae_from_config({**model, "vae": other})


def test_stage_checkpoint_identity_records_the_vae():
    cfg = compose(["model=tiny", "stage=distill"])
    vae = vae_from_config(cfg.model)
    recorded = identity(cfg, cfg.stage, vae=vae).model["vae"]
    assert recorded["identity"] == vae.identity and recorded["pretrained"] == "asset:tiny_vae"
    random = vae_from_config(compose(["model=tiny_random"]).model)
    assert "random" in random.identity and random.identity != vae.identity


def test_vae_recipe_is_deterministic_and_leaves_the_caller_alone():
    recipe = VAEQuickTrainRecipe(guided_steps=2, joint_steps=2, batch_size=2, crop=16, images=("chelsea.png",))
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    first, second = seeded_vae(SMALL_CONFIG, 3), seeded_vae(SMALL_CONFIG, 3)
    quick_train_vae(first, recipe, seed=3)
    quick_train_vae(second, recipe, seed=3)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert not first.training and not any(p.requires_grad for p in first.parameters())


def test_vae_recipe_learns_in_a_few_dozen_steps():
    """The recipe behind the shipped VAE, cut to 40 steps, already lifts the held-out PSNR of the
    random VAE: motorcycle_right 10.63 -> 13.07 dB (native AVX-512 kernels; 13.05 dB with
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41). The bar of +1.5 dB sits 0.9 dB below both."""
    from dataclasses import replace

    from onedc.assets.make import VAE_RECIPE

    config, seed = tiny_vae_config()
    model = seeded_vae(config, seed)
    before = held_out_figures(model, ["motorcycle_right"])["motorcycle_right"]["psnr"]
    quick_train_vae(model, replace(VAE_RECIPE, guided_steps=30, joint_steps=10, batch_size=8), seed=seed)
    after = held_out_figures(model, ["motorcycle_right"])["motorcycle_right"]["psnr"]
    assert before < RANDOM_PSNR_CEILING and after > before + 1.5


def test_make_command_writes_loadable_files_and_keeps_existing_ones(tmp_path, monkeypatch, capsys):
    """python -m onedc.assets.make, with the recipes cut to a few steps: it writes both files with
    their identity, they load as pretrained files, and a second run refuses to overwrite them."""
    from onedc.assets import make

    monkeypatch.setattr(make, "VAE_RECIPE", VAEQuickTrainRecipe(guided_steps=2, joint_steps=1, batch_size=2, crop=48,
                                                                images=("chelsea.png",)))
    monkeypatch.setattr(make, "TEACHER_RECIPE", vq_recipe.QuickTrainRecipe(steps=2, batch_size=4, kmeans_crops=32,
                                                                          images=("coffee.png",)))
    assert make.main(["--out", str(tmp_path)]) == 0
    model = to_dict(compose([]).model)
    vae = vae_from_config({**model, "vae": {**model["vae"], "pretrained": str(tmp_path / "tiny_vae.safetensors")}})
    meta = asset_metadata(tmp_path / "tiny_vae.safetensors")
    assert meta["recipe"]["guided_steps"] == 2 and meta["tensors_sha256"] == tensors_sha256(vae.autoencoder.state_dict())
    assert vae.identity != vae_from_config(model).identity  # other weights, another identity
    teacher_file = tmp_path / "vq_tiny_teacher.safetensors"
    assert asset_metadata(teacher_file)["recipe"]["steps"] == 2
    teacher = teacher_from_config(compose([f"tokenizer.pretrained={teacher_file}"]).tokenizer)
    assert teacher.identity != teacher_from_config(compose([]).tokenizer).identity
    assert "tiny_vae.safetensors" in capsys.readouterr().out
    before = (tmp_path / "tiny_vae.safetensors").read_bytes()
    assert make.main(["--out", str(tmp_path), "--only", "tiny_vae"]) == 2
    assert "error:" in capsys.readouterr().err and (tmp_path / "tiny_vae.safetensors").read_bytes() == before


def test_symmetric_pca_target_says_both_chroma_axes():
    """pca_encoder(symmetric=True) is the PCA of the photos in all six channel orders (the same
    four-dimensional target space, the same variances), computed without the degenerate SVD: its
    channels are luma mean, one chroma mean per opponent axis, one luma gradient; the plain PCA of
    these warm photos keeps a single chroma axis (red - blue) and no green - magenta."""
    from onedc.quicktrain.common import quick_train_images
    from onedc.quicktrain.vae import pca_encoder

    images = quick_train_images(("chelsea.png", "coffee.png", "camera.png"), 1.0, 48, input_range=(-1.0, 1.0),
                                resize="bilinear")
    permuted = [im[list(order)] for im in images for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0),
                                                                 (2, 0, 1), (2, 1, 0))]
    plain, by_svd = pca_encoder(images, 4, 8), pca_encoder(permuted, 4, 8)
    split = pca_encoder(images, 4, 8, symmetric=True)
    weights = {name: conv.weight.reshape(4, -1).double() for name, conv in
               (("plain", plain), ("by_svd", by_svd), ("split", split))}
    spans = [torch.linalg.qr(weights[name].T)[0] for name in ("by_svd", "split")]
    assert torch.linalg.svdvals(spans[0].T @ spans[1]).min() > 0.9999  # the same target space
    assert torch.allclose(weights["split"].norm(dim=1), weights["by_svd"].norm(dim=1), rtol=1e-3)  # 1 / std
    colour = weights["split"].reshape(4, 3, 64).sum(-1)  # each channel's net colour direction
    grey, chroma = torch.ones(3, dtype=torch.float64) / math.sqrt(3), torch.eye(3, dtype=torch.float64) - 1.0 / 3.0
    assert (colour[0] @ chroma).norm() < 1e-6 and colour[0] @ grey > 0  # luma mean, bright = positive
    assert (colour[1:3] @ grey).abs().max() < 1e-6 and torch.linalg.matrix_rank(colour[1:3]) == 2  # both chroma axes
    assert colour[3].norm() < 0.05 * colour[0].norm()  # a luma gradient: no mean
    plain_colour = weights["plain"].reshape(4, 3, 64).sum(-1)
    assert torch.linalg.matrix_rank(plain_colour @ chroma, atol=0.05 * float(plain_colour.norm())) == 1
