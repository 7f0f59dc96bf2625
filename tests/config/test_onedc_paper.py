"""``experiment=onedc_paper``: the paper's stage I + stage II with every hyperparameter of
docs/reference-model.md §10, checked key by key, its LR schedule and crop protocol as they run, and
its full-size modules built on the meta device."""
from __future__ import annotations

import pytest
import torch

from onedc.datamodules.source_data import AuthorsCropProtocol, SourceDataModule
from onedc.errors import ConfigError
from onedc.stages.common import quadratic_ramp
from onedc.training.build import (build_datamodule, build_guidance_model, generator_from_config, optimizer_spec,
                                  vae_from_config)
from onedc.training.config import compose, to_dict

DATA = "data.path=/data/commoncatalog"  # data=commoncatalog asks for its datasets cache dir

# (config key, §10 value): one row per hyperparameter of the recipe.
SECTION_10 = [
    # §10.1 stage I
    ("model.name", "onedc_sd15"), ("tokenizer.name", "maskgit_vqgan"), ("stage.chain", ["distill", "dmd"]),
    ("stage.distill.max_steps", 400_000), ("stage.distill.lmbda", 4.6), ("stage.distill.lmbda_start", 1e-4),
    ("stage.distill.lmbda_warmup_steps", 4000), ("stage.distill.lmbda_step0", "final"),
    ("stage.distill.lr", 5e-5), ("stage.distill.betas", [0.9, 0.999]), ("stage.distill.weight_decay", 0.01),
    ("stage.distill.warmup_steps", 500), ("stage.distill.warmup_start", "zero"), ("stage.distill.grad_clip", 5.0),
    ("tokenizer.head.loss_weight", 1e-3), ("tokenizer.head.mse_weight", 0.01), ("stage.distill.distill_weight", 1.0),
    ("stage.distill.pixel_weight", 1.0), ("stage.distill.lpips_weight", 1.0), ("stage.distill.latent_weight", 0.0),
    ("stage.distill.lpips.backbone", "vgg"), ("stage.distill.vae_gradient_checkpointing", True),
    ("model.generator.lora", {"rank": 64, "alpha": 8.0}), ("model.generator.timestep", 999),
    ("data.batch_size", 8), ("trainer.devices", 4), ("trainer.global_batch_size", 32), ("trainer.strategy", "ddp"),
    ("trainer.precision", "bf16-mixed"), ("data.crop_size", 512),
    ("data.name", "commoncatalog"), ("data.image_column", "jpg"), ("data.caption_column", "blip2_caption"),
    ("data.max_files", 10_000), ("data.crop_protocol", "authors"),
    ("data.protocol", {"size": 1024, "small": 512, "p_resize": 0.2, "p_crop": 0.5, "keep_batch": 2}),
    # §10.2 stage II
    ("stage.dmd.max_steps", 1_000_100), ("stage.dmd.generator_every", 10), ("stage.dmd.dm_weight", 1.0),
    ("stage.dmd.gan_weight", 1e-3), ("stage.dmd.guidance_cls_weight", 1e-2), ("stage.dmd.pixel_weight", 0.625),
    ("stage.dmd.lpips_weight", 0.625), ("stage.dmd.dm_timesteps", [20, 640]), ("stage.dmd.gan_timesteps", [0, 999]),
    ("stage.dmd.fake_timesteps", [0, 999]), ("stage.dmd.lr", 1e-6), ("stage.dmd.guidance_lr", 1e-6),
    ("stage.dmd.betas", [0.9, 0.999]), ("stage.dmd.guidance_betas", [0.9, 0.999]),
    ("stage.dmd.weight_decay", 0.01), ("stage.dmd.guidance_weight_decay", 0.01), ("stage.dmd.warmup_steps", 500),
    ("stage.dmd.guidance_warmup_steps", 500), ("stage.dmd.warmup_start", "zero"), ("stage.dmd.grad_clip", 5.0),
    ("stage.dmd.captions", "batch"), ("stage.dmd.lpips.backbone", "vgg"),
    ("guidance.guidance_scale", 1.75), ("guidance.real_dtype", "bfloat16"), ("guidance.unet.block_out_channels",
                                                                             [320, 640, 1280, 1280]),
    ("guidance.unet.cross_attention_dim", 768), ("guidance.text.max_length", 77),
    ("guidance.scheduler.beta_schedule", "scaled_linear"),
]


