"""Time ``onedc eval`` and split it: coding, each metric, each anchor (issue 23, item 6).

Runs :func:`onedc.eval.evaluate` of whatever ``onedc`` is on ``PYTHONPATH`` (so the same script
times an older checkout and this one: run it twice in one session, or with ``--compare ROOT``).
It builds the checkpoints itself: ``--ckpts`` untrained ``model=tiny_random`` bundles with a
one-step generator (speed does not depend on the weights), and RANDOM AlexNet / VGG16 files under
the names LPIPS / DISTS look for, plus a random torchvision Inception-v3 (2048-d pool features at
299 px, seeded: the same in every process) standing in for FID's Inception: the same networks, so
the same time, but their values are not the metrics.

``--compare ROOT`` evaluates the very same files with ROOT's code ("old") and this checkout's
code twice: "new cold" with an empty anchor cache, then "new warm" reading the cache the cold run
wrote (an eval after the next training run). Sequential by default (one run at a time, each with
``--threads``); ``--concurrent`` runs old and new side by side with one thread each (new: cold,
warm, then more warm runs while the old one is still running), so both see the same load from
whatever else shares the machine. The load average is recorded around every run. The new cold and
warm outputs are compared byte for byte (aggregate.json, bd.json, rd.png, per_image.json), and
every aggregate value old and new share is compared.

The split wraps functions by name while the evaluation runs: onedc ``compress_image`` /
``decompress_bytes`` (coding), PSNR, MS-SSIM, the LPIPS / DISTS / Inception networks'
forward, FID/KID, ``pillow_encode`` / ``pillow_decode`` per anchor codec and the anchor cache's
reads and writes.
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same weights in every process: a warm cache's key matches
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
    cache_module = sys.modules.get("onedc.eval.cache")
    if cache_module is not None:
        cls = cache_module.AnchorCache
        for name in ("get", "sizes", "reference_features"):
            setattr(cls, name, timed("anchor cache: read", getattr(cls, name)))
        for name in ("put", "put_sizes", "put_reference_features"):
            setattr(cls, name, timed("anchor cache: write", getattr(cls, name)))
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
    parameters = run.evaluate.__code__.co_varnames
    if args.anchors and "anchors" in parameters:
        kwargs["anchors"] = args.anchors.split(",")
    if "anchor_cache" in parameters:
        kwargs["anchor_cache"] = Path(args.cache) if args.cache else False
    if args.ladders and "ladders" in parameters:
        kwargs["ladders"] = json.loads(args.ladders)
    out = folder / f"out-{args.tag or os.getpid()}"
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode() if args.inference_mode else contextlib.nullcontext():
        result = run.evaluate(ckpts, images, out, **kwargs)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"total_s": total, "cpu_s": cpu, "rows": len(result.rows), "split_s": dict(TIMES), "calls": dict(CALLS),
            "out": str(out), "threads": args.threads}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def launch(command: list[str], root: str, tag: str, threads: int, extra: list[str] = ()) -> subprocess.Popen:
    """Start one timed run (its output goes to files in the work folder, never a pipe it could fill)."""
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    work = Path(command[command.index("--work") + 1])
    process = subprocess.Popen(command + ["--threads", str(threads), "--tag", tag, *extra], env=env,
                               stdout=open(work / f"{tag}.out", "w"), stderr=open(work / f"{tag}.err", "w"))
    process.log = work / tag  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, name: str, load_before: str) -> dict:
    process.wait()
    stdout = process.log.with_suffix(".out").read_text()  # type: ignore[attr-defined]
    if process.returncode:
        stderr = process.log.with_suffix(".err").read_text()  # type: ignore[attr-defined]
        sys.exit(f"the {name} run failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["load_before"], result["load_after"] = load_before, load_average()
    print(f"{name}: {result['total_s']:.1f} s ({result['rows']} rows, {result['threads']} thread(s), "
          f"load average {result['load_before']} -> {result['load_after']})", flush=True)
    return result


TIMING_FIELDS = ("enc_ms", "dec_ms")  # wall-clock times of the onedc rows: differ from run to run


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def compare_outputs(results: dict) -> list[str]:
    """Lines: new cold vs new warm outputs (byte for byte; the JSON files without the onedc rows'
    timings); old vs new cold, each aggregate value they share (onedc rows and anchor rows apart)."""
    lines = []
    cold, warm = Path(results["new cold"]["out"]), Path(results["new warm"]["out"])
    for name in ("bd.json", "rd.png"):
        same = (cold / name).read_bytes() == (warm / name).read_bytes()
        lines.append(f"new cold vs new warm {name}: {'identical bytes' if same else 'DIFFERENT'}")
    for name in ("aggregate.json", "per_image.json"):
        a, b = (_untimed(json.loads((folder / name).read_text())) for folder in (cold, warm))
        lines.append(f"new cold vs new warm {name} (without {', '.join(TIMING_FIELDS)}): "
                     f"{'identical' if a == b else 'DIFFERENT'}")
    old_entries = json.loads((Path(results["old"]["out"]) / "aggregate.json").read_text())["results"]
    new_entries = json.loads((cold / "aggregate.json").read_text())["results"]
    new_by = {(e["codec"], e["setting"]): e for e in new_entries}
    worst: dict[tuple[str, str], list] = {}
    for entry in old_entries:
        other = new_by.get((entry["codec"], entry["setting"]))
        if other is None:
            continue
        group = "onedc" if entry["codec"] == "onedc" else "anchors"
        for key in ("bpp", "psnr", "ms_ssim", "lpips", "dists", "fid", "kid"):
            a, b = entry.get(key), other.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                diff = abs(a - b)
                slot = worst.setdefault((group, key), [0.0, 0, None])
                slot[1] += 1
                if diff >= slot[0]:
                    slot[0], slot[2] = diff, (entry["setting"], a, b)
    for (group, key), (diff, count, (setting, a, b)) in sorted(worst.items()):
        lines.append(f"old vs new cold, {group} {key}: largest |difference| {diff:.3g} over {count} settings "
                     f"(at {setting}: {a:.8g} vs {b:.8g})")
    return lines


def print_table(results: dict) -> None:
    names = list(results)
    keys = sorted({k for r in results.values() for k in r["split_s"]})
    print(f"{'part (s)':<34}" + "".join(f"{n:>11}" for n in names))
    for key in keys:
        print(f"{key:<34}" + "".join(f"{results[n]['split_s'].get(key, 0):>11.1f}" for n in names))
    print(f"{'total':<34}" + "".join(f"{results[n]['total_s']:>11.1f}" for n in names))
    print(f"{'CPU time':<34}" + "".join(f"{results[n]['cpu_s']:>11.1f}" for n in names))
    print(f"{'rows':<34}" + "".join(f"{results[n]['rows']:>11}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=7, help="sample photos (native size)")
    parser.add_argument("--ckpts", type=int, default=2)
    parser.add_argument("--crop", type=int, default=None, help="centre crops of this side (default: native size)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (--concurrent: 1)")
    parser.add_argument("--anchors", default="jpeg,webp", help="anchors of the new code (the old had jpeg,webp)")
    parser.add_argument("--ladders", default=None, metavar="JSON",
                        help='anchor ladders of the new code, e.g. \'{"jpeg": [5, 10], "webp": [5, 10]}\' '
                             '(default: its own)')
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--compare", default=None, metavar="ROOT",
                        help="time the onedc checkout at ROOT (old) and this one (new cold, new warm) on the same work")
    parser.add_argument("--concurrent", action="store_true",
                        help="with --compare: run old and new at the same time, one thread each")
    parser.add_argument("--json", default=None, help="write the result(s) here")
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # the anchor cache of one run
    parser.add_argument("--tag", default=None, help=argparse.SUPPRESS)
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
    results: dict[str, dict] = {}
    extra_warm: list[float] = []
    # One work folder: the checkpoints, network files and photos are built once, by this checkout's
    # code (an older checkout may lack the builders), and all runs evaluate the very same files.
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as work:
        command = [sys.executable, __file__, "--images", str(args.images), "--ckpts", str(args.ckpts),
                   "--anchors", args.anchors, "--work", work]
        command += ["--crop", str(args.crop)] if args.crop else []
        command += ["--ladders", args.ladders] if args.ladders else []
        subprocess.run(command + ["--build-only"], env=dict(os.environ, PYTHONPATH=here), check=True,
                       capture_output=True, text=True)
        cache = ["--cache", str(Path(work) / "anchor-cache")]
        print(f"load average before: {load_average()}", flush=True)
        if not args.concurrent:
            for name, root, tag, more in (("old", args.compare, "old", []), ("new cold", here, "cold", cache),
                                          ("new warm", here, "warm", cache)):
                before = load_average()
                results[name] = finish(launch(command, root, tag, args.threads, more), name, before)
        else:
            before = load_average()
            old = launch(command, args.compare, "old", 1)
            results["new cold"] = finish(launch(command, here, "cold", 1, cache), "new cold", before)
            before = load_average()
            results["new warm"] = finish(launch(command, here, "warm", 1, cache), "new warm", before)
            while old.poll() is None:  # keep the second core as busy as during the old run's start
                more = finish(launch(command, here, f"warm{len(extra_warm) + 2}", 1, cache), "new warm (again)",
                              load_average())
                extra_warm.append(more["total_s"])
            results = {"old": finish(old, "old", results["new cold"]["load_before"]), **results}
        lines = compare_outputs(results)
    old_s = results["old"]["total_s"]
    mode = "concurrent, 1 thread each" if args.concurrent else f"sequential, {args.threads} threads"
    print(f"speed-up ({args.images} photos x {args.ckpts} checkpoints, {mode}): "
          f"cold {old_s / results['new cold']['total_s']:.2f}x, warm {old_s / results['new warm']['total_s']:.2f}x; "
          f"in CPU time (less sensitive to other jobs' load): cold "
          f"{results['old']['cpu_s'] / results['new cold']['cpu_s']:.2f}x, "
          f"warm {results['old']['cpu_s'] / results['new warm']['cpu_s']:.2f}x")
    if extra_warm:
        print(f"further warm runs beside the old one: {', '.join(f'{t:.1f}' for t in extra_warm)} s")
    print_table(results)
    for line in lines:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "results": results, "extra_warm_s": extra_warm,
                                               "checks": lines}, indent=1))


if __name__ == "__main__":
    main()
