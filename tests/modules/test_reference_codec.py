"""The reference codec IntraNoAR (docs/reference-model.md §3-§4): released layout at full size, small-width mechanics.

The full-size model is built on the meta device only (no memory, no init); its keys, shapes and
dtypes must equal the released ``model_1.safetensors`` list (tests/data/reference/codec.txt) and
its parts the counts of docs/reference-model.md §4.10.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from onedc.errors import WeightsError
from onedc.modules.reference.analysis import unet_trunk_forward
from onedc.modules.reference.codec import ReferenceCodec
from onedc.modules.reference.context import QuantiseResiduals, gather_step, scatter_step
from onedc.families.reference.released import load_released_codec, save_released_codec
from onedc.modules.reference.synthesis import semantic_tokens

KEY_LIST = Path(__file__).resolve().parents[1] / "data" / "reference" / "codec.txt"

#: docs/reference-model.md §4.10 / reference/param_counts.txt (elements).
PART_COUNTS = {
    "": 394_147_783, "enc": 299_130_112, "enc.unet": 285_933_184, "enc.unet.conv_in": 15_898_752,
    "enc.trans_coding": 13_096_832, "dec": 35_878_976, "semantic_adaptor": 39_185_792,
    "hyper_enc": 14_781_063, "hyper_dec": 960_128, "y_prior_fusion": 1_006_976,
    "y_spatial_prior_reduction": 32_896, "y_spatial_prior_adaptor_1": 528_640,
    "y_spatial_prior_adaptor_2": 528_640, "y_spatial_prior_adaptor_3": 528_640, "y_spatial_prior": 1_585_920,
}

SMALL = dict(internal_ch=64, bottleneck_ch=32, unet_ch_config=(64, 64, 64), semantic_ch=64, feature_ch=32,
             pix_emb_ch=16)


def read_key_list(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of a reference key list (``key<TAB>(d0, d1, ...)<TAB>dtype`` lines)."""
    entries = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        entries[key] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
    return entries


@pytest.fixture(scope="module")
def full_size() -> ReferenceCodec:
    with torch.device("meta"):
        return ReferenceCodec()


def test_full_size_state_dict_is_the_released_codec_file(full_size):
    expected = read_key_list(KEY_LIST)
    assert len(expected) == 779
    found = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in full_size.state_dict().items()}
    assert sorted(set(expected) - set(found)) == [] and sorted(set(found) - set(expected)) == []
    assert found == expected


@pytest.mark.parametrize("part,count", sorted(PART_COUNTS.items()))
def test_full_size_part_counts_match_reference(full_size, part, count):
    module = full_size.get_submodule(part) if part else full_size
    measured = sum(p.numel() for p in module.parameters())
    assert abs(measured - count) <= 0.01 * count, (part, measured, count)


def test_trunk_attention_has_heads_of_dim_8(full_size):
    unet = full_size.enc.unet
    assert unet.down_blocks[0].attentions[0].heads == 64  # 512 ch / 8
    assert unet.down_blocks[1].attentions[0].heads == 96  # 768 ch / 8
    assert unet.mid_block.attentions[0].heads == 96
    assert full_size.fsq.levels == [4] * 7 and full_size.fsq.bits_per_index == 14


@pytest.fixture(scope="module")
def small() -> ReferenceCodec:
    torch.manual_seed(0)
    return ReferenceCodec(**SMALL).eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 128, 192, generator=gen) * 2 - 1
    return x, torch.randn(1, 4, 16, 24, generator=gen)


def test_small_forward_shapes_and_quantisation(small, inputs):
    x, v = inputs
    with torch.no_grad():
        out = small(x, v)
    assert out.y.shape == (1, 32, 8, 12) and out.z.shape == (1, 7, 2, 3)
    assert out.semantic.shape == (1, 64, 2, 3) and out.features.shape == (1, 32, 16, 24)
    assert semantic_tokens(out.semantic).shape == (1, 6, 64)
    assert torch.equal(semantic_tokens(out.semantic)[0, 4], out.semantic[0, :, 1, 1])  # row-major tokens
    # ŷ = round(y − μ) + μ: integer residuals, within half a step of y.
    assert torch.equal(out.q, torch.round(out.q)) and torch.allclose(out.y_hat, out.q + out.means)
    assert (out.y_hat - out.y).abs().max() <= 0.5 + 1e-5
    assert set(torch.unique(out.z_hat).tolist()) <= {-1.0, -0.5, 0.0, 0.5}
    assert torch.equal(small.fsq.indices_to_codes(out.z_indices), out.z_hat)
    assert (out.y_bits >= 0).all() and out.y_bits.sum() > 0


