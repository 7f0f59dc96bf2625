"""Portability benchmark: do encoder and decoder make the same coding decisions on other machines?

For every sample photo the encoder (this process: float32, contiguous, one image, 1 thread, this
CPU's kernels) computes the coding decisions of each ŷ symbol: the rANS table (scale index of σ)
and the mean μ. A "decoder" recomputes them from the same ẑ under one perturbation at a time:

    kernels      another process with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41
    threads      2 torch threads instead of 1
    batch        the photo batched with three flipped copies of itself (4 images at once)
    channels     the model in channels-last memory format
    bf16         the model under torch.autocast(cpu, bfloat16), as GPU presets train and run
    all          another process with every perturbation above at once

and counts disagreements for (a) the float32 path of container format 1 (μ, σ straight from
the model in its own precision, CompressAI's build_indexes) and (b) the decision path of format 2
(float64 outside autocast, μ on a 2^-8 grid, the encoder's fix list applied). A file decodes
only with zero disagreements. It then times the decoder's decision path and the whole entropy
decode (``HyperpriorCodec.decompress``) for both paths, interleaved, and prints the ratios.

Usage: ``python benchmarks/portability.py [--ckpt CKPT ...] [--repeats 5]``. Without ``--ckpt``
two rate points are measured: the tiny preset with random weights (~2 bpp) and a 150-step tiny
distill run trained here first (~0.1 bpp, about a minute).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PERTURBATIONS = ("kernels", "threads", "batch", "channels", "bf16", "all")
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def load_bundles(ckpts: list[str], work: Path) -> list[tuple[str, str]]:
    """(label, checkpoint path) of each rate point; trains the default ones when none is given."""
    if ckpts:
        return [(Path(c).parent.name or c, c) for c in ckpts]
    from onedc.training.config import compose, to_dict
    from onedc.training.pipeline import run

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "bitstream"))
    from conftest import make_checkpoint  # the test suite's untrained checkpoint writer

    random_ckpt = make_checkpoint(to_dict(compose(["model=tiny_random"]).model), work / "random.ckpt")
    trained = run(compose([f"run_dir={work / 'run'}", "trainer.logger=none", "trainer.enable_progress_bar=false",
                           "data.crop_size=128", "data.batch_size=4", "trainer.max_steps=150",
                           "stage.val_every_n_steps=150", "stage.checkpoint_every_n_steps=150"]))[0]
    return [("untrained", str(random_ckpt)), ("distill-150", str(trained.final_ckpt))]


def z_hats(bundle, photos: list[Path]) -> list[torch.Tensor]:
    """ẑ of each photo, rebuilt from its FSQ indices exactly as a decoder does."""
    from onedc.datamodules.image_folder import load_image

    return [bundle.quantised_forward(load_image(p)).z_hat for p in photos]


def decisions(bundle, z_hat: torch.Tensor, perturbation: str) -> dict[str, torch.Tensor]:
    """Old (float32) and new (format-2) decisions for ẑ under one in-process perturbation."""
    from onedc.modules.decisions import float64_call

    codec = bundle.codec
    if perturbation in ("batch", "all"):
        z_hat = torch.cat([z_hat, z_hat.flip(-1), z_hat.flip(-2), z_hat.flip(-1, -2)])
    if perturbation in ("channels", "all"):
        z_hat = z_hat.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=perturbation in ("bf16", "all")):
        _, means, scales = codec.hyper_synthesis(z_hat)
        new = codec.coding_decisions(z_hat)
        params64 = float64_call(codec.entropy_parameters, float64_call(codec.h_s, z_hat))  # what decide() saw
    return {"old_index": codec.gaussian_conditional.build_indexes(scales.float())[:1],
            "old_mean": means.float()[:1], "new_index": new.indexes[:1], "new_mean": new.mean_codes[:1],
            "new_margin": new.margin[:1], "params64": params64[:1]}


def worker(ckpt: str, zfile: str, out: str, perturbation: str) -> None:
    """Subprocess mode: decisions of the saved ẑ list under this process's kernels."""
    from onedc.coding.bundle import OneDCCodec

    bundle = OneDCCodec.from_checkpoint(ckpt)
    if perturbation == "all":
        torch.set_num_threads(2)
        bundle = bundle.to(memory_format=torch.channels_last)
    else:
        torch.set_num_threads(1)
    torch.save([decisions(bundle, z, perturbation) for z in torch.load(zfile)], out)


