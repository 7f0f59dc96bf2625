"""Shared by the reference tests: the key lists (tests/data/reference/*.txt, copied from docs/reference-model.md's data
files) and the small-width architectures that keep the reference layouts."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "reference"


def read_key_list(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of one reference key list, e.g. ``feedforward.txt`` (1252 keys)."""
    out = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


# Small SD-1.5-layout UNet: cross-attention down/up blocks, transformers with conv projections.
SMALL_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 16, "attention_head_dim": 2,
}
# Two VAE blocks: one downsampling, so a 2s×2s image has an s×s mid-block map.
SMALL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "scaling_factor": 0.18215,
}