def _select(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


@pytest.fixture(scope="module")
def paper() -> dict:
    return to_dict(compose(["experiment=onedc_paper", DATA]))


@pytest.mark.parametrize("key,value", SECTION_10, ids=[k for k, _ in SECTION_10])
def test_the_resolved_config_is_section_10(paper, key, value):
    assert _select(paper, key) == value


@pytest.mark.parametrize("lmbda", [0.6, 1.8, 2.9, 4.6, 7.4, 12.2])
def test_ladder_presets_set_lambda_and_the_run_dir(lmbda):
    cfg = compose(["experiment=onedc_paper", DATA, f"ladder=lmbda_{lmbda}"])
    assert cfg.stage.distill.lmbda == lmbda and cfg.run_dir == f"runs/onedc_paper-lmbda{lmbda}"


def test_the_lambda_ramp_and_its_step_zero_quirk(paper):
    distill = paper["stage"]["distill"]
    ramp = lambda s: quadratic_ramp(s, distill["lmbda"], distill["lmbda_warmup_steps"], distill["lmbda_start"],
                                    distill["lmbda_step0"])
    assert ramp(0) == 4.6  # the authors' quirk: step 0 uses λ_end
    assert ramp(1) == pytest.approx(1e-4 + (1 / 4000) ** 2 * (4.6 - 1e-4), rel=1e-12)
    assert ramp(2000) == pytest.approx(1e-4 + 0.25 * (4.6 - 1e-4), rel=1e-12)
    assert ramp(4000) == ramp(10 ** 6) == 4.6
    assert quadratic_ramp(0, 4.6, 4000, 1e-4, "ramp") == 1e-4


def _lrs(spec, steps: int) -> list[list[float]]:
    """The lr of each parameter group at optimiser steps 0 .. steps-1, as Lightning steps the scheduler."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = spec.build([{"params": [p]} for p in params])
    scheduler = spec.scheduler(optimizer)["scheduler"]
    out = []
    for _ in range(steps):
        out.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_the_lr_schedule_is_diffusers_constant_with_warmup(paper):
    """The authors' get_scheduler("constant_with_warmup", num_warmup_steps=500): lr 0 at step 0 (§10.1);
    onedc's default warm-up (warmup_start first) reaches lr/500 already at step 0."""
    from diffusers.optimization import get_scheduler

    spec = optimizer_spec(paper["stage"]["distill"])
    lrs = [step[0] for step in _lrs(spec, 600)]
    assert [lrs[s] for s in (0, 1, 499, 500, 599)] == pytest.approx([0.0, 5e-5 / 500, 5e-5 * 499 / 500, 5e-5, 5e-5],
                                                                    rel=1e-12, abs=0)
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    schedule = get_scheduler("constant_with_warmup", reference, num_warmup_steps=500)
    want = []
    for _ in range(600):
        want.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert lrs == pytest.approx(want, rel=1e-12, abs=0)
    # stage II: both groups (generator, guidance) from their own specs, same start
    dmd = paper["stage"]["dmd"]
    for spec in (optimizer_spec(dmd), optimizer_spec(dmd, "guidance_")):
        assert spec.warmup_start == "zero" and spec.lr_lambda()(0) == 0.0 and spec.lr_lambda()(500) == 1.0
    first = optimizer_spec({**paper["stage"]["distill"], "warmup_start": "first"})
    lrs = [step[0] for step in _lrs(first, 501)]
    assert [lrs[s] for s in (0, 1, 499, 500)] == pytest.approx([5e-5 / 500, 2 * 5e-5 / 500, 5e-5, 5e-5], rel=1e-12)
    with pytest.raises(ConfigError, match="warmup_start must be one of first, zero"):
        optimizer_spec({**paper["stage"]["distill"], "warmup_start": "one"})


@pytest.fixture
def commoncatalog(tmp_path):
    """A `save_to_disk` table with CommonCatalog's columns (jpg, blip2_caption, unickname): 24 small photos."""
    datasets = pytest.importorskip("datasets")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datamodules"))
    from source_helpers import build_folder

    datasets.disable_progress_bars()
    files = sorted(build_folder(tmp_path / "photos", 24).glob("*.jpg"))
    table = datasets.Dataset.from_dict(
        {"jpg": [{"bytes": f.read_bytes(), "path": None} for f in files],
         "blip2_caption": [f.with_suffix(".txt").read_text() for f in files], "unickname": [f.stem for f in files]},
        features=datasets.Features({"jpg": datasets.Image(), "blip2_caption": datasets.Value("string"),
                                    "unickname": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "cc"))
    return tmp_path


def test_the_authors_crop_protocol_reaches_the_batches(commoncatalog):
    """Per global batch one transform (resize to small, random small crop, or keep size with the batch cut
    to 2), drawn from (seed, batch); the protocol's sizes scaled down to 64/32 px to keep it cheap."""
    cfg = compose(["experiment=onedc_paper", f"data.path={commoncatalog / 'cc'}", "data.batch_size=4",
                   "data.num_workers=0", "data.protocol.size=64", "data.protocol.small=32", "seed=5"])
    module = build_datamodule(cfg.data, seed=int(cfg.seed))
    assert isinstance(module, SourceDataModule) and module.protocol == AuthorsCropProtocol(64, 32, 0.2, 0.5, 2)
    module.setup()
    batches = list(module.train_dataloader())
    modes = [module.protocol.mode(5, g) for g in range(6)]
    assert {"keep", "crop"} <= set(modes)  # seed 5 draws both shapes within the 6 batches of an epoch
    assert [tuple(b["image"].shape) for b in batches] == [
        (2, 3, 64, 64) if mode == "keep" else (4, 3, 32, 32) for mode in modes]
    assert all(c.startswith("caption ") for b in batches for c in b["caption"])  # stage II's captions: batch


def test_other_sources_keep_the_protocol_and_the_image_folder_refuses_it(tmp_path):
    cfg = compose(["experiment=onedc_paper", "data=captioned_folder", f"data.root={tmp_path}"])
    assert build_datamodule(cfg.data).protocol == AuthorsCropProtocol(1024, 512, 0.2, 0.5, 2)
    cfg = compose(["experiment=onedc_paper", "data=folder", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="data=captioned_folder") as err:
        build_datamodule(cfg.data)
    assert "\n" not in str(err.value)


def test_the_full_size_modules_build_on_meta(paper):
    vae = vae_from_config(paper["model"], device="meta")
    generator = generator_from_config(paper["model"], device="meta")
    guidance = build_guidance_model(paper["guidance"], device="meta")

    def count(module, trainable=None):
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    assert count(vae) == 83_653_863 and count(generator) == 928_619_276
    assert count(guidance) == 1_771_480_722 - 1000 - 33  # the file's elements minus alphas_cumprod and dummy_network
    assert count(guidance.real_unet, trainable=True) == 0 and guidance.real_unet.conv_in.weight.dtype == torch.bfloat16
    assert count(guidance.fake_unet, trainable=False) == 0


def test_the_readme_command_composes():
    """The README's paper command (continuation lines joined) is a valid set of overrides."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("python train.py experiment=onedc_paper")
    command = readme[start: readme.index("```", start)].replace("\\\n", " ")
    cfg = compose(shlex.split(command)[2:])
    assert cfg.stage.distill.lpips.weights == cfg.stage.dmd.lpips.weights == "/models/lpips-vgg"
    assert cfg.data.path.endswith("commoncatalog-cc-by-nd") and cfg.data.crop_protocol == "authors"