def test_trunk_forward_is_diffusers_forward_plus_the_mid_block_output(small):
    unet = small.enc.unet
    sample = torch.randn(1, SMALL["feature_ch"], 16, 16, generator=torch.Generator().manual_seed(3))
    captured = []
    handle = unet.mid_block.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            standard = unet(sample, 999).sample
            y0, sem = unet_trunk_forward(unet, sample)
    finally:
        handle.remove()
    assert y0.shape == (1, SMALL["internal_ch"], 8, 8) and sem.shape == (1, 64, 2, 2)
    assert torch.equal(y0, standard) and torch.equal(sem, captured[0])


def test_z_only_mode_is_the_prior_means_and_costs_no_y_bits(small, inputs):
    with torch.no_grad():
        out = small(*inputs, z_only=True)
    assert torch.equal(out.y_hat, out.means) and not out.q.any() and not out.y_bits.any()
    full = small(*inputs)
    assert torch.equal(out.z_indices, full.z_indices)  # z does not depend on the y mode
    assert not torch.equal(out.y_hat, full.y_hat)


def test_decoder_replaying_the_coded_symbols_reproduces_encoder(small, inputs):
    """What a bitstream carries per step (gather_step of q) is all the decoder needs: same ŷ, S, F."""
    with torch.no_grad():
        out = small(*inputs)
        hyper = small.hyper_synthesise(out.z_hat)
        encoder = QuantiseResiduals(out.y)
        sent: list[torch.Tensor] = []

        def encode(step, mask, means, scales):
            q = encoder(step, mask, means, scales)
            sent.append(gather_step(q, step))
            return q

        small.code_y(hyper, encode)
        assert all(s.shape == (1, 8, 8, 12) for s in sent)

        def decode(step, mask, means, scales):
            return scatter_step(sent[step], step)

        context, semantic, features = small.decode_from_z(small.fsq.indices_to_codes(out.z_indices), decode)
    assert torch.equal(context.y_hat, out.y_hat)
    assert torch.equal(semantic, out.semantic) and torch.equal(features, out.features)


def test_training_mode_passes_gradients_through_rounding(inputs):
    torch.manual_seed(0)
    codec = ReferenceCodec(**SMALL).train()
    out = codec(*inputs)
    (out.features.square().mean() + out.y_bits.mean()).backward()
    assert codec.enc.pix_emb.weight.grad is not None and codec.enc.pix_emb.weight.grad.abs().sum() > 0
    assert codec.hyper_enc.fusion[5].weight.grad.abs().sum() > 0  # through FSQ's straight-through


def test_save_in_released_layout_and_strict_load_back(small, inputs, tmp_path):
    path = save_released_codec(small, tmp_path / "model_1.safetensors")
    on_disk = load_file(str(path))
    assert set(on_disk) == set(small.state_dict())
    assert "enc.unet.conv_in.0.nin_shortcut.weight" in on_disk  # bare reference keys, no prefix
    torch.manual_seed(123)
    fresh = ReferenceCodec(**SMALL).eval()
    assert not torch.equal(fresh.dec.conv_out.block[1].conv.weight, small.dec.conv_out.block[1].conv.weight)
    load_released_codec(path, fresh)
    loaded = fresh.state_dict()
    for key, value in small.state_dict().items():
        assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(*inputs).features, small(*inputs).features)


def test_load_without_a_codec_builds_on_meta_and_takes_the_file(small, inputs, tmp_path):
    path = save_released_codec(small, tmp_path / "model_1.safetensors")
    loaded = load_released_codec(path, **SMALL).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).y_hat, small(*inputs).y_hat)


def _broken(state: dict, kind: str) -> dict:
    state = dict(state)
    if kind == "missing":
        del state["hyper_enc.fusion.5.bias"]
    elif kind == "unexpected":
        state["module.enc.pix_emb.weight"] = state["enc.pix_emb.weight"].clone()
    else:
        state["y_spatial_prior_reduction.weight"] = torch.zeros(3, 3, 1, 1)
    return state


@pytest.mark.parametrize("kind,named", [("missing", "hyper_enc.fusion.5.bias"),
                                        ("unexpected", "module.enc.pix_emb.weight"),
                                        ("misshaped", "y_spatial_prior_reduction.weight (3, 3, 1, 1)")])
def test_wrong_files_fail_with_one_line_naming_file_and_keys(small, tmp_path, kind, named):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in _broken(small.state_dict(), kind).items()}, str(path))
    with pytest.raises(WeightsError) as info:
        load_released_codec(path, ReferenceCodec(**SMALL))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and named in message


def test_missing_or_unreadable_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_released_codec(tmp_path / "model_1.safetensors", ReferenceCodec(**SMALL))
    garbage = tmp_path / "model_1.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(WeightsError, match="model_1.safetensors"):
        load_released_codec(garbage, ReferenceCodec(**SMALL))
