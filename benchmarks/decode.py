"""Decode-time benchmark: one-step against N-step decoding of the same bitstream, in one run.

::

    bits ─ entropy decode (z unpack, rANS y) ─ h_s / h_sem / g_s ─> features, tokens
         ─ generator: ONE UNet step            (OneDC)
         | generator.multi_step(N), DDIM from T (baseline, N UNet calls)
         ─ VAE decode ─> x̂

Usage: ``python benchmarks/decode.py [--ckpt latent/final.ckpt] [--size 256] [--steps 20]``.
Without ``--ckpt`` the tiny preset with random weights is timed (speed does not depend on the
weights). Times are medians over ``--repeats`` round-robin rounds after one warm-up round. The entropy-decoding
share is ``codec.decompress`` minus its h_s, h_sem and g_s parts, each timed on its own, so the
benchmark times the real decoder instead of a copy of it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time in ms of each ``fn()``, timed round-robin (one untimed warm-up round first).

    Round-robin timing exposes every measurement to the same machine load, so their ratios stay
    meaningful on a shared machine even when the absolute times drift.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def load_models(ckpt: str | None, model: str) -> tuple[nn.Module, nn.Module, nn.Module, str]:
    """(vae, codec, generator, description) from a stage checkpoint or a random model preset."""
    from onedc.inference import OneDCCodec

    if ckpt is not None:
        bundle = OneDCCodec.from_checkpoint(ckpt)  # the decoder's own loader: strict, tables built
        if bundle.generator is None:
            raise SystemExit(f"{ckpt} has no generator weights: give a latent or finetune stage checkpoint")
        return bundle.vae, bundle.codec, bundle.generator, str(ckpt)
    from onedc.build import build_generator
    from onedc.config import compose, to_dict

    model_cfg = to_dict(compose([f"model={model}"]).model)
    bundle = OneDCCodec.from_config(model_cfg)
    return bundle.vae, bundle.codec, build_generator(model_cfg).eval(), f"model={model}, random weights"


def sample_image(size: int) -> torch.Tensor:
    """A (1,3,size,size) centre crop of an embedded sample photo, in [-1, 1]."""
    from onedc.datamodules.image_folder import load_image, sample_photo_paths

    image = load_image(sample_photo_paths()["astronaut"])[None]
    scale = size / min(image.shape[-2:])
    image = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False, antialias=True)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top:top + size, left:left + size].clamp(-1, 1)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="latent/finetune stage checkpoint (default: random tiny model)")
    parser.add_argument("--model", default="tiny", help="model preset when no --ckpt is given")
    parser.add_argument("--size", type=int, default=256, help="square image side (multiple of 64)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the multi-step baseline")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable timings on a shared machine; 0: torch default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    vae, codec, generator, what = load_models(args.ckpt, args.model)
    codec.update(force=True)
    x = sample_image(args.size)
    bits = codec.compress(x, vae.encode(x))
    strings, shape = bits["strings"], bits["shape"]
    decoded = codec.decompress(strings, shape)
    n_bytes = sum(len(s[0]) for s in strings)
    r = args.repeats

    hyper = codec.hyper_synthesis(decoded.z_hat)[0]
    latent = generator(decoded.features, decoded.tokens)
    t = interleaved_ms({
        "decompress": lambda: codec.decompress(strings, shape),
        "h_s": lambda: codec.hyper_synthesis(decoded.z_hat),
        "h_sem": lambda: codec.semantics(decoded.z_hat),
        "g_s": lambda: codec.synthesis(decoded.y_hat, hyper),
        "unet": lambda: generator(decoded.features, decoded.tokens),
        "multi": lambda: generator.multi_step(decoded.features, decoded.tokens, args.steps),
        "vae": lambda: vae.decode(latent),
    }, args.repeats)
    t_decompress, t_hs, t_hsem, t_gs = t["decompress"], t["h_s"], t["h_sem"], t["g_s"]
    t_unet, t_multi, t_vae = t["unet"], t["multi"], t["vae"]

    t_entropy = max(0.0, t_decompress - t_hs - t_hsem - t_gs)
    one_step = t_decompress + t_unet + t_vae
    n_step = t_decompress + t_multi + t_vae
    print(f"decode benchmark: {what}, {args.size}x{args.size} image ({n_bytes} bytes, "
          f"{8 * n_bytes / args.size ** 2:.4f} bpp), {torch.get_num_threads()} thread(s), median of {r}")
    print(f"\none-step decode split ({one_step:.1f} ms):")
    rows = [("entropy decoding (z unpack + rANS y)", t_entropy), ("h_s + h_sem + g_s", t_hs + t_hsem + t_gs),
            ("UNet (1 step)", t_unet), ("VAE decode", t_vae)]
    for name, ms in rows:
        print(f"  {name:<38} {ms:9.2f} ms  {100 * ms / one_step:5.1f} %")
    print(f"    (of which h_s {t_hs:.2f} ms, h_sem {t_hsem:.2f} ms, g_s {t_gs:.2f} ms)")
    print(f"\n1-step decode   {one_step:9.1f} ms   (generator {t_unet:.1f} ms)")
    print(f"{args.steps}-step decode  {n_step:9.1f} ms   "
          f"(generator {t_multi:.1f} ms, DDIM from t={generator.timestep})")
    print(f"speed-up: {t_multi / t_unet:.1f}x latent decoding (generator), {n_step / one_step:.1f}x end to end "
          f"(shared parts: entropy + g_s + VAE = {one_step - t_unet:.1f} ms)")


if __name__ == "__main__":
    main()
