"""The two parts of ``onedc eval`` that issue 23 changed, old against new in one process.

1. FID's statistics for one codec setting: torchmetrics' ``FrechetInceptionDistance`` (the old
   path: eigenvalues of a 2048 x 2048 product) against :func:`onedc.eval.perceptual.frechet_distance_few`
   (the patch-space distance used when there are fewer patches than dimensions).
2. LPIPS + DISTS of 12 rows sharing one reference image, with the networks' reference memo
   unwrapped (old) and in place (new), alternated twice. RANDOM backbones (the same networks'
   time; their values are not the metrics).
"""
import time, tempfile, torch
from pathlib import Path
torch.set_num_threads(2)
from torchvision.models import alexnet
from torchvision.models.vgg import cfgs, make_layers
from torchmetrics.image.fid import FrechetInceptionDistance
from onedc.eval.perceptual import PerceptualMetrics, _Precomputed, frechet_distance_few
torch.manual_seed(0)
real = torch.randn(7, 2048, dtype=torch.float64); fake = 1.2 * torch.randn(7, 2048, dtype=torch.float64)
t = time.perf_counter(); new = frechet_distance_few(real, fake); t_new = time.perf_counter() - t
t = time.perf_counter(); fid = FrechetInceptionDistance(feature=_Precomputed(2048)).double(); fid.update(real, real=True); fid.update(fake, real=False); old = float(fid.compute()); t_old = time.perf_counter() - t
print(f"FID statistics, 7 real / 7 decoded patches, 2048-d: torchmetrics {t_old:.2f} s, patch space {t_new*1e3:.2f} ms, ratio {t_old/t_new:.0f}x, values {old:.4f} / {new:.4f}")
d = Path(tempfile.mkdtemp())  # random backbone files under the names LPIPS / DISTS look for
torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()}, d / "alexnet-owt-7be5be79.pth")
torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, d / "vgg16-397923af.pth")
memo = PerceptualMetrics.load(d); plain = PerceptualMetrics.load(d)
plain.lpips.lpips.net.forward = plain.lpips.lpips.net.forward.forward  # unwrap: the old behaviour
plain.dists.forward_once = plain.dists.forward_once.forward
x = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
ys = [(x.int() + d_).clamp(0, 255).to(torch.uint8) for d_ in range(-12, 12, 2)]  # 12 rows per reference
for name, m in (("without memo (old)", plain), ("with memo (new)", memo), ("without memo (old)", plain), ("with memo (new)", memo)):
    t = time.perf_counter(); [m.distances(x, y) for y in ys]; print(f"LPIPS+DISTS, 12 rows of one 256-px image, {name}: {time.perf_counter()-t:.2f} s")
