"""Time ``onedc eval`` and split it: coding, each metric, each anchor (issue 23, item 6).

Runs :func:`onedc.eval.evaluate` of whatever ``onedc`` is on ``PYTHONPATH`` (so the same script
times an older checkout and this one: run it twice in one session, or with ``--compare ROOT``
which runs ROOT's code and this checkout's code one after the other). It builds the checkpoints
itself: ``--ckpts`` untrained ``model=tiny_random`` bundles with a one-step generator (speed
does not depend on the weights), and RANDOM AlexNet / VGG16 files under the names LPIPS / DISTS
look for, plus a random torchvision Inception-v3 (2048-d pool features at 299 px) standing in
for FID's Inception: the same networks, so the same time, but their values are not the metrics.

The split wraps functions by name while the evaluation runs: onedc ``compress_image`` /
``decompress_bytes`` (coding), PSNR, MS-SSIM, the LPIPS / DISTS / Inception networks'
forward, FID/KID, and ``pillow_encode`` / ``pillow_decode`` per anchor codec.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMES: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = name(*args, **kwargs) if callable(name) else name
            TIMES[key] += time.perf_counter() - start
            CALLS[key] += 1
    return wrapper


def build(folder: Path, count: int) -> list[Path]:
    paths = sorted(folder.glob("lam*.ckpt"))
    if len(paths) >= count:  # built once (by this checkout) for both runs of --compare
        return paths[:count]
    import torch
    from omegaconf import OmegaConf
    from torchvision.models import alexnet
    from torchvision.models.vgg import cfgs, make_layers

    from onedc.training.config import compose
    from onedc.training.build import generator_from_config
    from onedc.coding.bundle import OneDCCodec
    from onedc.families import generator_settings
    from onedc.modules.light.codec import Y_INIT_GAIN

    model = OmegaConf.to_container(compose(["model=tiny_random"]).model, resolve=True)
    paths = []
    for index in range(count):
        plain = OneDCCodec.from_config(model)
        bundle = OneDCCodec(plain.vae, plain.codec, generator_from_config(model),
                            generator_settings=generator_settings(model))
        gain = (1.0, 10.0, 4.0)[index % 3]
        with torch.no_grad():
            bundle.codec.g_a_y[1].weight.mul_(gain / Y_INIT_GAIN)
            bundle.codec.g_a_y[1].bias.mul_(gain / Y_INIT_GAIN)
        bundle.codec.update(force=True)
        path = folder / f"lam{index}.ckpt"
        torch.save({"state_dict": bundle.state_dict(), "onedc": {"format": 1, "stage": "latent", "model": model,
                                                                 "tokenizer": {"name": "vq_tiny"}}}, path)
        paths.append(path)
    weights = folder / "weights"
    weights.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()},
               weights / "alexnet-owt-7be5be79.pth")
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()},
               weights / "vgg16-397923af.pth")
    return paths


def stand_in_inception():
    import torch
    from torch import nn
    from torchvision.models import inception_v3

    class Features(nn.Module):
        """RANDOM Inception-v3 trunk: the cost of FID's feature pass, not its values."""

        def __init__(self) -> None:
            super().__init__()
            self.net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
            self.net.fc = nn.Identity()
            self.num_features = 2048

        @torch.no_grad()
        def forward(self, patches):
            x = torch.nn.functional.interpolate(patches.float() / 255, size=(299, 299), mode="bilinear")
            return self.net(x)
    return Features()


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import onedc.eval.run as run
    import onedc.eval.perceptual as perceptual
    try:
        from onedc.coding.bundle import OneDCCodec
    except ImportError:  # an older checkout (before the family contract)
        from onedc.inference import OneDCCodec
    from onedc.datamodules import sample_photo_paths

    folder = Path(args.work)
    ckpts = build(folder, args.ckpts)
    images = folder / "images"
    if not images.exists():
        images.mkdir()
        from PIL import Image

        for name, path in list(sample_photo_paths().items())[: args.images]:
            with Image.open(path) as photo:
                photo = photo.convert("RGB")
                if args.crop:
                    left, top = (photo.width - args.crop) // 2, (photo.height - args.crop) // 2
                    photo = photo.crop((max(left, 0), max(top, 0), max(left, 0) + min(args.crop, photo.width),
                                        max(top, 0) + min(args.crop, photo.height)))
                photo.save(images / f"{name}.png")
    if args.build_only:
        return {}
    # The split: wrap by name in the modules that call them.
    OneDCCodec.compress_image = timed("coding: onedc compress", OneDCCodec.compress_image)
    OneDCCodec.decompress_bytes = timed("coding: onedc decompress", OneDCCodec.decompress_bytes)
    for module in (run,) + tuple(m for m in (sys.modules.get("onedc.eval.score"),) if m):
        for name, label in (("psnr_uint8", "metric: psnr"), ("ms_ssim_uint8", "metric: ms-ssim"),
                            ("fid_kid", "metric: fid/kid (statistics)")):
            if hasattr(module, name):
                setattr(module, name, timed(label, getattr(module, name)))
        if hasattr(module, "pillow_encode"):
            module.pillow_encode = timed(lambda image, codec, q, **k: f"anchor: {codec} encode", module.pillow_encode)
        if hasattr(module, "pillow_decode"):
            module.pillow_decode = timed("anchor: decode (all)", module.pillow_decode)
    import onedc.eval.anchors as anchors
    anchors.pillow_encode = timed(lambda image, codec, q, **k: f"anchor: {codec} encode", anchors.pillow_encode)
    load = perceptual.PerceptualMetrics.load.__func__

    def patched_load(cls, *a, **k):
        metrics = load(cls, *a, **k)
        for attr, label in (("lpips", "metric: lpips"), ("dists", "metric: dists"),
                            ("features", "metric: fid/kid (inception)")):
            net = getattr(metrics, attr)
            if net is not None:
                net.forward = timed(label, net.forward)
        return metrics
    perceptual.PerceptualMetrics.load = classmethod(patched_load)
    run.PerceptualMetrics = perceptual.PerceptualMetrics
    kwargs = dict(weights_dir=folder / "weights", progress=False, feature_extractor=stand_in_inception(),
                  say=lambda m: None)
    if args.anchors and "anchors" in run.evaluate.__code__.co_varnames:
        kwargs["anchors"] = args.anchors.split(",")
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode() if args.inference_mode else contextlib.nullcontext():
        result = run.evaluate(ckpts, images, folder / f"out-{os.getpid()}", **kwargs)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"total_s": total, "cpu_s": cpu, "rows": len(result.rows), "split_s": dict(TIMES), "calls": dict(CALLS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=7, help="sample photos (native size)")
    parser.add_argument("--ckpts", type=int, default=2)
    parser.add_argument("--crop", type=int, default=None, help="centre crops of this side (default: native size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--anchors", default="jpeg,webp", help="anchors of the new code (the old had jpeg,webp)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--compare", default=None, metavar="ROOT",
                        help="also run the onedc checkout at ROOT (e.g. a worktree of main) first, same work")
    parser.add_argument("--json", default=None, help="write the result(s) here")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inference-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare is None:
        work = args.work or tempfile.mkdtemp(prefix="eval-speed-")
        args.work = work
        result = run_one(args)
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    here = str(Path(__file__).resolve().parents[1])
    results = {}
    # One work folder: the checkpoints, network files and photos are built once, by this checkout's
    # code (an older checkout may lack the builders), and both runs evaluate the very same files.
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as work:
        command = [sys.executable, __file__, "--images", str(args.images), "--ckpts", str(args.ckpts),
                   "--threads", str(args.threads), "--anchors", args.anchors, "--work", work]
        command += ["--crop", str(args.crop)] if args.crop else []
        subprocess.run(command + ["--build-only"], env=dict(os.environ, PYTHONPATH=here), check=True,
                       capture_output=True, text=True)
        for name, root in (("old", args.compare), ("new", here)):
            env = dict(os.environ, PYTHONPATH=root)
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {name} run failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]['total_s']:.1f} s", flush=True)
    print(f"speed-up: {results['old']['total_s'] / results['new']['total_s']:.2f}x "
          f"({args.images} photos x {args.ckpts} checkpoints, {args.threads} threads)")
    keys = sorted(set(results["old"]["split_s"]) | set(results["new"]["split_s"]))
    print(f"{'part':<34}{'old s':>9}{'new s':>9}")
    for key in keys:
        print(f"{key:<34}{results['old']['split_s'].get(key, 0):>9.1f}{results['new']['split_s'].get(key, 0):>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
