"""The Codeformer code-prediction head (docs/reference-model.md §9): sizes, key layout, window attention, loss."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from onedc.training.build import build_distill_loss, teacher_from_config
from onedc.training.config import compose
from onedc.modules.codeformer_head import CodeformerHead, SwinBlock
from onedc.modules.distill import SemanticDistillLoss
from onedc.modules.teachers import TeacherTargets

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"  # the reference key lists


def test_full_size_preset_head_matches_section_9_on_meta():
    """tokenizer=maskgit_vqgan builds the 60,315,392-element head and the 1e-3·[CE + 0.01·MSE] loss."""
    cfg = compose(["model=sd15", "tokenizer=maskgit_vqgan"])
    teacher = teacher_from_config(cfg.tokenizer, device="meta")
    with torch.device("meta"):
        loss = build_distill_loss(cfg.tokenizer, cfg.model, teacher)
    head = loss.head
    assert isinstance(head, CodeformerHead)
    assert (loss.loss_weight, loss.mse_weight) == (1e-3, 0.01)
    params = sum(p.numel() for p in head.parameters())
    masks = sum(b.numel() for b in head.buffers())  # the fixed -inf masks, counted by §9 too
    assert abs(params + masks - 60_315_392) <= 0.01 * 60_315_392
    assert (params, masks) == (59_922_176, 393_216)  # exact: 60,315,392 in all
    rows = [line.split("\t") for line in (REFERENCE / "codeformer.txt").read_text().splitlines()
            if not line.startswith("#")]
    reference = {key: tuple(int(n) for n in re.findall(r"\d+", shape)) for key, shape, _ in rows}
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == reference  # the 105 keys of model_2


def _oracle_attention(block: SwinBlock, x: torch.Tensor, valid: torch.Tensor, shifted: bool) -> torch.Tensor:
    """§9 window attention written out over the whole grid: token i sees token j iff both lie in one
    window of the (rolled) grid, in the same half of it where that window is in the last window
    row/column (the -inf masks), and j is a real token; plus the absolute window-position bias."""
    attn = block.attention_block
    win, heads = attn.window, attn.heads
    b, h, w, c = x.shape
    shift = win // 2 if shifted else 0
    xr = torch.roll(x, (-shift, -shift), (1, 2))
    vr = torch.roll(valid, (-shift, -shift), (0, 1)).flatten()
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    same = (rows[:, None] // win == rows[None] // win) & (cols[:, None] // win == cols[None] // win)
    if shifted:
        last_row, last_col = rows // win == h // win - 1, cols // win == w // win - 1
        half_r, half_c = rows % win >= win // 2, cols % win >= win // 2
        same &= ~last_row[:, None] | (half_r[:, None] == half_r[None])
        same &= ~last_col[:, None] | (half_c[:, None] == half_c[None])
    allowed = same & (vr[None] | ~vr[:, None])
    bias = torch.zeros(h * w, h * w)
    if attn.pos_embedding is not None:
        pos = (rows % win) * win + cols % win
        bias = attn.pos_embedding[pos[:, None], pos[None]]
    tokens = xr.reshape(b, h * w, c)
    q, k, v = attn.to_qkv(tokens).reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / (c // heads) ** 0.5 + bias
    out = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    out = attn.to_out(out.transpose(1, 2).reshape(b, h * w, c)).reshape(b, h, w, c)
    return torch.roll(out, (shift, shift), (1, 2))


@torch.no_grad()
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_a_direct_implementation(shifted):
    torch.manual_seed(0)
    block = SwinBlock(16, 2, 4, 32, shifted=shifted, pos_bias=not shifted)
    if block.attention_block.pos_embedding is not None:
        block.attention_block.pos_embedding.normal_()
    x = torch.randn(2, 8, 12, 16)
    valid = torch.ones(8, 12, dtype=torch.bool)
    valid[7:], valid[:, 11:] = False, False  # a 7x11 grid padded to whole 4x4 windows
    got = block.attention_block(x, valid)
    want = _oracle_attention(block, x, valid, shifted)
    assert (got - want)[:, :7, :11].abs().max() < 1e-5
    full = block.attention_block(x, None)  # no padding: every token real
    assert (full - _oracle_attention(block, x, torch.ones(8, 12, dtype=torch.bool), shifted)).abs().max() < 1e-5
    assert (full - got)[:, :7, :11].abs().max() > 1e-3  # padded keys really were hidden


def test_codeformer_distill_loss_is_weighted_ce_plus_mse_to_hard_codes():
    torch.manual_seed(0)
    loss = SemanticDistillLoss(24, teacher_kind="vq", target_dim=8, num_codes=16, head_type="codeformer",
                               hidden=32, depth=1, heads=4, window=4, mse_weight=0.01, loss_weight=1e-3)
    sem = torch.randn(2, 24, 3, 3, requires_grad=True)
    codebook = torch.randn(16, 8)
    indices = torch.randint(16, (2, 6, 6))
    hard = codebook[indices].permute(0, 3, 1, 2)  # the teacher's VQ output: codebook rows
    out = loss(sem, TeacherTargets(indices, hard), codebook)
    assert out.prediction.shape == (2, 16, 6, 6)
    ce = F.cross_entropy(out.prediction, indices)
    mse = F.mse_loss(torch.einsum("bkhw,kc->bchw", out.prediction.softmax(1), codebook), hard)
    assert torch.allclose(out.loss, 1e-3 * (ce + 0.01 * mse), rtol=1e-6)
    out.loss.backward()
    assert sem.grad.abs().sum() > 0
