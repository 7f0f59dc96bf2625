"""End to end through real files: a short distill run on the default preset (its quick-trained VAE) decodes the held-out
photos above what the random VAE allowed (its own reconstructions: 8.5 / 10.8 dB)."""
from __future__ import annotations

from onedc.datamodules import sample_photo_paths
from onedc.eval import evaluate

# Spread (benchmarks/learning_spread.py --figures end_to_end: 120 steps, 2 x 128 px crops, 0.28 ..
# 0.32 bpp from the files; native AVX2 and ATEN default + oneDNN SSE4.1 kernels, seeds 0 and 1):
# grace_hopper 17.18, 14.65, 14.38, 16.41 dB, motorcycle_right 16.49, 14.81, 14.01, 16.59 dB
# (mean 15.57, sd 1.22 over the eight). A 120-step codec is noisy: the floor sits 3.3 sd below
# the mean and 2.5 dB below the worst run, and above what the random VAE allows at all (its own
# reconstructions: 8.5 / 10.8 dB; 300 distill steps with it: 8.48 / 10.81 dB).
PSNR_FLOOR = 11.5


def test_short_distill_run_decodes_held_out_photos(short_distill_ckpt, tmp_path):
    """The 120-step run of ``short_distill_ckpt`` (tests/conftest.py) codes the held-out photos."""
    photos = sample_photo_paths()
    result = evaluate([short_distill_ckpt], [photos["grace_hopper"], photos["motorcycle_right"]], tmp_path / "eval",
                      baselines=False, progress=False, say=lambda message: None)
    rows = {row["image"]: row for row in result.rows}
    assert len(rows) == 2, rows
    for name, row in rows.items():
        assert row["psnr"] > PSNR_FLOOR, (name, row["psnr"], row["bpp"])
