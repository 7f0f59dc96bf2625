"""``onedc import-reference --tokenizer FILE -o DIR`` end to end: the file the authors ship (a
plain torch.save state dict) -> a VQModel dir -> the maskgit_vqgan teacher's tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from onedc.training.build import teacher_from_config
from onedc.cli import main
from onedc.modules.maskgit import maskgit_source_shapes

CONFIG = Path(__file__).parents[2] / "configs" / "tokenizer" / "maskgit_vqgan.yaml"
# MaskGIT at a quarter width (32 .. 128 channels, GroupNorm 32 as the real file), 128 codes.
SMALL = dict(in_channels=3, out_channels=3, block_out_channels=[32, 32, 64, 64, 128], layers_per_block=2,
             latent_channels=32, num_vq_embeddings=128)


def _random_maskgit_file(path: Path) -> Path:
    """Random tensors in the released layout: convs ~ N(0, 1/fan_in), norms around 1/0."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in maskgit_source_shapes(SMALL).items():
        if "norm" in key:
            base = 1.0 if key.endswith("weight") else 0.0
            state[key] = base + 0.1 * torch.randn(shape, generator=gen)
        elif key == "quantize.embedding.weight":
            state[key] = 0.3 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, torch.Size(shape[1:]).numel())
            state[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    torch.save(state, path)
    return path


def _teacher(pretrained: Path):
    cfg = OmegaConf.load(CONFIG)
    cfg.pretrained = str(pretrained)
    return teacher_from_config(cfg)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_import_tokenizer_gives_the_teacher_of_the_original_file(tmp_path, capsys):
    source = _random_maskgit_file(tmp_path / "maskgit-vqgan-small.bin")
    out = tmp_path / "models" / "maskgit-vqgan"
    assert main(["import-reference", "--tokenizer", str(source), "-o", str(out)]) == 0
    assert f"tokenizer.pretrained={out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "onedc_import.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging dir left
    assert json.loads((out / "onedc_import.json").read_text())["source"] == source.name

    imported, direct = _teacher(out), _teacher(source)
    assert imported.identity.startswith("VQTeacher:sha256=") and ":range=0,1:resize=bilinear" in imported.identity
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = imported.targets(x).indices
    assert tokens.shape == (2, 8, 8) and tokens.unique().numel() > 1
    assert torch.equal(tokens, direct.targets(x).indices)
    assert torch.equal(imported.codebook(), direct.codebook())

    # Never over a previous result: the second import is refused and the first stays intact.
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["import-reference", "--tokenizer", str(source), "-o", str(out)]) != 0
    assert "already exists" in _error_line(capsys)
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("content", [b"garbage", None])
def test_wrong_file_is_one_line_and_writes_nothing(tmp_path, capsys, content):
    bad = tmp_path / "bad.bin"
    if content is None:  # a diffusers-layout state dict is not the MaskGIT file
        torch.save({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, bad)
    else:
        bad.write_bytes(content)
    out = tmp_path / "out"
    assert main(["import-reference", "--tokenizer", str(bad), "-o", str(out)]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and ("cannot read" in line or "missing keys" in line)
    assert not out.exists()


def test_checkpoint_mode_is_reserved_and_modes_do_not_mix(tmp_path, capsys):
    assert main(["import-reference", str(tmp_path), "--tokenizer", "x.bin", "-o", str(tmp_path / "o")]) == 2
    assert "not both" in _error_line(capsys)
    assert main(["import-reference", "-o", str(tmp_path / "o")]) == 2
    assert "--tokenizer FILE" in _error_line(capsys)


def test_checkpoint_mode_never_replaces_an_existing_output_unasked(tmp_path, capsys):
    """Checked before anything is read: an existing OUT.ckpt needs --force, the inputs never are outputs."""
    released, vae = tmp_path / "released", tmp_path / "vae"
    released.mkdir()
    vae.mkdir()
    (released / "model.safetensors").write_bytes(b"released")
    out = tmp_path / "onedc.ckpt"
    out.write_bytes(b"mine")
    assert main(["import-reference", str(released), "--vae", str(vae), "-o", str(out)]) == 2
    assert _error_line(capsys) == f"error: {out} already exists: pass --force to replace it"
    assert out.read_bytes() == b"mine"
    inside = released / "model.safetensors"
    assert main(["import-reference", str(released), "--vae", str(vae), "-o", str(inside), "--force"]) == 2
    assert "never overwrites its inputs" in _error_line(capsys)
    assert inside.read_bytes() == b"released"
