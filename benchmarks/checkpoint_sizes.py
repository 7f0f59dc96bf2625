"""Checkpoint sizes, whole vs trainable-only (trainer.trainable_only_checkpoints), issue 21.

Two tables:

* ``--full`` (default on): the published model (``model=onedc_sd15``) at full size, each stage built on the
  meta device (no weights allocated; the distill teacher, which is never saved, on the CPU) and counted:
  tensor bytes of the state dict, AdamW's two moments per trained parameter, the EMA copy of the raw
  weights where the stage has one (stage default), for ``last.ckpt`` (training state) and ``final.ckpt``
  (weights). The frozen parts a file holds are decided by the pipeline's own rule
  (:func:`onedc.training.pipeline.frozen_sources`) under the paper's recipe: distill from the SD-2.1 VAE
  dir and DMD2's UNet (model.vae.pretrained, model.generator.pretrained), later stages ``init_from`` the
  stage before (or an imported release), dmd's real score UNet from SD-1.5 (guidance.real_pretrained).
  Serialisation overhead (key names, pickle) is not counted: it is under 1 MB.
* ``--tiny`` (default on): real file sizes of a short ``stage=all`` chain (+ dmd) of the embedded default
  (``model=tiny``), once with whole checkpoints and once trainable-only.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/checkpoint_sizes.py
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("distill", "latent", "finetune", "dmd")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def full_size_table() -> list[str]:
    from omegaconf import open_dict

    from onedc.stages.common import frozen_parts
    from onedc.training import build, pipeline
    from onedc.training.config import compose

    original_teacher = build.teacher_from_config

    def cpu_teacher(*args, **kwargs):  # the teacher is not a submodule: never saved, only built
        with torch.device("cpu"):
            return original_teacher(*args, **kwargs)

    build.teacher_from_config = cpu_teacher
    rows = ["| stage | trains | frozen left out (source) | frozen kept | `last.ckpt` whole → trainable-only | "
            "`final.ckpt` whole → trainable-only |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        source_dir = Path(tmp) / "pretrained"
        source_dir.mkdir()
        init_file = Path(tmp) / "previous-stage.ckpt"
        init_file.write_bytes(b"")
        for stage in STAGES:
            overrides = ["model=onedc_sd15", f"stage={stage}", "trainer.logger=none"]
            overrides += {"distill": ["tokenizer=maskgit_vqgan"], "finetune": ["stage.lpips_weight=0"],
                          "dmd": ["stage.lpips_weight=0", "guidance=sd15"]}.get(stage, [])
            cfg = compose(overrides)
            with torch.device("meta"):
                module = build.build_stage(cfg, cfg.stage)
            # The recipe's sources, set after building (building would read them).
            with open_dict(cfg):
                if stage == "distill":
                    cfg.model.vae.pretrained = str(source_dir)
                    cfg.model.generator.pretrained = str(source_dir)
                if stage == "dmd":
                    cfg.guidance.real_pretrained = str(source_dir)
            init = None if stage == "distill" else init_file
            prefixes = module.family.init_prefixes(dict(cfg.model))
            loaded = [k for k in module.state_dict() if init is not None and k.startswith(prefixes)]
            sources = pipeline.frozen_sources(module, cfg, init, loaded)
            params = dict(module.named_parameters())
            state = module.state_dict()
            trained = [p for p in params.values() if p.requires_grad]
            optimizer = 2 * _bytes(trained) + 4 * len(trained)  # AdamW exp_avg, exp_avg_sq (+ the step scalar)
            ema = 0
            if cfg.stage.get("ema_decay") is not None:
                ema = _bytes(p for k, p in params.items() if p.requires_grad and k.startswith("generator."))
            frozen = frozen_parts(module)
            out = {part: _bytes(params[k] for k in keys) for part, keys in frozen.items() if part in sources}
            kept = {part: _bytes(params[k] for k in keys) for part, keys in frozen.items() if part not in sources}
            whole = _bytes(state.values())
            slim = whole - sum(out.values())
            kinds = {part: sources[part].partition(":")[0] for part in out}
            rows.append(
                f"| {stage} | {sum(p.numel() for p in trained) / 1e6:.1f} M params | "
                + ", ".join(f"{part} {n / 1e9:.2f} GB ({kinds[part]})" for part, n in out.items()) + " | "
                + (", ".join(f"{part} {n / 1e9:.2f} GB" for part, n in kept.items()) or "none") + " | "
                + f"{_gb(whole + optimizer + ema)} → {_gb(slim + optimizer + ema)} | {_gb(whole)} → {_gb(slim)} |")
            del module
    build.teacher_from_config = original_teacher
    return rows


def tiny_table() -> list[str]:
    from onedc.training import pipeline
    from onedc.training.config import compose

    fast = ["model=tiny", "trainer.logger=none", "trainer.enable_progress_bar=false", "data.crop_size=128",
            "data.val_crop_size=128", "trainer.max_steps=2"]
    per_stage = ["stage.val_every_n_steps=2", "stage.checkpoint_every_n_steps=2", "stage.image_every_n_steps=null"]
    sizes: dict[tuple[str, bool], tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for slim in (False, True):
            run_dir = Path(tmp) / ("slim" if slim else "whole")
            flag = f"trainer.trainable_only_checkpoints={str(slim).lower()}"
            init = None
            for stage in STAGES:
                extra = [f"init_from={init}"] if init is not None else []
                extra += ["stage.lpips.random_backbone=true"] if stage in ("finetune", "dmd") else []
                overrides = [f"stage={stage}", f"run_dir={run_dir}", flag, *fast, *per_stage, *extra]
                if stage == "distill":
                    overrides.remove("stage.image_every_n_steps=null")
                result = pipeline.run(compose(overrides))[0]
                sizes[stage, slim] = ((result.run_dir / "checkpoints" / "last.ckpt").stat().st_size,
                                      result.final_ckpt.stat().st_size)
                if stage in ("distill", "latent"):
                    init = result.final_ckpt  # dmd starts from latent, as the README's command
    rows = ["| stage (model=tiny) | `last.ckpt` whole → trainable-only | `final.ckpt` whole → trainable-only |",
            "|---|---|---|"]
    for stage in STAGES:
        (lw, fw), (ls, fs) = sizes[stage, False], sizes[stage, True]
        rows.append(f"| {stage} | {lw / 1e6:.2f} MB → {ls / 1e6:.2f} MB | {fw / 1e6:.2f} MB → {fs / 1e6:.2f} MB |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-full", dest="full", action="store_false", help="skip the full-size meta-device table")
    parser.add_argument("--no-tiny", dest="tiny", action="store_false", help="skip the tiny preset's real run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.full:
        start = time.perf_counter()
        print("\n".join(full_size_table()))
        print(f"(full size on the meta device: {time.perf_counter() - start:.0f} s)\n")
    if args.tiny:
        start = time.perf_counter()
        print("\n".join(tiny_table()))
        print(f"(tiny chain, twice: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
