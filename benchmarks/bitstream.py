"""Bitstream benchmark: real ``.onedc`` encode and decode speed on the sample photos.

::

    compress_image:   pad ─ VAE enc ─ g_a / h_a / FSQ ─ h_s ─ rANS y + pack z ─ container
    decompress_bytes: container (CRCs) ─ [unpack z] ─ h_s ─ [rANS y] ─ h_sem, g_s ─ (generator) ─ VAE dec

Usage: ``python benchmarks/bitstream.py [--ckpt CKPT] [--repeats 3] [--threads 1] [--no-rate]``.
Without ``--ckpt`` the tiny preset with random weights is timed (speed does not depend on the
weights). Each photo is compressed and decompressed ``--repeats`` times after one warm-up
round; times are medians, reported per megapixel of the original (unpadded) image. The
entropy-coding share of decoding is the time spent inside ``gaussian_conditional.decompress``
(rANS y) and ``unpack_indices`` (fixed-length z), measured by wrapping those two calls inside
the real decoder, divided by the whole ``decompress_bytes`` time. A second table compares, per
photo, the real rate of the file (without its header) with the likelihood estimate
(:func:`onedc.coding.rate.rate_table`).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


class Stopwatch:
    """Wraps callables so that the time spent inside them accumulates under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed

    def reset(self) -> None:
        self.seconds = {}


def load_codec(ckpt: str | None, model: str):
    """The inference bundle from a checkpoint, or the ``model`` preset with random weights."""
    from onedc.coding.bundle import OneDCCodec

    if ckpt is not None:
        return OneDCCodec.from_checkpoint(ckpt), str(ckpt)
    from onedc.training.config import compose, to_dict

    return OneDCCodec.from_config(to_dict(compose([f"model={model}"]).model)), f"model={model}, random weights"


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="stage checkpoint (default: random tiny model)")
    parser.add_argument("--model", default="tiny_random", help="model preset when no --ckpt is given")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per image (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable timings on a shared machine; 0: torch default)")
    parser.add_argument("--no-rate", dest="rate", action="store_false",
                        help="skip the real-vs-estimated rate table")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import onedc.modules.light.codec as codec_module
    from onedc.datamodules.image_folder import load_image, sample_photo_paths

    bundle, what = load_codec(args.ckpt, args.model)
    watch = Stopwatch()
    # Time the two entropy-decoding calls inside the real decoder (restored at the end).
    rans = bundle.codec.gaussian_conditional
    rans.decompress = watch.wrap("rans_y", rans.decompress)
    real_unpack = codec_module.unpack_indices
    codec_module.unpack_indices = watch.wrap("unpack_z", real_unpack)
    try:
        rows = []
        photos = sorted(sample_photo_paths().items())
        warm = load_image(photos[0][1])
        bundle.decompress_bytes(bundle.compress_image(warm))  # first calls pay one-off kernel set-up
        for name, path in photos:
            x = load_image(Path(path))
            enc, dec, entropy = [], [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                data = bundle.compress_image(x)
                enc.append(time.perf_counter() - start)
                watch.reset()
                start = time.perf_counter()
                bundle.decompress_bytes(data)
                dec.append(time.perf_counter() - start)
                entropy.append(sum(watch.seconds.values()))
            mp = x.shape[-2] * x.shape[-1] / 1e6
            rows.append(dict(name=name, size=f"{x.shape[-2]}x{x.shape[-1]}", mp=mp, bytes=len(data),
                             bpp=len(data) * 8 / (mp * 1e6), enc=statistics.median(enc), dec=statistics.median(dec),
                             entropy=statistics.median(entropy)))
    finally:
        del rans.decompress  # drop the instance attribute: the class method is back
        codec_module.unpack_indices = real_unpack

    print(f"bitstream benchmark: {what}, {torch.get_num_threads()} thread(s), median of {args.repeats}, "
          f"ms per megapixel of the original image")
    print(f"{'image':<18} {'size':>9} {'bytes':>6} {'bpp':>7} {'enc ms':>8} {'dec ms':>8} "
          f"{'enc ms/MP':>10} {'dec ms/MP':>10} {'entropy %':>9}")
    for r in rows:
        print(f"{r['name']:<18} {r['size']:>9} {r['bytes']:>6} {r['bpp']:>7.4f} {1e3 * r['enc']:>8.1f} "
              f"{1e3 * r['dec']:>8.1f} {1e3 * r['enc'] / r['mp']:>10.1f} {1e3 * r['dec'] / r['mp']:>10.1f} "
              f"{100 * r['entropy'] / r['dec']:>8.2f}%")
    total_mp = sum(r["mp"] for r in rows)
    enc, dec, ent = (sum(r[k] for r in rows) for k in ("enc", "dec", "entropy"))
    print(f"{'all':<18} {total_mp:>8.2f}M {'':>6} {'':>7} {1e3 * enc:>8.1f} {1e3 * dec:>8.1f} "
          f"{1e3 * enc / total_mp:>10.1f} {1e3 * dec / total_mp:>10.1f} {100 * ent / dec:>8.2f}%")
    print(f"entropy coding (rANS y + z unpack) takes {1e3 * ent:.1f} ms of {1e3 * dec:.1f} ms decode "
          f"({100 * ent / dec:.2f} %); the rest is h_s, h_sem, g_s, the generator and the VAE decoder")
    if args.rate:
        from onedc.coding.rate import format_rate_table, rate_table

        print("\nrate: payload = file - 68-byte header; est = -sum log2 p(y) + z bits; diff = payload vs est")
        print(format_rate_table(rate_table(bundle, [path for _, path in photos])))


if __name__ == "__main__":
    main()
