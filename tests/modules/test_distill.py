"""Semantic distillation loss: exact loss terms, learnability, gradients, grid matching."""
from __future__ import annotations

import pytest
import torch

from onedc.errors import ConfigError
from onedc.modules.distill import SemanticDistillLoss, SemanticPredictorHead, sincos_pos_embed_2d
from onedc.modules.teachers import TeacherTargets

K, C = 16, 8




def vq_batch(seed: int = 0, grid: int = 4) -> tuple[torch.Tensor, TeacherTargets, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, C, generator=generator)
    indices = torch.randint(0, K, (2, grid, grid), generator=generator)
    latents = codebook[indices].permute(0, 3, 1, 2)
    sem = torch.randn(2, 12, grid // 2, grid // 2, generator=generator)
    return sem, TeacherTargets(indices, latents), codebook


def vq_loss(**kwargs) -> SemanticDistillLoss:
    options = dict(teacher_kind="vq", target_dim=C, num_codes=K, hidden=32, depth=1, heads=4)
    return SemanticDistillLoss(12, **{**options, **kwargs})


def test_vq_terms_match_hand_computation():
    sem, targets, codebook = vq_batch()
    loss = vq_loss(mse_weight=0.5)
    out = loss(sem, targets, codebook)
    logits = out.prediction
    assert logits.shape == (2, K, 4, 4)
    ce = -logits.log_softmax(1).gather(1, targets.indices[:, None]).mean()
    torch.testing.assert_close(out.ce, ce)
    probs = logits.softmax(1)
    soft = (probs[:, :, None] * codebook[None, :, :, None, None]).sum(1)  # (B, C, h, w)
    mse = ((soft - targets.latents) ** 2).mean()
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.loss, ce + 0.5 * mse)


def test_vq_accuracy_is_fraction_of_matching_tokens():
    sem, targets, codebook = vq_batch()
    loss = vq_loss()
    predicted = loss(sem, targets, codebook).prediction.argmax(1)
    # Make exactly 5 of the 32 tokens wrong.
    indices = predicted.clone()
    flat = indices.view(-1)
    flat[:5] = (flat[:5] + 1) % K
    out = loss(sem, TeacherTargets(indices, targets.latents), codebook)
    assert out.accuracy.item() == pytest.approx(27 / 32)


def test_vq_head_learns_a_fixed_target_and_gradient_reaches_sem():
    sem, targets, codebook = vq_batch(seed=3)
    torch.manual_seed(0)
    loss = vq_loss()
    sem = sem.requires_grad_()
    first = loss(sem, targets, codebook)
    first.loss.backward()
    assert sem.grad is not None and sem.grad.abs().sum() > 0
    optimizer = torch.optim.Adam(loss.parameters(), lr=3e-3)
    for _ in range(50):
        optimizer.zero_grad()
        out = loss(sem.detach(), targets, codebook)
        out.loss.backward()
        optimizer.step()
    final = loss(sem.detach(), targets, codebook)
    assert final.loss.item() < 0.5 * first.loss.item()
    assert final.accuracy.item() > 0.9
    assert first.accuracy.item() < 0.5


def test_prediction_is_resized_to_the_target_grid():
    # A 1x1 semantic grid upsampled x2 is 2x2; the teacher's grid is 4x4.
    sem, targets, codebook = vq_batch(grid=4)
    sem = torch.randn(2, 12, 1, 1, requires_grad=True)
    out = vq_loss()(sem, targets, codebook)
    assert out.prediction.shape == (2, K, 4, 4)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert sem.grad.abs().sum() > 0


def test_each_token_of_a_cell_is_predicted_from_the_cell():
    """The x2 upsampling is learned (pixel shuffle): the four teacher tokens under one hyperprior
    position can differ, in an order that depends on the position's features, not on where
    the cell is. Bilinear upsampling of a one-cell grid gives the four the same features."""
    torch.manual_seed(0)
    head = SemanticPredictorHead(12, K, hidden=32, depth=0, heads=4, upsample=2)
    sem = torch.randn(2, 12, 1, 1)
    codes = torch.tensor([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])  # same cell position, reversed order
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(sem), codes).backward()
        optimizer.step()
    assert torch.equal(head(sem).argmax(dim=1), codes)


