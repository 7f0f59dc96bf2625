"""Importing the released layout (model.safetensors + model_1.safetensors + an SD-2.1 VAE dir) into onedc."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from onedc.errors import WeightsError
from onedc.modules.reference.generator import build_reference_generator
from onedc.families.reference.released import load_released_codec
from onedc.families.reference.released import (
    CODEC_FILE,
    GENERATOR_FILE,
    ReferenceArchitecture,
    import_reference,
    read_reference_weights,
    reference_architecture,
    released_codec_shapes,
    released_generator_shapes,
    save_released_checkpoint,
    vae_shapes,
)
from reference_testdata import SMALL_UNET, SMALL_VAE, read_key_list

SMALL_CODEC = {"internal_ch": 64, "bottleneck_ch": 32, "unet_ch_config": (32, 32, 32), "semantic_ch": 32,
               "feature_ch": 32, "pix_emb_ch": 8}
SMALL_GENERATOR = {"unet_config": {**SMALL_UNET, "cross_attention_dim": 32}, "gs_channels": 32,
                   "lora_rank": 4, "lora_alpha": 0.5}
SMALL = ReferenceArchitecture(generator=SMALL_GENERATOR, codec=SMALL_CODEC, vae=SMALL_VAE)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """Random small-width modules written as the authors release them, plus a diffusers VAE dir."""
    from diffusers import AutoencoderKL

    from onedc.modules.reference.codec import ReferenceCodec

    root = tmp_path_factory.mktemp("released")
    generator = build_reference_generator(seed=2, **SMALL_GENERATOR).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-zero LoRA B, so "values survive" covers the adapter too
        for name, param in generator.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    torch.manual_seed(6)
    codec = ReferenceCodec(**SMALL_CODEC)
    vae = AutoencoderKL(**SMALL_VAE)
    save_released_checkpoint(generator, codec, root / "ckpt")
    vae.save_pretrained(root / "vae")
    return {"root": root, "ckpt": root / "ckpt", "vae": root / "vae", "generator": generator, "codec": codec,
            "autoencoder": vae}


def _features(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    return torch.randn(batch, 32, 8, 8, generator=gen), torch.randn(batch, 1, 32, generator=gen)


def test_the_onedc_sd15_preset_expects_exactly_the_released_key_lists():
    from onedc.training.config import compose, to_dict

    full = reference_architecture(to_dict(compose(["model=onedc_sd15"]).model))
    for shapes, name, count in ((released_generator_shapes(full), "feedforward.txt", 1252),
                                (released_codec_shapes(full), "codec.txt", 779),
                                (vae_shapes(full), "vae.txt", 248)):
        expected = read_key_list(name)
        assert len(shapes) == len(expected) == count
        assert {k: tuple(v) for k, v in shapes.items()} == {k: s for k, (s, _) in expected.items()}


def test_synthetic_release_imports_with_every_key_consumed_and_values_kept(released):
    weights = read_reference_weights(released["ckpt"], released["vae"], architecture=SMALL)
    files = {name: load_file(str(released["ckpt"] / name)) for name in (GENERATOR_FILE, CODEC_FILE)}
    generator_state = released["generator"].state_dict()
    assert len(weights.generator) == len(files[GENERATOR_FILE]) == len(generator_state)
    assert len(weights.codec) == len(files[CODEC_FILE]) == len(released["codec"].state_dict())
    assert set(weights.vae) == set(released["autoencoder"].state_dict())
    assert all(torch.equal(weights.generator[k], v) for k, v in generator_state.items())
    assert all(torch.equal(weights.codec[k], v) for k, v in released["codec"].state_dict().items())
    assert all(torch.equal(weights.vae[k], v) for k, v in released["autoencoder"].state_dict().items())
    # A freshly drawn generator that takes the imported weights strictly computes the same x0.
    fresh = build_reference_generator(seed=99, **SMALL_GENERATOR).eval()
    fresh.load_state_dict(weights.generator, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(*_features()), released["generator"](*_features()))


def test_merged_import_loads_into_a_generator_without_lora(released):
    weights = read_reference_weights(released["ckpt"], released["vae"], architecture=SMALL, merge_lora=True)
    assert not any(".lora_" in k or ".base_layer." in k for k in weights.generator)
    plain = build_reference_generator(seed=99, lora=False, **SMALL_GENERATOR).eval()
    plain.load_state_dict(weights.generator, strict=True)
    with torch.no_grad():
        expected = released["generator"](*_features())
        assert (plain(*_features()) - expected).abs().max() < 1e-5 * expected.abs().max()


def test_import_reference_writes_an_onedc_checkpoint(released, tmp_path):
    model = {"name": "small", "generator": {"lora": {"rank": 4, "alpha": 0.5}}}
    out = import_reference(released["ckpt"], released["vae"], tmp_path / "ref.ckpt", model_config=model,
                           architecture=SMALL)
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["onedc"]["model"] == model and checkpoint["onedc"]["stage"] == "finetune"
    state = checkpoint["state_dict"]
    counts = {p: sum(k.startswith(p) for k in state) for p in ("vae.autoencoder.", "codec.", "generator.")}
    assert counts == {"vae.autoencoder.": len(released["autoencoder"].state_dict()),
                      "codec.": len(released["codec"].state_dict()),
                      "generator.": len(released["generator"].state_dict())}
    assert len(state) == sum(counts.values())
    merged = import_reference(released["ckpt"], released["vae"], tmp_path / "merged.ckpt", model_config=model,
                              architecture=SMALL, merge_lora=True)
    merged = torch.load(merged, weights_only=False)
    assert merged["onedc"]["model"]["generator"]["lora"] is None and model["generator"]["lora"]  # caller's untouched
    assert not any(".lora_" in k for k in merged["state_dict"])
    # The codec half goes back into the codec's own released-file loader unchanged.
    codec = load_released_codec(released["ckpt"] / CODEC_FILE, **SMALL_CODEC)
    assert all(torch.equal(state["codec." + k], v) for k, v in codec.state_dict().items())


def _corrupt(src: Path, dst: Path, name: str, edit) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for file in (GENERATOR_FILE, CODEC_FILE):
        state = load_file(str(src / file))
        if file == name:
            edit(state)
        save_file(state, str(dst / file))


def _drop(key: str):
    return lambda state: state.pop(key)


def _add(key: str):
    return lambda state: state.__setitem__(key, torch.zeros(2))


def _reshape(key: str):
    return lambda state: state.__setitem__(key, torch.zeros(3, 3))


@pytest.mark.parametrize("name, edit, shown", [
    (GENERATOR_FILE, _drop("vae_reduction.short_cut.weight"), "missing keys: vae_reduction.short_cut.weight"),
    (GENERATOR_FILE, _add("up_blocks.0.resnets.0.conv1.weight"), "unexpected keys: up_blocks.0.resnets.0.conv1.weight"),
    (GENERATOR_FILE, _reshape("conv_in.weight"), "wrong shapes (file vs model): conv_in.weight (3, 3)"),
    (CODEC_FILE, _drop("hyper_dec.feat_in.0.weight"), "missing keys: hyper_dec.feat_in.0.weight"),
    (CODEC_FILE, _add("module.enc.pix_emb.weight"), "unexpected keys: module.enc.pix_emb.weight"),
], ids=["generator-missing", "generator-unexpected", "generator-shape", "codec-missing", "codec-unexpected"])
def test_wrong_released_files_fail_with_one_line_naming_file_and_keys(released, tmp_path, name, edit, shown):
    _corrupt(released["ckpt"], tmp_path / "bad", name, edit)
    with pytest.raises(WeightsError) as info:
        read_reference_weights(tmp_path / "bad", released["vae"], architecture=SMALL)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "bad" / name) in message and shown in message


def test_missing_or_unreadable_files_fail_with_one_line(released, tmp_path):
    with pytest.raises(WeightsError, match="not a directory"):
        read_reference_weights(tmp_path / "nowhere", released["vae"], architecture=SMALL)
    _corrupt(released["ckpt"], tmp_path / "bad", CODEC_FILE, lambda state: None)
    (tmp_path / "bad" / GENERATOR_FILE).write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match=f"cannot read .*{GENERATOR_FILE}") as info:
        read_reference_weights(tmp_path / "bad", released["vae"], architecture=SMALL)
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="weights not found") as info:
        read_reference_weights(released["ckpt"], tmp_path, architecture=SMALL)
    assert "\n" not in str(info.value)


def test_vae_dir_with_old_attention_names_or_a_wrong_vae(released, tmp_path):
    import shutil

    state = load_file(str(released["vae"] / "diffusion_pytorch_model.safetensors"))
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in state.items():
        for new, legacy in renames.items():
            key = key.replace(new, legacy) if ".attentions." in key else key
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(released["vae"], legacy_dir)
    save_file(old, str(legacy_dir / "diffusion_pytorch_model.safetensors"))
    weights = read_reference_weights(released["ckpt"], legacy_dir, architecture=SMALL)
    assert all(torch.equal(weights.vae[k], v) for k, v in state.items())
    state["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    save_file(state, str(legacy_dir / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match="decoder.conv_out.weight") as info:
        read_reference_weights(released["ckpt"], legacy_dir, architecture=SMALL)
    assert "\n" not in str(info.value) and "diffusion_pytorch_model.safetensors" in str(info.value)
