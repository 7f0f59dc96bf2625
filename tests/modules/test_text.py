"""The guidance model's CLIP text conditioning: a tiny CLIPTextModel + tokenizer, saved and loaded back offline."""
from __future__ import annotations

import pytest
import torch

from onedc.errors import WeightsError
from onedc.modules.text import build_text_encoder, load_text_encoder

TINY_CLIP = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def text():
    return build_text_encoder(config=TINY_CLIP, seed=1)


def test_captions_become_padded_last_hidden_states(text):
    emb = text(["a photo of a cat", "", "a photo of a dog"])
    assert emb.shape == (3, 77, 32) and not emb.requires_grad
    assert not torch.equal(emb[0], emb[2])  # different captions, different embeddings
    # The unconditional embedding is that of "" (BOS, EOS, then EOS padding), repeated.
    assert torch.equal(text.empty(2), emb[1:2].expand(2, -1, -1))
    ids = text.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert ids[0].item() == text.tokenizer.bos_token_id and (ids[1:] == text.tokenizer.eos_token_id).all()
    # Same seed, same encoder; another seed, another one.
    assert torch.equal(build_text_encoder(config=TINY_CLIP, seed=1)(["x"]), text(["x"]))
    assert not torch.equal(build_text_encoder(config=TINY_CLIP, seed=2)(["x"]), text(["x"]))


@pytest.mark.parametrize("layout", ["one_dir", "sd_dir"])
def test_a_saved_encoder_loads_back_from_a_local_dir(text, tmp_path, layout):
    tok_dir, enc_dir = (tmp_path, tmp_path) if layout == "one_dir" else (tmp_path / "tokenizer", tmp_path / "text_encoder")
    text.tokenizer.save_pretrained(tok_dir)
    text.encoder.save_pretrained(enc_dir)
    loaded = load_text_encoder(tmp_path)
    captions = ["a red motorcycle", ""]
    assert torch.equal(loaded(captions), text(captions))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_missing_or_wrong_dir_is_one_line(tmp_path):
    with pytest.raises(WeightsError, match="not a directory"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(WeightsError) as err:
        load_text_encoder(tmp_path)  # empty dir
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
