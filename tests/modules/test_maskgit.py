"""MaskGIT-VQGAN -> diffusers VQModel conversion (docs/reference-model.md §8) against an implementation of the
source architecture written from §8 (tests/modules/maskgit_source.py), with random weights."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from onedc.training.build import teacher_from_config as build_teacher_from_config
from onedc.datamodules.image_folder import load_image
from onedc.errors import WeightsError
from onedc.modules.maskgit import maskgit_source_shapes, maskgit_vqmodel, maskgit_vqmodel_config
from onedc.modules.teachers import build_teacher

from maskgit_source import MaskGitVQGAN, random_maskgit

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"  # the reference key lists
CONFIG = Path(__file__).parents[2] / "configs" / "tokenizer" / "maskgit_vqgan.yaml"
# A quarter-width MaskGIT (32, 32, 64, 64, 128), 128 codes of 32 dims, GroupNorm(32) as the
# real one (the group count is not in the weights): the file's structure, small enough for CPU.
SMALL = dict(hidden=32, blocks=2, z=32, codes=128, groups=32)


def _photo_crops() -> torch.Tensor:
    """Two 256 px crops in [-1, 1] of scikit-image's astronaut and coffee (docs/reference-model.md §13's places)."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    astronaut = load_image(root / "astronaut.png")[:, 0:256, 128:384]
    coffee = load_image(root / "coffee.png")[:, 72:328, 172:428]
    return torch.stack([astronaut, coffee])


def _reference_input(x: torch.Tensor) -> torch.Tensor:
    """§8: plain bilinear x1/2 (align_corners False, no antialias) of x in [-1, 1], then x*0.5+0.5."""
    half = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear",
                         align_corners=False, antialias=False)
    return half * 0.5 + 0.5


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return _photo_crops()


@pytest.fixture(scope="module")
def source(crops) -> MaskGitVQGAN:
    return random_maskgit(0, _reference_input(crops), **SMALL)


@pytest.fixture(scope="module")
def source_file(source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("maskgit") / "maskgit-small.bin"
    torch.save(source.state_dict(), path)  # the released file's format: a plain torch.save state dict
    return path


def _reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    rows = [line.rstrip("\n").split("\t") for line in (REFERENCE / name).read_text().splitlines(True)
            if not line.startswith("#")]
    return {key: tuple(int(n) for n in re.findall(r"\d+", shape)) for key, shape, _ in rows}


def test_source_layout_is_the_released_file():
    """The oracle and the converter's key table both describe reference/tokenizer.txt exactly."""
    reference = _reference_shapes("tokenizer.txt")
    with torch.device("meta"):
        oracle = MaskGitVQGAN()
    assert {k: tuple(v.shape) for k, v in oracle.state_dict().items()} == reference
    meta_state = {k: torch.empty(s, device="meta") for k, s in reference.items()}
    config = maskgit_vqmodel_config(meta_state)
    assert config["block_out_channels"] == [128, 128, 256, 256, 512] and config["num_vq_embeddings"] == 1024
    shapes = maskgit_source_shapes(config)
    assert list(shapes) == list(reference) and shapes == reference
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 54_515_587


@torch.no_grad()
def test_conversion_is_exact(source, crops):
    """Encoder within 1e-5, token indices 100 % equal, decoder within 1e-4 (docs/reference-model.md §8)."""
    vq = maskgit_vqmodel(source.state_dict())
    x = _reference_input(crops)
    h_ref = source.encoder(x)
    h = vq.encode(x).latents
    assert h.shape == h_ref.shape == (2, 32, 8, 8)
    assert h_ref.abs().max() > 0.5  # values of a useful size, so 1e-5 is a tight bound
    assert (h - h_ref).abs().max() <= 1e-5

    idx_ref = source.quantize.indices(h_ref)
    _, _, (_, _, idx) = vq.quantize(h)
    assert torch.equal(idx.reshape(idx_ref.shape), idx_ref)
    assert idx_ref.unique().numel() >= 24  # many codes in play: a wrong encoder would move them

    zq = source.quantize.embedding.weight[idx_ref].permute(0, 3, 1, 2)
    out_ref = source.decoder(zq, clamp=False)
    out = vq.decode(zq, force_not_quantize=True).sample
    assert out.shape == out_ref.shape == (2, 3, 128, 128)
    assert out_ref.abs().max() > 0.5
    assert (out - out_ref).abs().max() <= 1e-4
    # The full VQModel path (quantize inside decode) agrees with the source after its clamp.
    assert (vq.decode(h).sample.clamp(0, 1) - source.decoder(zq)).abs().max() <= 1e-4


@torch.no_grad()
def test_teacher_input_protocol_is_section_8(source, source_file, crops, caplog):
    """maskgit_vqgan.yaml: [0, 1] after plain bilinear x1/2; tokens on a grid of 1/32 of the crop.

    The .bin is given as tokenizer.pretrained directly: converted on load, with a log line.
    """
    cfg = OmegaConf.load(CONFIG)
    assert list(cfg.input_range) == [0, 1] and cfg.resize == "bilinear" and cfg.input_scale == 0.5
    cfg.pretrained = str(source_file)
    with caplog.at_level(logging.INFO, logger="onedc"):
        teacher = build_teacher_from_config(cfg)
    assert any("MaskGIT-VQGAN state dict: converting" in r.getMessage() for r in caplog.records)
    indices = teacher.targets(crops).indices
    assert indices.shape == (2, 256 // 32, 256 // 32)
    expected = source.tokens(_reference_input(crops))
    assert torch.equal(indices, expected)

    # Each half of the protocol matters: the test would catch either being wrong.
    kwargs = dict(pretrained=str(source_file), input_scale=0.5)
    antialiased = build_teacher("vq", input_range=(0, 1), resize="bilinear_antialias", **kwargs)
    minus_one_one = build_teacher("vq", input_range=(-1, 1), resize="bilinear", **kwargs)
    assert (antialiased.targets(crops).indices != expected).any()
    assert (minus_one_one.targets(crops).indices != expected).float().mean() > 0.2
    assert len({teacher.identity, antialiased.identity, minus_one_one.identity}) == 3


def _bad_files(source, tmp_path) -> dict[str, tuple[Path, str]]:
    state = source.state_dict()
    missing = dict(state)
    del missing["decoder.up.2.block.1.conv1.weight"]
    mis_shaped = dict(state)
    mis_shaped["encoder.mid.0.conv1.weight"] = torch.zeros(128, 128, 1, 1)
    files = {"missing key": (missing, "decoder.up.2.block.1.conv1.weight"),
             "wrong shape": (mis_shaped, "encoder.mid.0.conv1.weight (128, 128, 1, 1) vs (128, 128, 3, 3)"),
             "extra key": ({**state, "ema.decay": torch.zeros(())}, "ema.decay")}
    out = {}
    for name, (content, needle) in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.bin"
        torch.save(content, path)
        out[name] = (path, needle)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a torch file at all")
    out["not a state dict"] = (garbage, "cannot read")
    foreign = tmp_path / "vqmodel_wrong_width.safetensors"  # diffusers layout, other widths than `config`
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in maskgit_vqmodel(state).state_dict().items()}, foreign)
    out["diffusers layout, wrong shapes"] = (foreign, "wrong shapes")
    return out


def test_wrong_tokenizer_files_fail_with_one_line(source, tmp_path):
    cfg = OmegaConf.load(CONFIG)
    for name, (path, needle) in _bad_files(source, tmp_path).items():
        cfg.pretrained = str(path)
        with pytest.raises(WeightsError) as err:
            build_teacher_from_config(cfg)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and needle in message, (name, message)
