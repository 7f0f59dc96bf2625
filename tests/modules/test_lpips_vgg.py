"""LPIPS with ``backbone=vgg``: what ``piq.LPIPS(replace_pooling=True)`` computes (the paper's stage I loss,
docs/reference-model.md §10.1), with the VGG16 and the heads read from local files.

The weights are random, drawn and saved by the tests in torchvision's and piq's file formats; piq
itself is the oracle: its ``LPIPS`` class is built with its two downloads answered from the same
tensors (``vgg16`` and ``torch.hub.load_state_dict_from_url`` patched), so the comparison checks the
layers, the pooling, the normalisation, the heads and the [-1, 1] -> [0, 1] mapping at once.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from onedc.errors import ConfigError, WeightsError
from onedc.modules.losses import (PIQ_LPIPS_FILE, VGG16_FILE, VGG16_LPIPS_WIDTHS, PerceptualLoss,
                                  vgg_lpips_weight_paths)

piq_perceptual = pytest.importorskip("piq.perceptual")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A torch hub dir holding a random VGG16 (torchvision's keys, features only) and random piq heads."""
    from torchvision.models.vgg import cfgs, make_layers

    root = tmp_path_factory.mktemp("lpips-vgg")
    (root / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(11)
    features = make_layers(cfgs["D"])
    for module in features:
        if isinstance(module, nn.Conv2d):  # VGG's own init (kaiming, fan_out): features stay O(1) through 13 convs
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.05)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()},
               root / "hub" / "checkpoints" / VGG16_FILE)
    heads = [torch.rand(1, width, 1, 1) for width in VGG16_LPIPS_WIDTHS]
    torch.save(heads, root / "hub" / "checkpoints" / PIQ_LPIPS_FILE)
    return root


def _piq_lpips(weights_dir, monkeypatch, replace_pooling: bool) -> nn.Module:
    """piq's own ``LPIPS`` class, its two downloads answered from the files of ``weights_dir``."""
    from torchvision.models.vgg import cfgs, make_layers

    folder = weights_dir / "hub" / "checkpoints"
    state = torch.load(folder / VGG16_FILE, weights_only=True)
    heads = torch.load(folder / PIQ_LPIPS_FILE, weights_only=True)

    def vgg16(pretrained: bool = False, progress: bool = True):
        assert pretrained  # piq asks for torchvision's ImageNet weights
        model = nn.Module()
        model.features = make_layers(cfgs["D"])
        model.features.load_state_dict({k[len("features."):]: v for k, v in state.items()})
        return model

    monkeypatch.setattr(piq_perceptual, "vgg16", vgg16)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, progress=True: heads)
    return piq_perceptual.LPIPS(replace_pooling=replace_pooling, reduction="none")


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(-1.1, 1.1)
    return x_hat, x


def test_vgg_lpips_is_piqs_lpips_with_average_pooling(weights_dir, monkeypatch):
    ours = PerceptualLoss(weights_dir, backbone="vgg")
    x_hat, x = _pair()
    distance = ours(x_hat, x)
    with torch.no_grad():
        want = _piq_lpips(weights_dir, monkeypatch, replace_pooling=True)(x_hat * 0.5 + 0.5, x * 0.5 + 0.5)
        max_pooled = _piq_lpips(weights_dir, monkeypatch, replace_pooling=False)(x_hat * 0.5 + 0.5, x * 0.5 + 0.5)
    assert distance.shape == (2,) and (distance > 0).all()
    # The same float32 operations in the same order: measured relative gap 0 (native and ATEN default +
    # oneDNN SSE4.1 kernels); feeding piq [-1, 1] instead of [0, 1] is 31 % off, max pooling 41 %.
    torch.testing.assert_close(distance, want, rtol=1e-5, atol=0)
    assert ((distance - max_pooled).abs() / want).min() > 0.1  # lpips' and piq's default pooling: another loss
    assert not any(isinstance(m, nn.MaxPool2d) for m in ours.modules())


def test_vgg_lpips_is_a_frozen_differentiable_distance(weights_dir):
    ours = PerceptualLoss(weights_dir, backbone="vgg")
    x_hat, x = _pair(1)
    assert torch.equal(ours(x, x), torch.zeros(2))
    x_hat.requires_grad_(True)
    ours(x_hat, x).sum().backward()
    assert x_hat.grad.abs().sum() > 0 and not any(p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.training


def test_vgg_lpips_reads_torch_hubs_cache_and_lpips_state_dict_heads(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(weights_dir / "hub"))
    assert vgg_lpips_weight_paths(None) == (weights_dir / "hub" / "checkpoints" / VGG16_FILE,
                                            weights_dir / "hub" / "checkpoints" / PIQ_LPIPS_FILE)
    from_cache = PerceptualLoss(None, backbone="vgg")
    # The heads as the lpips package stores its v0.1 VGG linear layers (lin<k>.model.1.weight) read the same.
    heads = torch.load(weights_dir / "hub" / "checkpoints" / PIQ_LPIPS_FILE, weights_only=True)
    (tmp_path / VGG16_FILE).symlink_to(weights_dir / "hub" / "checkpoints" / VGG16_FILE)
    torch.save({f"lin{k}.model.1.weight": h for k, h in enumerate(heads)}, tmp_path / PIQ_LPIPS_FILE)
    from_state_dict = PerceptualLoss(tmp_path, backbone="vgg")
    x_hat, x = _pair(2)
    assert torch.equal(from_cache(x_hat, x), from_state_dict(x_hat, x))


def test_missing_or_wrong_vgg_files_say_what_goes_where(weights_dir, tmp_path, caplog):
    (tmp_path / VGG16_FILE).symlink_to(weights_dir / "hub" / "checkpoints" / VGG16_FILE)
    with pytest.raises(WeightsError) as err:
        PerceptualLoss(tmp_path, backbone="vgg")
    message = str(err.value)
    assert "\n" not in message and PIQ_LPIPS_FILE in message and str(tmp_path) in message
    assert VGG16_FILE not in message.split("needs")[1].split("not found")[0]  # only the missing one is named
    with pytest.raises(WeightsError, match="needs two"):
        PerceptualLoss(tmp_path / VGG16_FILE, backbone="vgg")
    torch.save([torch.ones(64), torch.ones(128)], tmp_path / PIQ_LPIPS_FILE)
    with pytest.raises(WeightsError, match="is not piq's LPIPS heads"):
        PerceptualLoss(tmp_path, backbone="vgg")
    with pytest.raises(ConfigError, match="stage.lpips.weights"):
        PerceptualLoss(backbone="/models/alexnet-owt-7be5be79.pth")  # the old meaning of stage.lpips.backbone
    with caplog.at_level(logging.WARNING, logger="onedc"):
        random = PerceptualLoss(backbone="vgg", random_backbone=True, seed=3)
    assert "LPIPS with RANDOM backbone (tests only" in caplog.text
    assert torch.equal(random(*_pair(4)), PerceptualLoss(backbone="vgg", random_backbone=True, seed=3)(*_pair(4)))
