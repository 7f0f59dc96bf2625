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
import math
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
        bundle = OneDCCodec.from_checkpoint(ckpt, device=device, decode_options=None)  # modules as built
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("paths", "steps"), default="paths",
                        help="paths: the fp32 path against each fast decode path (default); "
                             "steps: 1-step vs N-step decoding and the decode split")
    parser.add_argument("--ckpt", default=None, help="checkpoint with a generator (default: a random --model)")
    parser.add_argument("--model", default="tiny", help="model preset when no --ckpt is given (tiny, onedc_sd15)")
    parser.add_argument("--size", type=int, default=256, help="square image side (multiple of 64)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the multi-step baseline (--mode steps)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median); 1-2 at full size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable timings on a shared machine; 0: torch default)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--bf16", action="store_true",
                        help="--mode steps: decode under bf16 autocast (the reference's GPU setting; the decision "
                             "path stays float64 and the VAE float32 by design)")
    parser.add_argument("--compile", action="store_true",
                        help="--mode paths: also time the default path with torch.compile (minutes of compiling)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="--mode paths: no untimed first call per path (full size on a CPU: saves minutes)")
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.mode == "paths":
        run_paths(args)
        return

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

# --------------------------------------------------------------------------- --mode paths
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) between two images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.double() - b.double()) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def bf16_copy(bundle, options):
    """A second bundle sharing ``bundle``'s codec, with a LoRA-merged bf16 generator and a bf16 VAE decoder.

    Built tensor by tensor (the float64 merge of :func:`merge_lora_state_dict`, one layer at a
    time, cast straight to the target dtype) into a generator built on the meta device, so the
    copy never holds a second fp32 UNet: at full size that would be 3.7 GB more.
    """
    import copy

    from onedc.coding.bundle import OneDCCodec
    from onedc.modules.decode_speed import resolve_precision

    dtype = resolve_precision(options.precision, bundle.device)
    generator = bundle.generator
    state = generator.state_dict()
    a_suffix, b_suffix = ".lora_A.default.weight", ".lora_B.default.weight"
    scales = {name: float(module.scaling["default"]) for name, module in generator.named_modules()
              if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {})}
    merged = {}
    for key, value in state.items():
        if key.endswith((a_suffix, b_suffix)):
            continue
        if ".base_layer." in key:
            module, _, leaf = key.rpartition(".base_layer.")
            if leaf == "weight":
                down, up = state[module + a_suffix], state[module + b_suffix]
                delta = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
                value = value.double() + scales[module] * delta.reshape(value.shape)
            key = f"{module}.{leaf}"
        merged[key] = value.to(dtype) if key.startswith("unet.") and value.is_floating_point() else value.clone()
    if scales:
        lora_free = build_like(generator)
        lora_free.load_state_dict(merged, assign=True)
        lora_free.to(bundle.device)  # the derived buffers (ᾱ) were built on the CPU
    else:  # no adapters (the tiny preset): a plain copy, cast by prepare_decoding
        lora_free = copy.deepcopy(generator)
    fast = OneDCCodec.from_modules(copy.deepcopy(bundle.vae), bundle.codec, lora_free, copy_trainable=False)
    fast.family, fast.generator_settings = bundle.family, bundle.generator_settings
    fast._model_id = bundle.model_id  # the same model (merged and cast): its files are the same files
    return fast.prepare_decoding(options)


def build_like(generator):
    """A LoRA-free generator of ``generator``'s architecture on the meta device (weights come by assign)."""
    from onedc.modules.reference.generator import build_reference_generator

    unet_config = {k: v for k, v in dict(generator.unet.config).items() if not k.startswith("_")}
    unet_config["in_channels"] = 4  # the stored config names the replaced conv_in's width
    return build_reference_generator(unet_config=unet_config, gs_channels=generator.gs_channels, lora=False,
                                     device="meta")


def release_freed_memory() -> None:
    """Hand the merge's freed float64 transients back to the OS (glibc keeps them in its arenas otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def set_lora_merged(unet, merged: bool) -> None:
    """peft's in-place merge / unmerge of every LoRA layer (fp32; the fast path merges in float64 instead)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and module.merged != merged:
            module.merge() if merged else module.unmerge()


