"""Decode-time benchmark: one-step against N-step decoding of the same ``.onedc`` file, in one run.

::

    bytes ─ OneDCCodec.decompress_bytes(steps)
      ├─ _entropy_decode ─ codec.decompress: z unpack, rANS y (+ decisions, fixes, checksum)
      │                      prior networks  (h_s, prior fusion, context step priors; float64)
      │                      g_s (+ semantic branch: h_sem / semantic adaptor)
      ├─ _latent_from ──── generator: ONE UNet step (OneDC) | multi_step(N), DDIM from T (N UNet calls)
      └─ vae.decode ────── x̂

Usage: ``python benchmarks/decode.py [--ckpt CKPT | --model tiny|onedc_sd15] [--size 256] [--steps 20]``.
Without ``--ckpt`` the preset is built with random weights (speed does not depend on the
weights). Every figure is timed inside the real decoder: each measurement is one call of
``OneDCCodec.decompress_bytes``, and the split comes from forward hooks on the codec's and
generator's submodules and from timing wrappers around the bundle's own decode stages, so
nothing is re-run on its own. The 1-step and N-step decodes are timed round-robin (after one
untimed 1-step warm-up, which runs every kernel the N-step decode runs); each is reported by
its median round of ``--repeats``.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Decoder-side codec submodules per codec class: (split row, attribute names). Modules of one row
# never nest, and what the codec's decompress spends outside them is entropy decoding proper.
CODEC_ROWS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "HyperpriorCodec": (
        ("prior networks (h_s, entropy parameters)", ("h_s", "entropy_parameters")),
        ("g_s + semantic branch (h_sem)", ("h_sem", "token_norm", "g_s", "to_latent")),
    ),
    "CodingReferenceCodec": (
        ("h_s + prior fusion", ("hyper_dec", "y_prior_fusion", "y_spatial_prior_reduction")),
        ("context step priors (steps 1-3)", ("y_spatial_prior_adaptor_1", "y_spatial_prior_adaptor_2",
                                             "y_spatial_prior_adaptor_3", "y_spatial_prior")),
        ("g_s + semantic adaptor", ("semantic_adaptor", "dec")),
    ),
}


class StageTimer:
    """Wall time (ms) spent inside chosen modules and methods while a call runs, by stage name.

    Module stages use forward pre/post hooks, method stages an instance-level wrapper around the
    bound method, so the timed code is the caller's own. A stage re-entered while running (a
    module that calls itself through another watched module of the same stage) counts once.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs at every boundary so GPU time is attributed.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)  # outermost entries per stage, of the last measure()
        self._depth: dict[str, int] = defaultdict(int)
        self._start: dict[str, float] = {}
        self._sync = sync or (lambda: None)

    def _enter(self, stage: str) -> None:
        if self._depth[stage] == 0:
            self._sync()
            self._start[stage] = time.perf_counter()
            self.calls[stage] += 1
        self._depth[stage] += 1

    def _leave(self, stage: str) -> None:
        self._depth[stage] -= 1
        if self._depth[stage] == 0:
            self._sync()
            self.totals[stage] += (time.perf_counter() - self._start[stage]) * 1e3

    def watch_modules(self, stage: str, modules: Sequence[nn.Module]) -> None:
        """Time every forward call of ``modules`` under ``stage``."""
        for module in modules:
            module.register_forward_pre_hook(lambda *_, s=stage: self._enter(s))
            module.register_forward_hook(lambda *_, s=stage: self._leave(s))

    def watch_method(self, stage: str, owner: Any, name: str) -> None:
        """Time every call of ``owner.name`` under ``stage`` (an instance attribute shadows the method)."""
        method = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter(stage)
            try:
                return method(*args, **kwargs)
            finally:
                self._leave(stage)

        object.__setattr__(owner, name, timed)

    def measure(self, fn: Callable[[], object]) -> dict[str, float]:
        """Run ``fn`` once: its total wall time (``"total"``) and each stage's time, in ms."""
        self.totals.clear()
        self.calls.clear()
        self._enter("total")
        try:
            fn()
        finally:
            self._leave("total")
        return dict(self.totals)


