"""Make the packaged weights of the embedded default: ``python -m onedc.assets.make [--out DIR]``.

Trains the tiny VAE of ``model=tiny`` (:mod:`onedc.quicktrain.vae`) and the tiny VQ teacher of
``tokenizer=vq_tiny`` (:mod:`onedc.quicktrain.vq`) on photos bundled with scikit-image (never
the held-out sample photos), and writes ``tiny_vae.safetensors`` and
``vq_tiny_teacher.safetensors`` with their identity in the safetensors metadata. The
architectures and seeds come from those two configs, the recipes from :data:`VAE_RECIPE` and
:data:`TEACHER_RECIPE` below.

Deterministic: seeded, one CPU thread, float32. The same torch build on the same CPU kernel set
gives bit-identical tensors (``tensors_sha256`` in the metadata says so); another kernel set
(AVX2 vs AVX-512, another torch version) rounds differently along the way and ends on other
weights of similar quality (the earlier 600 + 200-step recipe ended 0.3-0.4 dB apart per photo on
AVX2 and AVX-512 kernels; the shipped 4000 + 1200-step one was made once, on AVX-512). Run from a
checkout (it reads ``configs/``); needs scikit-image. Existing files are kept unless ``--force``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from onedc.errors import OneDCError
from onedc.quicktrain.common import QUICK_TRAIN_IMAGES
from onedc.quicktrain.vae import VAEQuickTrainRecipe
from onedc.quicktrain.vq import QuickTrainRecipe

__all__ = ["TEACHER_RECIPE", "VAE_RECIPE", "main", "make_teacher", "make_vae", "tensors_sha256"]

# The shipped tiny VAE's recipe (figures in tests/modules/test_vae_assets.py and the README).
# 4000 + 1200 steps, the joint ones on 4 x 128 px crops, L1 + 20 MSE, the training photos plus
# scikit-image's colour wheel (every hue at every saturation: the photos are warm, and a decoder
# that never saw saturated blue darkened it); 620 s on one AVX-512 core with another job beside
# it: held-out 23.59 / 22.49 dB, mean colour error (decoded - original, 8-bit) R / G / B
# -1.7 / -1.2 / -1.7 and -0.6 / +2.1 / -0.5. Measured on the way there (same code):
# the 2000 + 600-step L1 + 5 MSE recipe on the photos alone 22.24 / 22.00 dB, +5.7 / +1.4 / -7.5
# and +1.9 / +1.6 / -2.6 (the VAE shipped before); + the wheel 22.58 / 22.02 dB; 4000 + 1200
# steps with L1 + 10 MSE 23.43 / 22.20; both 23.52 / 22.53 dB, -1.3 / -2.3 / -1.3 and
# +0.3 / -0.4 / -2.9. Recipe version 2 (plain PCA target, 48 px crops throughout, L1 only, 1600 +
# 400 steps) gave 21.89 / 21.51 dB and -4.7 / +1.9 / -5.9.
VAE_RECIPE = VAEQuickTrainRecipe(guided_steps=4000, joint_steps=1200, batch_size=16, crop=48, lr=5e-3,
                                 pca_symmetric=True, joint_crop=128, joint_batch_size=4, mse_weight=20.0,
                                 images=QUICK_TRAIN_IMAGES + ("color.png",))
# The shipped tiny VQ teacher's recipe (probe figures in tests/modules/test_teachers.py).
TEACHER_RECIPE = QuickTrainRecipe(steps=300, batch_size=128, lr=5e-3)
_DEFAULT_OUT = Path(__file__).resolve().parent


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (sorted by name): the weights' own
    fingerprint, independent of the file's metadata."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _metadata(name: str, cls: str, config: dict, seed: int, recipe: Any, recipe_version: int,
              state: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, str]:
    import diffusers

    import onedc

    values = {"onedc_asset": name, "class": cls, "config": config, "seed": seed, "recipe": asdict(recipe),
              "recipe_version": recipe_version, "tensors_sha256": tensors_sha256(state),
              "onedc_version": onedc.__version__, "torch_version": torch.__version__,
              "diffusers_version": diffusers.__version__, "made_by": "python -m onedc.assets.make", **extra}
    return {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in values.items()}


def _write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    from onedc.io import atomic_write_bytes

    return atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))


def make_vae(path: Path, recipe: VAEQuickTrainRecipe | None = None) -> dict[str, Any]:
    """Train ``model=tiny``'s AutoencoderKL with ``recipe`` (default :data:`VAE_RECIPE`) and write it
    to ``path``; returns its held-out figures and the scaling factor its latents need."""
    from diffusers import AutoencoderKL

    from onedc.training.config import compose, to_dict
    from onedc.quicktrain.vae import RECIPE_VERSION, held_out_figures, latent_std, quick_train_vae

    recipe = recipe or VAE_RECIPE
    vae = to_dict(compose(["model=tiny"]).model)["vae"]
    config, seed = dict(vae["config"]), int(vae["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(**config)
    quick_train_vae(model, recipe, seed=seed)
    state = model.state_dict()
    _write(path, state, _metadata("tiny_vae", "diffusers.AutoencoderKL", config, seed, recipe, RECIPE_VERSION,
                                  state, {}))
    return {"held_out": held_out_figures(model), "scaling_factor": 1.0 / latent_std(model)}


def make_teacher(path: Path, recipe: QuickTrainRecipe | None = None) -> dict[str, Any]:
    """Train ``tokenizer=vq_tiny``'s VQModel with ``recipe`` (default :data:`TEACHER_RECIPE`) and write
    it to ``path``; returns its codebook size."""
    from diffusers import VQModel

    from onedc.training.config import compose, to_dict
    from onedc.modules.teachers import _build_random
    from onedc.quicktrain.vq import RECIPE_VERSION, quick_train_vq

    recipe = recipe or TEACHER_RECIPE
    tok = to_dict(compose(["tokenizer=vq_tiny"]).tokenizer)
    config, seed = dict(tok["config"]), int(tok["seed"])
    protocol = {"input_scale": float(tok["input_scale"]), "tile_size": tok.get("tile_size"),
                "input_range": tok.get("input_range"), "resize": str(tok.get("resize"))}
    model = _build_random(lambda: VQModel(**config), seed, meta=False)
    quick_train_vq(model, recipe, seed=seed, **protocol)
    state = model.state_dict()
    _write(path, state, _metadata("vq_tiny_teacher", "diffusers.VQModel", config, seed, recipe, RECIPE_VERSION,
                                  state, {"protocol": protocol}))
    return {"codes": int(model.quantize.n_e)}


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 with one ``error:`` line on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m onedc.assets.make", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT,
                        help="folder to write the .safetensors files to (default: the installed onedc/assets/)")
    parser.add_argument("--only", choices=("tiny_vae", "vq_tiny_teacher"), help="make one of the two")
    parser.add_argument("--force", action="store_true", help="replace files that exist")
    args = parser.parse_args(argv)
    makers = {"tiny_vae": make_vae, "vq_tiny_teacher": make_teacher}
    names = [args.only] if args.only else list(makers)
    try:
        for name in names:
            path = args.out / f"{name}.safetensors"
            if path.exists() and not args.force:
                raise OneDCError(f"{path} exists: pass --force to replace it, or --out DIR to write elsewhere")
        for name in names:
            path = args.out / f"{name}.safetensors"
            start = time.perf_counter()
            figures = makers[name](path)
            from onedc.assets import asset_metadata

            meta = asset_metadata(path)
            print(f"{path}: {path.stat().st_size / 1e6:.2f} MB in {time.perf_counter() - start:.0f} s, "
                  f"tensors_sha256 {meta['tensors_sha256'][:16]}, {json.dumps(figures)}", flush=True)
    except OneDCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
