"""``onedc import-reference --guidance model_2.safetensors -o OUT``: the authors' stage-II guidance state, in the
released layout (bf16 real UNet, ``dummy_network.*``, ``module.`` prefix), becomes what ``stage=dmd`` loads."""
from __future__ import annotations

import torch

from onedc.cli import main
from onedc.families.reference.released import save_released_guidance
from onedc.training.build import build_guidance_model
from onedc.training.config import compose, to_dict


def test_import_guidance_then_continue_stage_two(tmp_path, capsys):
    node = to_dict(compose(["guidance=tiny"]).guidance)
    authors = build_guidance_model(node)
    with torch.no_grad():
        for p in authors.fake_unet.parameters():
            p.add_(0.01)  # trained: the fake UNet no longer equals the real one
    released = tmp_path / "model_2.safetensors"
    save_released_guidance(authors, released, real_bf16=True, wrapper_prefix=True, dummy_network=True)
    out = tmp_path / "guidance.safetensors"
    assert main(["import-reference", "--guidance", str(released), "--guidance-preset", "tiny", "-o", str(out)]) == 0
    assert "guidance.pretrained=" in capsys.readouterr().out
    loaded = build_guidance_model({**node, "pretrained": str(out)})
    for key, value in authors.state_dict().items():
        want = value.to(torch.bfloat16).float() if key.startswith("real_unet.") else value
        assert torch.equal(loaded.state_dict()[key], want), key
    assert not any(p.requires_grad for p in loaded.real_unet.parameters())


def test_a_guidance_file_of_another_size_is_one_error_line(tmp_path, capsys):
    authors = build_guidance_model(to_dict(compose(["guidance=tiny"]).guidance))
    released = tmp_path / "model_2.safetensors"
    save_released_guidance(authors, released)
    code = main(["import-reference", "--guidance", str(released), "-o", str(tmp_path / "out.safetensors")])  # sd15 expected
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1 and "model_2.safetensors" in err
    assert not (tmp_path / "out.safetensors").exists()
