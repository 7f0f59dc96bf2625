"""Peak memory and time of the VAE decode at growing image sizes, tiled as the memory bound says; tile seam error.

::

    for each size: a fresh child process ─ full-width SD-2.1 VAE (random weights), decoder prepared as the
                                           default decode path (channels-last, --precision) ─ peak RSS reset
                                           (/proc/self/clear_refs) ─ one decode of a random latent, tiled
                                           by DecodeOptions(max_memory_gb) exactly as OneDCCodec does ─ VmHWM
    --estimate sizes: no run; the tile plan's activation estimate + weights + the output image
    --seam SIZE TILE: untiled vs tiled decode of one latent (both must fit): max |diff|, PSNR

The VAE is where a decode's memory goes (69 % of the time at 512², and its activations at full
resolution: 3.4 KB per output pixel in fp32, 1.7 KB in bf16, measured here), so the VAE alone at
full width bounds the whole decode's activations; the rest of the decoder (codec networks, the
UNet at 1/8) adds its weights (5.6 GB in fp32, 3.6 GB with the bf16 UNet) and much smaller
activations. Usage: ``python benchmarks/decode_memory.py [--sizes 512 1024] [--estimate 2048 4096]
[--precision bf16] [--max-memory 4] [--seam 768 512]``.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def _prepared_vae(precision: str):
    from onedc.modules import decode_speed as speed
    from onedc.modules.reference.vae import build_reference_vae

    vae = build_reference_vae()
    dtype = speed.resolve_precision(precision, "cpu")
    for part in (vae.autoencoder.decoder, vae.autoencoder.post_quant_conv):
        speed.to_channels_last(part)
        speed.cast_weights(part, dtype)
    return vae, dtype


@torch.inference_mode()
def child(side: int, precision: str, max_memory: float | None, tile_size: int | None, threads: int) -> dict:
    """One decode in this process: its peak RSS (bytes), the RSS before it, seconds, the tile used."""
    from onedc.coding.decode_options import DecodeOptions, vae_plan
    from onedc.modules.decode_speed import set_vae_tiling

    torch.set_num_threads(threads)
    vae, dtype = _prepared_vae(precision)
    options = DecodeOptions(precision=precision, max_memory_gb=max_memory, tile_size=tile_size)
    plan = vae_plan(options, (side // 8, side // 8), 1, dtype)
    set_vae_tiling(vae.autoencoder, plan.tile)
    latent = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter to the current RSS
    start = time.perf_counter()
    image = vae.decode(latent)
    seconds = time.perf_counter() - start
    return {"side": side, "peak": _status("VmHWM"), "before": before, "seconds": seconds, "tile": plan.tile,
            "estimate": plan.estimated_bytes, "shape": list(image.shape)}


@torch.inference_mode()
def seam(side: int, tile_px: int, precision: str, threads: int) -> dict:
    """Untiled vs tiled decode of one random latent: max |diff| and PSNR of the clamped images."""
    from onedc.modules.decode_speed import set_vae_tiling

    torch.set_num_threads(threads)
    vae, _ = _prepared_vae(precision)
    latent = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(latent).clamp(-1, 1)
    set_vae_tiling(vae.autoencoder, tile_px // 8)
    tiled = vae.decode(latent).clamp(-1, 1)
    diff = (tiled.double() - whole.double())
    mse = (diff / 2).pow(2).mean().item()
    return {"side": side, "tile": tile_px, "max": diff.abs().max().item(),
            "p999": diff.abs().flatten().float().quantile(0.999).item(), "psnr": -10 * math.log10(mse)}


def spawn(args: list[str]) -> dict:
    """Run this script as a child with ``args`` and return its JSON line."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="image sides decoded for real")
    parser.add_argument("--estimate", type=int, nargs="*", default=[2048, 4096], help="image sides only estimated")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--max-memory", type=float, default=4.0, help="GiB bound of the VAE activations")
    parser.add_argument("--tile-size", type=int, default=None, help="fixed tile (px) instead of --max-memory")
    parser.add_argument("--seam", type=int, nargs=2, default=None, metavar=("SIZE", "TILE"),
                        help="also measure the seam error of TILE-px tiles at SIZE (untiled must fit)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("decode", "seam"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "decode":
        print(json.dumps(child(args.side, args.precision, args.max_memory, args.tile_size, args.threads)))
        return
    if args.child == "seam":
        print(json.dumps(seam(args.side, args.tile_size, args.precision, args.threads)))
        return

    from onedc.coding.decode_options import DecodeOptions, vae_plan
    from onedc.modules.decode_speed import GIB, bf16_support, resolve_precision

    dtype = resolve_precision(args.precision, "cpu")
    common = ["--precision", args.precision, "--max-memory", str(args.max_memory), "--threads", str(args.threads)]
    if args.tile_size:
        common += ["--tile-size", str(args.tile_size)]
    print(f"VAE decode memory: full-width SD-2.1 decoder (random weights), {dtype}, channels-last, "
          f"{args.threads} thread(s); bound {args.max_memory} GiB of activations; {bf16_support('cpu').reason}")
    print(f"{'size':>6} {'tile px':>8} {'peak RSS GiB':>13} {'decode +GiB':>12} {'estimate GiB':>13} {'time s':>8}")
    for side in args.sizes:
        r = spawn(["--child", "decode", "--side", str(side), *common])
        tile = "none" if r["tile"] is None else str(8 * r["tile"])
        print(f"{side:>6} {tile:>8} {r['peak'] / GIB:13.2f} {(r['peak'] - r['before']) / GIB:12.2f} "
              f"{r['estimate'] / GIB:13.2f} {r['seconds']:8.1f}")
    options = DecodeOptions(precision=args.precision, max_memory_gb=args.max_memory, tile_size=args.tile_size)
    for side in args.estimate:
        plan = vae_plan(options, (side // 8, side // 8), 1, dtype)
        tile = "none" if plan.tile is None else str(8 * plan.tile)
        output = 3 * side * side * 4 * 2.5  # the float32 image, its decoded tiles and the blended rows
        print(f"{side:>6} {tile:>8} {'(estimated)':>13} {(plan.estimated_bytes + output) / GIB:12.2f} "
              f"{plan.estimated_bytes / GIB:13.2f} {'-':>8}")
    if args.seam:
        r = spawn(["--child", "seam", "--side", str(args.seam[0]), "--precision", args.precision,
                   "--tile-size", str(args.seam[1]), "--threads", str(args.threads)])
        print(f"\nseam error, {r['side']}² decoded untiled vs in {r['tile']}-px tiles (128-px overlap, blended), "
              f"clamped to [-1, 1]: max |diff| {r['max']:.4f}, 99.9th percentile {r['p999']:.4f}, PSNR {r['psnr']:.2f} dB")


if __name__ == "__main__":
    main()