def interleaved(fns: Mapping[str, Callable[[], dict[str, float]]], repeats: int,
                warmup: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
    """Per fn, the figures of its median run by ``"total"``, the fns timed round-robin ``repeats`` times.

    Round-robin timing exposes every measurement to the same machine load, so their ratios stay
    meaningful on a shared machine even when the absolute times drift. The median run is reported
    whole (not a median per figure), so its split adds up to its total. ``warmup`` runs once
    first, untimed.
    """
    if warmup is not None:
        warmup()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: sorted(values, key=lambda r: r["total"])[(len(values) - 1) // 2] for name, values in runs.items()}


def load_bundle(ckpt: str | None, model: str, device: str):
    """(OneDCCodec with a generator, description) from a stage checkpoint or a random model preset."""
    from onedc.coding.bundle import OneDCCodec

    if ckpt is not None:
        bundle = OneDCCodec.from_checkpoint(ckpt, device=device)  # the decoder's own loader
        if bundle.generator is None:
            raise SystemExit(f"{ckpt} has no generator weights: give a latent or finetune stage checkpoint")
        return bundle, str(ckpt)
    from onedc.families import family_of
    from onedc.training.config import compose, to_dict

    model_cfg = to_dict(compose([f"model={model}"]).model)
    base = OneDCCodec.from_config(model_cfg)  # VAE + seeded random codec, tables built
    generator = family_of(model_cfg).build_generator(model_cfg)
    bundle = OneDCCodec.from_modules(base.vae, base.codec, generator, model_config=model_cfg, copy_trainable=False)
    return bundle.to(device), f"model={model}, random weights"


def sample_image(size: int) -> torch.Tensor:
    """A (3,size,size) centre crop of an embedded sample photo, in [-1, 1]."""
    from onedc.datamodules.image_folder import load_image, sample_photo_paths

    image = load_image(sample_photo_paths()["astronaut"])[None]
    scale = size / min(image.shape[-2:])
    image = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False, antialias=True)
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[0, :, top:top + size, left:left + size].clamp(-1, 1)


def watch_decoder(bundle, timer: StageTimer) -> tuple[str, ...]:
    """Hook the decoder's stages into ``timer``; the codec rows' names, in order."""
    rows = CODEC_ROWS.get(type(bundle.codec).__name__)
    if rows is None:
        raise SystemExit(f"no decode split known for codec class {type(bundle.codec).__name__} (see CODEC_ROWS)")
    for row, names in rows:
        timer.watch_modules(row, [bundle.codec.get_submodule(name) for name in names])
    timer.watch_modules("unet", [bundle.generator.unet])
    timer.watch_method("entropy_stage", bundle, "_entropy_decode")
    timer.watch_method("generator", bundle, "_latent_from")
    timer.watch_method("vae", bundle.vae, "decode")
    return tuple(row for row, _ in rows)


def report(t1: dict[str, float], tn: dict[str, float], codec_rows: tuple[str, ...], steps: int, timestep: int) -> str:
    """The benchmark's text output (split of the 1-step decode, then 1-step vs N-step)."""
    def split(t: dict[str, float]) -> list[tuple[str, float]]:
        networks = sum(t.get(r, 0.0) for r in codec_rows)
        stages = t.get("entropy_stage", 0.0) + t.get("generator", 0.0) + t.get("vae", 0.0)
        return ([("entropy decoding (z unpack + rANS y, decisions)", t.get("entropy_stage", 0.0) - networks)]
                + [(r, t.get(r, 0.0)) for r in codec_rows]
                + [(f"UNet (1 | {steps} steps)", t.get("unet", 0.0)),
                   ("generator rest (x_t head, x0 / DDIM)", t.get("generator", 0.0) - t.get("unet", 0.0)),
                   ("VAE decode", t.get("vae", 0.0)),
                   ("container checks, crop", t["total"] - stages)])

    lines = [f"{'decode split':<50} {'1-step ms':>10} {'%':>6} {f'{steps}-step ms':>11} {'%':>6}"]
    for (name, a), (_, b) in zip(split(t1), split(tn)):
        lines.append(f"  {name:<48} {a:10.1f} {100 * a / t1['total']:6.1f} {b:11.1f} {100 * b / tn['total']:6.1f}")
    total = "total (decompress_bytes)"
    lines.append(f"  {total:<48} {t1['total']:10.1f} {100.0:6.1f} {tn['total']:11.1f} {100.0:6.1f}")
    shared = t1["total"] - t1["generator"]
    lines += ["",
              f"1-step decode   {t1['total']:10.1f} ms   (generator {t1['generator']:.1f} ms)",
              f"{steps}-step decode  {tn['total']:10.1f} ms   "
              f"(generator {tn['generator']:.1f} ms, DDIM from t={timestep})",
              f"ratio {steps}-step / 1-step: {tn['total'] / t1['total']:.2f}x end to end, "
              f"{tn['generator'] / t1['generator']:.1f}x latent decoding (generator); "
              f"shared parts (entropy + codec networks + VAE): {shared:.1f} ms of the 1-step decode"]
    return "\n".join(lines)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint with a generator (default: a random --model)")
    parser.add_argument("--model", default="tiny", help="model preset when no --ckpt is given (tiny, onedc_sd15)")
    parser.add_argument("--size", type=int, default=256, help="square image side (multiple of 64)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the multi-step baseline")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median); 1 is enough at full size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable timings on a shared machine; 0: torch default)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--bf16", action="store_true",
                        help="decode under bf16 autocast (the reference's GPU setting; the decision path "
                             "stays float64 and the VAE float32 by design)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    bundle, what = load_bundle(args.ckpt, args.model, args.device)
    counts = {part: sum(p.numel() for p in getattr(bundle, part).parameters()) / 1e6
              for part in ("codec", "generator", "vae")}
    built_s = time.perf_counter() - start
    data = bundle.compress_image(sample_image(args.size))
    encoded_s = time.perf_counter() - start - built_s

    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else None
    timer = StageTimer(sync)
    codec_rows = watch_decoder(bundle, timer)
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)

    def decode(steps: int) -> Callable[[], dict[str, float]]:
        def run() -> None:
            with autocast:
                bundle.decompress_bytes(data, steps=steps)
        return lambda: timer.measure(run)

    t = interleaved({"1": decode(1), "n": decode(args.steps)}, args.repeats, warmup=decode(1))
    rounds = (f"median of {args.repeats} interleaved rounds (by total)" if args.repeats > 1
              else "one timed round (repeats=1), the two decodes interleaved")
    print(f"decode benchmark: {what} ({', '.join(f'{part} {n:.1f}M' for part, n in counts.items())} parameters), "
          f"{args.size}x{args.size} image "
          f"({len(data)} bytes, {8 * len(data) / args.size ** 2:.4f} bpp), {args.device}"
          f"{' bf16 autocast' if args.bf16 else ' fp32'}, {torch.get_num_threads()} thread(s), {rounds} "
          f"after a 1-step warm-up (build {built_s:.0f} s, encode {encoded_s:.0f} s)\n")
    print(report(t["1"], t["n"], codec_rows, args.steps, bundle.generator.timestep))


if __name__ == "__main__":
    main()