def count(reference: list[dict], other: list[dict], fixes: list[bytes], tables: int) -> dict[str, int]:
    """Disagreements of the old path (index, μ) and of the new path after the encoder's fixes."""
    from onedc.modules.decisions import CodingDecisions, apply_fixes

    totals = {"symbols": 0, "old_index": 0, "old_mean": 0, "new": 0, "rel64": 0.0}
    for ref, got, fix in zip(reference, other, fixes):
        fixed = apply_fixes(CodingDecisions(got["new_mean"], got["new_index"], got["new_margin"]), fix, tables)
        totals["symbols"] += ref["old_index"].numel()
        totals["old_index"] += int((ref["old_index"] != got["old_index"]).sum())
        totals["old_mean"] += int((ref["old_mean"] != got["old_mean"]).sum())
        totals["new"] += int(((ref["new_index"] != fixed.indexes) | (ref["new_mean"] != fixed.mean_codes)).sum())
        rel = ((ref["params64"] - got["params64"]).abs() / (1 + ref["params64"].abs())).max().item()
        totals["rel64"] = max(totals["rel64"], rel)
    return totals


def time_paths(bundle, photos: list[Path], repeats: int) -> dict[str, float]:
    """Median seconds over all photos: decision path and entropy decode, old vs new, interleaved."""
    from onedc.datamodules.image_folder import load_image

    codec = bundle.codec
    gc = codec.gaussian_conditional
    times: dict[str, list[float]] = {k: [] for k in ("old_decide", "new_decide", "old_decode", "new_decode")}
    streams = []
    for path in photos:
        padded, _ = bundle._prepare(load_image(path))
        coded = codec.compress(padded, bundle.vae.encode(padded))
        y, sem = codec.analysis(padded, bundle.vae.encode(padded))
        z_hat = codec.fsq.indices_to_codes(codec.fsq.codes_to_indices(codec.hyper_analysis(sem)))
        _, means, scales = codec.hyper_synthesis(z_hat)
        old_y = gc.compress(y, gc.build_indexes(scales), means=means)  # format 1's encoder
        streams.append((coded, old_y, z_hat))
    for _ in range(repeats):
        sums = dict.fromkeys(times, 0.0)
        for coded, old_y, z_hat in streams:
            start = time.perf_counter()
            _, means, scales = codec.hyper_synthesis(z_hat)
            gc.build_indexes(scales)
            sums["old_decide"] += time.perf_counter() - start
            start = time.perf_counter()
            codec.coding_decisions(z_hat)
            sums["new_decide"] += time.perf_counter() - start
            start = time.perf_counter()
            codec.decompress([old_y, coded["strings"][1]], coded["shape"], legacy=True)
            sums["old_decode"] += time.perf_counter() - start
            start = time.perf_counter()
            codec.decompress(coded["strings"], coded["shape"], fixes=coded["fixes"], checksums=coded["checksums"])
            sums["new_decode"] += time.perf_counter() - start
        for key, value in sums.items():
            times[key].append(value)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def measure(label: str, ckpt: str, photos: list[Path], work: Path, repeats: int) -> dict[str, int]:
    """Print the disagreement table and the timing ratios of one rate point; return its totals."""
    from onedc.datamodules.image_folder import load_image
    from onedc.coding.bundle import OneDCCodec
    from onedc.modules.decisions import CodingDecisions, encode_fixes

    bundle = OneDCCodec.from_checkpoint(ckpt)
    zs = z_hats(bundle, photos)
    reference = [decisions(bundle, z, "none") for z in zs]
    fixes = [encode_fixes(CodingDecisions(r["new_mean"], r["new_index"], r["new_margin"])) for r in reference]
    bits = sum(len(bundle.compress_image(load_image(p))) for p in photos) * 8
    pixels = sum(z.shape[-2] * z.shape[-1] * bundle.codec.downsample ** 2 for z in zs)
    print(f"\n{label}: {ckpt}\n  {len(photos)} photos, {bits / pixels:.4f} bpp (file bits over padded pixels), "
          f"fix lists: {sum(len(f) - 1 for f in fixes)} bytes beyond their count bytes")
    torch.save(zs, work / "z.pt")
    tables = int(bundle.codec.gaussian_conditional._offset.numel())
    print(f"  {'case':<9} {'old path: table index flips':>34} {'old path: μ differs':>26} "
          f"{'new path: decisions differ':>34} {'float64 max rel diff':>21}")
    totals = dict.fromkeys(("symbols", "old_index", "old_mean", "new"), 0)
    for perturbation in PERTURBATIONS:
        if perturbation in ("kernels", "all"):
            out = work / f"{perturbation}.pt"
            env = dict(os.environ, **OTHER_KERNELS, OMP_NUM_THREADS="2" if perturbation == "all" else "1")
            subprocess.run([sys.executable, __file__, "--worker", ckpt, str(work / "z.pt"), str(out), perturbation],
                           env=env, check=True)
            other = torch.load(out)
        else:
            torch.set_num_threads(2 if perturbation == "threads" else 1)
            if perturbation == "channels":
                bundle.to(memory_format=torch.channels_last)
            other = [decisions(bundle, z, perturbation) for z in zs]
            bundle.to(memory_format=torch.contiguous_format)
            torch.set_num_threads(1)
        c = count(reference, other, fixes, tables)
        for key in totals:
            totals[key] += c[key]
        m = c["symbols"]
        print(f"  {perturbation:<9} {c['old_index']:>13,} of {m:>9,} symbols {c['old_mean']:>9,} of {m:>9,} symbols "
              f"{c['new']:>13,} of {m:>9,} symbols {c['rel64']:>21.1e}")
    t = time_paths(bundle, photos, repeats)
    print(f"  decode time, new / old path (median of {repeats} rounds over all photos): decision path "
          f"{t['new_decide'] / t['old_decide']:.2f}x ({1e3 * t['new_decide']:.1f} vs {1e3 * t['old_decide']:.1f} ms); "
          f"entropy decode incl. g_s {t['new_decode'] / t['old_decode']:.2f}x "
          f"({1e3 * t['new_decode']:.1f} vs {1e3 * t['old_decode']:.1f} ms)")
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", default=[], help="stage checkpoint (repeat for several rates)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--worker", nargs=4, metavar=("CKPT", "ZFILE", "OUT", "PERTURBATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        with torch.inference_mode():
            worker(*args.worker)
        return
    from onedc.datamodules.image_folder import sample_photo_paths
    from onedc.modules.decisions import FIX_BANDS, GUARD

    photos = [p for _, p in sorted(sample_photo_paths().items())]
    grand = dict.fromkeys(("symbols", "old_index", "old_mean", "new"), 0)
    print(f"portability benchmark: this process runs {torch.backends.cpu.get_cpu_capability()} kernels, 1 thread; "
          f"'kernels' and 'all' run in a subprocess with {OTHER_KERNELS}")
    with tempfile.TemporaryDirectory(prefix="onedc-portability-") as tmp:
        work = Path(tmp)
        for label, ckpt in load_bundles(args.ckpt, work):
            for key, value in measure(label, ckpt, photos, work, args.repeats).items():
                grand[key] += value
    m = grand["symbols"]
    print(f"(guard band: {GUARD:.1e} relative; the encoder signals decisions within {FIX_BANDS:g} bands)")
    print(f"\nall cases: old path {grand['old_index']:,} table-index flips and {grand['old_mean']:,} μ differences "
          f"of {m:,} symbols; new path {grand['new']:,} of {m:,} symbols differ")


if __name__ == "__main__":
    main()
