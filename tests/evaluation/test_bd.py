"""BD-rate / BD-metric (bjontegaard package) with known answers, and the BD table of ``onedc eval``."""
from __future__ import annotations

import numpy as np
import pytest

from onedc.eval.bd import HIGHER_IS_BETTER, bd, bd_table, format_bd_table

RATES = np.array([0.02, 0.05, 0.1, 0.2, 0.4, 0.8])
# A curved, strictly rising quality (an RD curve is not a straight line in log-rate).
PSNR = 22 + 3.5 * np.log2(RATES / 0.02) - 0.15 * np.log2(RATES / 0.02) ** 2
LPIPS = 0.6 * np.exp(-0.45 * np.log2(RATES / 0.02))


@pytest.mark.parametrize("method", ["akima", "pchip"])
@pytest.mark.parametrize("metric, values", [("psnr", PSNR), ("ms_ssim", 1 - 0.3 * 0.8 ** np.arange(6)),
                                            ("lpips", LPIPS), ("fid", 40 * LPIPS), ("kid", 0.05 * LPIPS)])
def test_bd_rate_of_a_constant_rate_factor(metric, values, method):
    """The same qualities at 0.8x / 1.25x the rates: BD-rate exactly -20 % / +25 %, for every metric."""
    anchor = list(zip(RATES, values))
    assert bd(anchor, list(zip(0.8 * RATES, values)), metric, method)["bd_rate"] == pytest.approx(-20.0, abs=1e-9)
    assert bd(anchor, list(zip(1.25 * RATES, values)), metric, method)["bd_rate"] == pytest.approx(25.0, abs=1e-9)
    # Point order does not matter.
    shuffled = list(zip(0.8 * RATES, values))[::-1]
    assert bd(anchor, shuffled, metric, method)["bd_rate"] == pytest.approx(-20.0, abs=1e-9)


@pytest.mark.parametrize("method", ["akima", "pchip"])
def test_bd_metric_of_a_constant_offset_keeps_the_metric_sign(method):
    """+1.5 dB at the same rates: BD-PSNR +1.5; LPIPS 0.02 lower: BD-LPIPS -0.02 (lower is better)."""
    better_psnr = bd(list(zip(RATES, PSNR)), list(zip(RATES, PSNR + 1.5)), "psnr", method)
    assert better_psnr["bd_metric"] == pytest.approx(1.5, abs=1e-12) and better_psnr["bd_rate"] < 0
    better_lpips = bd(list(zip(RATES, LPIPS)), list(zip(RATES, LPIPS - 0.02)), "lpips", method)
    assert better_lpips["bd_metric"] == pytest.approx(-0.02, abs=1e-12)
    assert better_lpips["bd_rate"] < 0  # lower LPIPS at the same rate = fewer bits for the same LPIPS
    worse_fid = bd(list(zip(RATES, 40 * LPIPS)), list(zip(RATES, 40 * LPIPS + 3)), "fid", method)
    assert worse_fid["bd_metric"] == pytest.approx(3.0, abs=1e-12) and worse_fid["bd_rate"] > 0
    assert not HIGHER_IS_BETTER["lpips"] and HIGHER_IS_BETTER["psnr"]


def test_bd_is_the_average_over_the_common_range_only():
    """A test curve covering only the upper half of the rates: BD-rate uses the common range, no extrapolation."""
    upper = slice(3, None)
    result = bd(list(zip(RATES, PSNR)), list(zip(0.8 * RATES[upper], PSNR[upper])), "psnr")
    # Not exactly -20: the 3-point Akima fit of the short curve is not the 6-point one (measured -20.013).
    assert result["bd_rate"] == pytest.approx(-20.0, abs=0.05)
    assert 0 < result["metric_overlap"] < 0.6


def test_curves_that_do_not_overlap_give_no_number():
    far = bd(list(zip(RATES, PSNR)), list(zip(100 * RATES, PSNR + 40)), "psnr")
    assert far["bd_rate"] is None and far["bd_metric"] is None and far["note"] == "no quality or rate overlap"
    one_point = bd(list(zip(RATES, PSNR)), [(0.1, 30.0)], "psnr")
    assert one_point["bd_rate"] is None and "fewer than 2" in one_point["note"]
    rows = bd_table([{"codec": "onedc", "setting": str(i), "bpp": r, "psnr": p + 40}
                     for i, (r, p) in enumerate(zip(100 * RATES, PSNR))]
                    + [{"codec": "jpeg", "setting": f"q={i}", "bpp": r, "psnr": p}
                       for i, (r, p) in enumerate(zip(RATES, PSNR))], ["onedc"], ["jpeg"], ["psnr"])
    text = format_bd_table(rows)
    assert "onedc vs jpeg" in text and "n/a" in text and "no quality or rate overlap" in text


def test_bd_table_pairs_curves_and_skips_matched_points():
    entries = ([{"codec": "onedc", "setting": f"ckpt{i}", "bpp": r, "psnr": p, "lpips": None}
                for i, (r, p) in enumerate(zip(0.8 * RATES, PSNR))]
               + [{"codec": "jpeg", "setting": f"q={i}", "bpp": r, "psnr": p, "lpips": None}
                  for i, (r, p) in enumerate(zip(RATES, PSNR))]
               + [{"codec": "jpeg", "setting": "matched:ckpt0", "bpp": 0.001, "psnr": 99.0, "lpips": None}])
    rows = bd_table(entries, ["onedc"], ["jpeg"])
    assert [(r["test"], r["anchor"], r["metric"]) for r in rows] == [("onedc", "jpeg", "psnr")]  # no LPIPS values
    assert rows[0]["bd_rate"] == pytest.approx(-20.0, abs=1e-9)
    assert "-20.0" in format_bd_table(rows)


def test_fid_with_fewer_patches_than_dimensions_equals_torchmetrics():
    """The patch-space Fréchet distance (n < d) against torchmetrics' FID on the same features."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from onedc.eval.perceptual import _Precomputed, fid_kid, frechet_distance_few

    torch.manual_seed(0)
    real = torch.randn(20, 96, dtype=torch.float64)
    fake = 1.3 * torch.randn(15, 96, dtype=torch.float64) + 0.2
    reference = FrechetInceptionDistance(feature=_Precomputed(96)).double()
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    assert frechet_distance_few(real, fake) == pytest.approx(expected, rel=1e-6)
    assert fid_kid([real[:12], real[12:]], [fake])["fid"] == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_few(real, real) == pytest.approx(0.0, abs=1e-9)


def test_reference_memo_gives_the_networks_own_values(tmp_path):
    """LPIPS / DISTS with the reference's features remembered equal fresh networks' values (RANDOM
    backbones, tests only), and the reference is computed once for three decoded images."""
    import torch
    from torchvision.models import alexnet
    from torchvision.models.vgg import cfgs, make_layers

    from onedc.eval import ALEXNET_FILE, VGG16_FILE, PerceptualMetrics

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()}, tmp_path / ALEXNET_FILE)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, tmp_path / VGG16_FILE)
    memo = PerceptualMetrics.load(tmp_path)
    x = torch.randint(0, 256, (3, 48, 56), dtype=torch.uint8)
    decoded = [(x.int() + d).clamp(0, 255).to(torch.uint8) for d in (5, -30, 60)]
    values = [memo.distances(x, y) for y in decoded]
    assert memo.lpips.lpips.net.forward.hits == 2 and memo.dists.forward_once.hits == 2
    for y, value in zip(decoded, values):
        fresh = PerceptualMetrics.load(tmp_path)  # a new memo: nothing remembered
        assert fresh.distances(x, y) == value
