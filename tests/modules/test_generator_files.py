"""model.generator.pretrained given a UNet state-dict file (DMD2's SD-1.5 ``pytorch_model.bin`` style)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from onedc.training.build import generator_from_config
from onedc.training.config import compose, to_dict
from onedc.errors import WeightsError

LORA = {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}


@pytest.fixture(scope="module")
def tiny_model() -> dict:
    model = to_dict(compose(["model=tiny_random"]).model)
    model["generator"]["lora"] = LORA  # as the sd15 preset: the file is the base under LoRA
    return model


def _unet_state(unet_config: dict, seed: int) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config).state_dict()


def _with_pretrained(model: dict, path) -> dict:
    return dict(model, generator=dict(model["generator"], pretrained=str(path)))


@torch.no_grad()
def test_unet_state_dict_files_load_strictly(tiny_model, tmp_path):
    gen = tiny_model["generator"]
    state = _unet_state(gen["unet"], gen["seed"])  # what generator_from_config draws from this seed
    torch.save(state, tmp_path / "pytorch_model.bin")
    save_file(state, tmp_path / "unet.safetensors")
    drawn = generator_from_config(tiny_model).eval()
    other = generator_from_config(dict(tiny_model, generator=dict(gen, seed=gen["seed"] + 1))).eval()
    features = torch.randn(2, tiny_model["codec"]["gs_channels"], 16, 16)
    tokens = torch.randn(2, 4, tiny_model["codec"]["token_dim"])
    want = drawn(features, tokens)
    assert not torch.equal(other(features, tokens), want)  # the weights decide the output
    for name in ("pytorch_model.bin", "unet.safetensors"):
        loaded = generator_from_config(_with_pretrained(tiny_model, tmp_path / name)).eval()
        assert torch.equal(loaded(features, tokens), want)
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())


def test_wrong_unet_files_fail_with_one_line(tiny_model, tmp_path):
    gen = tiny_model["generator"]
    state = _unet_state(gen["unet"], 0)
    wider = _unet_state(dict(gen["unet"], block_out_channels=[32, 128]), 0)
    missing = {k: v for k, v in state.items() if k != "conv_out.weight"}
    cases = {"wrong_shapes.bin": (wider, "wrong shapes (file vs model)"),
             "missing.safetensors": (missing, "missing keys: conv_out.weight"),
             "extra.pt": ({**state, "text_encoder.weight": torch.zeros(2)}, "unexpected keys: text_encoder.weight")}
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        save_file(content, path) if name.endswith(".safetensors") else torch.save(content, path)
        cases[name] = (path, needle)
    (tmp_path / "garbage.bin").write_bytes(b"\x00" * 64)
    cases["garbage.bin"] = (tmp_path / "garbage.bin", "cannot read")
    (tmp_path / "model.ckpt").write_bytes(b"")
    cases["model.ckpt"] = (tmp_path / "model.ckpt", "unknown suffix")
    cases["absent.bin"] = (tmp_path / "absent.bin", "not found")
    for name, (path, needle) in cases.items():
        with pytest.raises(WeightsError) as err:
            generator_from_config(_with_pretrained(tiny_model, path))
        message = str(err.value)
        assert "\n" not in message and str(path) in message and needle in message, (name, message)