@pytest.mark.parametrize("feature_loss", ["cosine", "mse"])
def test_feature_loss_terms(feature_loss):
    generator = torch.Generator().manual_seed(0)
    sem = torch.randn(2, 12, 2, 2, generator=generator)
    target = torch.randn(2, 24, 4, 4, generator=generator)
    loss = SemanticDistillLoss(12, teacher_kind="feature", target_dim=24, hidden=32, depth=1,
                               heads=4, feature_loss=feature_loss)
    out = loss(sem, TeacherTargets(None, target))
    pred = out.prediction
    assert pred.shape == (2, 24, 4, 4)
    cos = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1))
    expected = (1 - cos).mean() if feature_loss == "cosine" else ((pred - target) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.mse, expected)
    torch.testing.assert_close(out.accuracy, cos.mean())
    assert out.ce.item() == 0.0


def test_feature_head_learns_a_fixed_target():
    generator = torch.Generator().manual_seed(1)
    sem = torch.randn(2, 12, 2, 2, generator=generator)
    target = torch.randn(2, 24, 4, 4, generator=generator)
    loss = SemanticDistillLoss(12, teacher_kind="feature", target_dim=24, hidden=64, depth=1, heads=4)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        out = loss(sem, TeacherTargets(None, target))
        out.loss.backward()
        optimizer.step()
    assert loss(sem, TeacherTargets(None, target)).accuracy.item() > 0.9


def test_loss_is_float32_under_bf16_autocast():
    sem, targets, codebook = vq_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq_loss()(sem, targets, codebook)
    assert out.loss.dtype == torch.float32 and out.prediction.dtype == torch.float32


def test_head_runs_at_any_grid_size():
    head = SemanticPredictorHead(5, 7, hidden=16, depth=1, heads=2, upsample=2)
    assert head(torch.randn(1, 5, 3, 5)).shape == (1, 7, 6, 10)
    pos = sincos_pos_embed_2d(16, 3, 5)
    assert pos.shape == (15, 16)
    # Every position gets a distinct code (row-major: index 1 is row 0, column 1).
    assert torch.cdist(pos, pos).add(torch.eye(15)).min() > 0.1
    torch.testing.assert_close(pos[1, :4], torch.zeros(4))  # row part (sin 0 = 0) for row 0


def test_vq_loss_with_a_real_teacher():
    from onedc.modules.teachers import build_teacher

    teacher = build_teacher("vq", config=dict(
        block_out_channels=[4, 4, 4], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4, num_vq_embeddings=8,
        norm_num_groups=2, sample_size=32), input_scale=1.0)
    targets = teacher.targets(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert targets.indices.shape == (2, 8, 8)
    loss = SemanticDistillLoss(6, teacher_kind=teacher.kind, target_dim=teacher.target_dim,
                               num_codes=teacher.num_codes, hidden=16, depth=1, heads=2)
    out = loss(torch.randn(2, 6, 4, 4), targets, teacher.codebook())
    assert torch.isfinite(out.loss) and out.prediction.shape == (2, 8, 8, 8)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="num_codes"):
        SemanticDistillLoss(4, teacher_kind="vq", target_dim=8)
    with pytest.raises(ConfigError, match="feature_loss"):
        SemanticDistillLoss(4, teacher_kind="feature", target_dim=8, feature_loss="l1")
    with pytest.raises(ConfigError, match="teacher kind"):
        SemanticDistillLoss(4, teacher_kind="timm", target_dim=8)
    with pytest.raises(ConfigError, match="divisible"):
        SemanticPredictorHead(4, 8, hidden=30, heads=4)