def set_channels_last(modules, on: bool) -> None:
    """Every module in ``modules`` (and its 4-D weights) to channels-last or back to contiguous, in place."""
    for module in modules:
        module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def run_paths(args: argparse.Namespace) -> None:
    """The fp32 path against each fast decode path, interleaved round by round, with their quality cost."""
    from onedc.coding.decode_options import DecodeOptions
    from onedc.modules.decode_speed import bf16_support

    start = time.perf_counter()
    bundle, what = load_bundle(args.ckpt, args.model, args.device)
    if bundle.generator is None:
        raise SystemExit("--mode paths needs a generator: give a latent/finetune checkpoint or a model preset")
    from onedc.modules.decode_speed import has_lora

    lora = has_lora(bundle.generator.unet)
    original = sample_image(args.size)
    data = bundle.compress_image(original)
    built_s = time.perf_counter() - start
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    reference_parts = [bundle.generator.unet, bundle.vae.autoencoder.decoder]
    bundle.decode_report = {"dtype": "float32"}
    fast = bf16_copy(bundle, DecodeOptions.fast())
    release_freed_memory()
    timers = {id(bundle): StageTimer(sync), id(fast): StageTimer(sync)}
    for b in (bundle, fast):
        timers[id(b)].watch_modules("unet", [b.generator.unet])
        timers[id(b)].watch_method("vae", b.vae, "decode")

    # name -> (bundle, untimed setup that puts the shared fp32 modules in this path's state)
    merged = "LoRA merged + " if lora else ""
    paths: dict[str, tuple[Any, Callable[[], None]]] = {
        f"fp32 path (authors': {'LoRA unmerged, ' if lora else ''}fp32, no compile)":
            (bundle, lambda: (set_lora_merged(bundle.generator.unet, False), set_channels_last(reference_parts, False))),
    }
    if lora:
        paths["+ LoRA merged (fp32)"] = (
            bundle, lambda: (set_lora_merged(bundle.generator.unet, True), set_channels_last(reference_parts, False)))
    paths[f"+ {merged}channels_last (fp32)"] = (
        bundle, lambda: (set_lora_merged(bundle.generator.unet, True), set_channels_last(reference_parts, True)))
    paths[f"default: precision=auto -> {fast.decode_report['dtype']}, {merged}channels_last"] = (fast, lambda: None)
    if args.compile:
        compiled = bf16_copy(bundle, DecodeOptions.fast(compile=True))
        timers[id(compiled)] = StageTimer(sync)
        timers[id(compiled)].watch_method("vae", compiled.vae, "decode")
        paths["default + torch.compile"] = (compiled, lambda: None)

    images: dict[str, torch.Tensor] = {}
    y_hats: dict[str, torch.Tensor] = {}

    def timed(name: str) -> Callable[[], dict[str, float]]:
        owner, setup = paths[name]

        def call() -> dict[str, float]:
            setup()
            result: dict[str, Any] = {}

            def run() -> None:
                result["decoded"] = owner.decompress_bytes(data)
            figures = timers[id(owner)].measure(run)
            if name not in images:  # the first call of each path (the fp32 path's before any merge)
                images[name], y_hats[name] = result["decoded"].image, result["decoded"].y_hat
            return figures
        return call

    warm = None
    if not args.no_warmup:
        def warm() -> None:
            for name in paths:
                timed(name)()
            images.clear()
            y_hats.clear()
    t = interleaved({name: timed(name) for name in paths}, args.repeats, warmup=warm)
    base_name = next(iter(paths))
    base = t[base_name]
    rounds = f"median of {args.repeats} interleaved rounds (by total)" + (
        "; with 2 rounds the faster" if args.repeats == 2 else "")
    print(f"decode paths benchmark: {what}, {args.size}x{args.size} image ({len(data)} bytes), {args.device}, "
          f"{torch.get_num_threads()} thread(s), {rounds}, "
          f"{'no warm-up' if args.no_warmup else 'after one untimed call per path'} (build + encode {built_s:.0f} s)")
    print(f"bf16: {bf16_support(device.type).reason}; native: {bf16_support(device.type).native}")
    print(f"fast path prepared: {fast.decode_report}\n")
    header = (f"{'path':<62} {'total ms':>10} {'UNet ms':>9} {'VAE ms':>9} {'speed-up':>8} "
              f"{'PSNR vs fp32':>12} {'max|diff|':>9} {'dPSNR vs orig':>13} {'y_hat':>6}")
    print(header)
    base_psnr = psnr(images[base_name].cpu(), original)
    for name, figures in t.items():
        image = images[name].cpu()
        same = torch.equal(y_hats[name].cpu(), y_hats[base_name].cpu())
        print(f"{name:<62} {figures['total']:10.1f} {figures.get('unet', 0.0):9.1f} {figures.get('vae', 0.0):9.1f} "
              f"{base['total'] / figures['total']:7.2f}x {psnr(image, images[base_name].cpu()):11.2f} "
              f"{(image - images[base_name].cpu()).abs().max().item():9.2e} "
              f"{psnr(image, original) - base_psnr:+13.4f} {'same' if same else 'DIFF':>6}")
    print(f"\nfp32 path PSNR vs the original image: {base_psnr:.2f} dB (random weights: a meaningless picture; "
          "'PSNR vs fp32' is the fidelity figure)")


if __name__ == "__main__":
    main()
