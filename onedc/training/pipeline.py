"""The stage orchestrator: trainers, run dirs, resume, and the distill -> latent -> finetune chain.

Run-dir layout (deterministic, so every DDP rank and every re-run agree)::

    <run_dir>/<stage>/config.yaml           the fully resolved config of this stage
    <run_dir>/<stage>/checkpoints/last.ckpt  training state (resume=auto picks it up)
    <run_dir>/<stage>/checkpoints/step=*.ckpt the two newest periodic checkpoints (fallbacks)
    <run_dir>/<stage>/checkpoints/best.ckpt  best validation loss
    <run_dir>/<stage>/final.ckpt             weights at the end (EMA where the stage has one)

Every checkpoint is trainable-only by default (``trainer.trainable_only_checkpoints``): the frozen
parts a file holds (the ``init_from`` file, pretrained VAE/UNet files, shipped assets) are named by
identity and read back from there (:func:`onedc.coding.checkpoints.fill_frozen`).
    <run_dir>/<stage>/DONE.json              completion marker: a finished stage is skipped
    <run_dir>/<stage>/val_history.json       validation metrics per run (step 0 = before training)
    <run_dir>/<stage>/tb/                    TensorBoard events

``init_from`` (weights only, fresh optimiser) and ``resume`` (full state) are distinct: the
chain initialises each stage from the previous stage's ``final.ckpt``, and a killed stage is
resumed from its own ``last.ckpt``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from onedc.coding.checkpoints import read_checkpoint, read_full_checkpoint
from onedc.errors import CheckpointError, ConfigError
from onedc.io import atomic_write_text
from onedc.training.config import to_dict

log = logging.getLogger("onedc")

DONE_MARKER = "DONE.json"
FINAL_CKPT = "final.ckpt"


@dataclass(frozen=True)
class StageResult:
    """Where a stage's outputs are and how far it trained."""

    name: str
    run_dir: Path
    final_ckpt: Path
    global_step: int
    skipped: bool = False


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


# --------------------------------------------------------------------------- checkpoints
# Reading checkpoint files lives in onedc.coding.checkpoints (read_checkpoint and newest_fallback stay
# importable from here).


def check_identity(checkpoint: dict[str, Any], cfg: DictConfig, path: Path, compare_tokenizer: bool) -> None:
    """Refuse a checkpoint trained with a different model (VAE/codec) or teacher than ``cfg``."""
    meta = checkpoint.get("onedc")
    if meta is None:
        raise CheckpointError(f"{path} is not an onedc stage checkpoint (no 'onedc' metadata)")
    want = OmegaConf.to_container(cfg.model, resolve=True)
    have = meta["model"]
    # The generator's config matters only once a stage has trained it (stage 1 leaves it unbuilt).
    parts = ("vae", "codec", "generator") if meta.get("stage") in ("latent", "finetune", "dmd") else ("vae", "codec")
    for part in parts:
        if part not in have or part not in want:
            continue
        # Where the generator's initial weights came from no longer matters once it is trained.
        # The VAE's weights identity is not a config value (load_init_weights compares it).
        ignore = {"pretrained", "seed", "gradient_checkpointing"} if part == "generator" else {"identity"}
        diff = sorted(k for k in set(have[part]) | set(want[part])
                      if k not in ignore and have[part].get(k) != want[part].get(k))
        if diff:
            raise CheckpointError(
                f"{path} was trained with a different model.{part} (differs in: {', '.join(diff)}). "
                f"Use the same model config it was trained with (its stage config.yaml) or start the stage fresh"
            )
    if compare_tokenizer and meta.get("tokenizer", {}).get("name") not in (None, str(cfg.tokenizer.name)):
        raise CheckpointError(
            f"{path} was trained with tokenizer={meta['tokenizer']['name']} but the config asks for "
            f"tokenizer={cfg.tokenizer.name}. Pass the same tokenizer to resume"
        )


def start_fresh_generator(module: torch.nn.Module, cfg: DictConfig, loaded: list[str]) -> bool:
    """Apply ``model.generator.init`` to a generator that ``init_from`` did not fill; True if applied.

    ``residual``: the generator starts from the codec's light latent reconstruction
    (:meth:`onedc.modules.generator.OneStepGenerator.start_from_latent_head`), which the codec
    weights just loaded from the distill stage define. ``null`` (the default) keeps the drawn or
    pretrained UNet untouched: a pretrained ε-UNet must keep its output layer. Resumed runs never
    get here (their weights come from the checkpoint).
    """
    mode = (cfg.model.get("generator") or {}).get("init")
    generator = getattr(module, "generator", None)
    if mode is None or generator is None or any(k.startswith("generator.") for k in loaded):
        return False
    try:
        module.family.start_generator(generator, module.codec, str(mode))
    except ValueError as err:
        raise ConfigError(f"model.generator.init={mode} (model={cfg.model.name}): {err}") from None
    log.info("generator starts by model.generator.init=%s", mode)
    return True


def load_init_weights(module: torch.nn.Module, path: str | Path, cfg: DictConfig,
                      prefixes: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Initialise ``module``'s parts named by ``prefixes`` from a checkpoint (weights only).

    ``prefixes`` defaults to the family's ``init_prefixes`` (codec and generator; the published
    model adds the VAE, which its preset names no dir for and its checkpoints carry). Keys are matched by name; missing and unexpected
    keys are reported by name (log + return), never ignored silently. Shape mismatches mean a
    different model config: CheckpointError.
    """
    family = module.family
    if prefixes is None:
        prefixes = family.init_prefixes(to_dict(cfg.model))
    path = Path(path)
    checkpoint = read_full_checkpoint(path)  # a trainable-only file's frozen parts read back from their sources
    check_identity(checkpoint, cfg, path, compare_tokenizer=False)
    recorded = (checkpoint["onedc"]["model"].get("vae") or {}).get("identity")
    built = getattr(getattr(module, "vae", None), "identity", "")
    if recorded and built and recorded != built:
        raise CheckpointError(f"{path} was trained on the VAE {recorded} but this run built {built} (other "
                              "weights in model.vae.pretrained): its codec expects that VAE's latents. Use the "
                              "VAE it was trained with, or start again from stage=distill")
    state = checkpoint["state_dict"]
    wanted = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if "codec" in module._modules:
        family.fit_init_state(module.codec, "codec.", wanted)  # e.g. CDF tables, sized by update()
    own = module.state_dict()
    present_prefixes = {k.split(".", 1)[0] + "." for k in wanted}
    expected = {k for k in own if k.startswith(tuple(present_prefixes))}
    missing = sorted(expected - set(wanted))
    unexpected = sorted(k for k in wanted if k not in own)
    for key in sorted(set(wanted) & set(own)):
        if wanted[key].shape != own[key].shape:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(wanted[key].shape)}, the model expects "
                                  f"{tuple(own[key].shape)}: the checkpoint is from a different model config")
    loadable = {k: v for k, v in wanted.items() if k in own}
    module.load_state_dict(loadable, strict=False)
    if missing:
        log.warning("init_from %s: %d missing keys (left as initialised): %s", path, len(missing), ", ".join(missing[:20]))
    if unexpected:
        log.warning("init_from %s: %d unexpected keys (ignored): %s", path, len(unexpected), ", ".join(unexpected[:20]))
    log.info("initialised %s from %s (%d tensors)", "/".join(sorted(present_prefixes)), path, len(loadable))
    return {"missing": missing, "unexpected": unexpected, "loaded": sorted(loadable)}


# --------------------------------------------------------------------------- trainer
def _world_size(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.devices
    if isinstance(devices, int):
        per_node = devices
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    elif str(devices) == "auto":
        per_node = max(1, torch.cuda.device_count()) if trainer_cfg.accelerator != "cpu" else 1
    else:
        per_node = len(devices)
    return per_node * int(trainer_cfg.num_nodes)


def accumulation(trainer_cfg: DictConfig, batch_size: int) -> int:
    """Gradient accumulation that keeps ``trainer.global_batch_size`` fixed across world sizes."""
    if trainer_cfg.get("global_batch_size") is None:
        return int(trainer_cfg.accumulate_grad_batches)
    per_step = batch_size * _world_size(trainer_cfg)
    if int(trainer_cfg.global_batch_size) % per_step:
        raise ConfigError(f"trainer.global_batch_size={trainer_cfg.global_batch_size} is not a multiple of "
                          f"data.batch_size x world size = {per_step}")
    return max(1, int(trainer_cfg.global_batch_size) // per_step)


def make_strategy(trainer_cfg: DictConfig) -> Any:
    """Lightning strategy object (or name) for ``trainer.strategy``."""
    name = str(trainer_cfg.strategy)
    if name.startswith("deepspeed_stage_"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=int(name[-1]), offload_optimizer=bool(trainer_cfg.get("offload_optimizer", False)),
                                 offload_parameters=bool(trainer_cfg.get("offload_parameters", False)))
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return name


def make_trainer(cfg: DictConfig, stage_cfg: DictConfig, stage_dir: Path, strategy: Any = None,
                 extra_callbacks: list | None = None, module: Any = None):
    """A Lightning ``Trainer`` for one stage, writing only under ``stage_dir``.

    Its callbacks are the one ordered list of :func:`onedc.callbacks.training_callbacks`, with
    ``module.stage_callbacks()`` (EMA, image grids) in their checked place.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from onedc.callbacks import AtomicCheckpointIO, training_callbacks

    tcfg = cfg.trainer
    ckpt_dir = stage_dir / "checkpoints"
    every = int(stage_cfg.checkpoint_every_n_steps)
    checkpoints = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step={step:06d}", auto_insert_metric_name=False,
                        monitor="step", mode="max", save_top_k=2, every_n_train_steps=every, save_last=True),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        auto_insert_metric_name=False),
    ]
    logger: Any = False
    tensorboard = str(tcfg.logger) == "tensorboard"
    if tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(stage_dir), name="tb", version="", default_hp_metric=False)
    callbacks = training_callbacks(module.stage_callbacks() if module is not None else [], checkpoints=checkpoints,
                                   tensorboard=tensorboard, rd_eval_images=int(stage_cfg.get("rd_eval_images", 4)),
                                   extra=list(extra_callbacks or []))
    max_steps = int(tcfg.max_steps) if tcfg.get("max_steps") is not None else int(stage_cfg.max_steps)
    return pl.Trainer(
        default_root_dir=str(stage_dir),
        accelerator=str(tcfg.accelerator), devices=tcfg.devices, num_nodes=int(tcfg.num_nodes),
        strategy=strategy if strategy is not None else make_strategy(tcfg),
        precision=str(tcfg.precision), max_steps=max_steps, max_epochs=-1,
        val_check_interval=min(int(stage_cfg.val_every_n_steps), max_steps), check_val_every_n_epoch=None,
        log_every_n_steps=int(stage_cfg.log_every_n_steps), gradient_clip_val=stage_cfg.get("grad_clip"),
        accumulate_grad_batches=accumulation(tcfg, int(cfg.data.batch_size)),
        deterministic=bool(tcfg.deterministic), enable_progress_bar=bool(tcfg.enable_progress_bar),
        logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        # The sanity pass doubles as the step-0 validation of the summary (first -> last).
        num_sanity_val_steps=int(stage_cfg.get("sanity_val_batches", 2)),
        enable_model_summary=_rank() == 0,
        use_distributed_sampler=False,  # the datamodule shards and resumes its own sampler
    )


# --------------------------------------------------------------------------- stages
def stage_dir(cfg: DictConfig, name: str) -> Path:
    """The deterministic directory of stage ``name`` of this run."""
    return Path(str(cfg.run_dir)) / name


def _resume_path(cfg: DictConfig, sdir: Path) -> Path | None:
    resume = str(cfg.resume)
    last = sdir / "checkpoints" / "last.ckpt"
    if resume == "auto":
        return last if last.exists() else None
    if resume == "never":
        if any(sdir.glob("checkpoints/*.ckpt")) and not cfg.overwrite:
            raise ConfigError(f"{sdir} already holds a run and resume=never: pass overwrite=true to delete it "
                              "and start again, or resume=auto to continue it")
        return None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume={resume}: no such checkpoint")
    return path


def run_stage(cfg: DictConfig, stage_cfg: DictConfig, init_from: str | Path | None = None,
              strategy: Any = None) -> StageResult:
    """Train one stage to ``max_steps``: fresh, initialised from ``init_from``, or resumed."""
    import lightning.pytorch as pl

    from onedc.training.build import build_datamodule, build_stage

    name = str(stage_cfg.name)
    sdir = stage_dir(cfg, name)
    if init_from is not None and str(cfg.resume) not in ("auto", "never"):
        raise ConfigError("init_from (weights only) and an explicit resume=PATH (full state) are mutually "
                          "exclusive: drop one of them")
    done = sdir / DONE_MARKER
    if cfg.overwrite and _rank() == 0 and sdir.exists():
        log.warning("overwrite=true: deleting %s", sdir)
        shutil.rmtree(sdir)
    elif done.exists() and str(cfg.resume) != "never":
        info = json.loads(done.read_text())
        log.info("stage %s already finished at step %s (%s): skipping", name, info["global_step"], done)
        return StageResult(name, sdir, sdir / FINAL_CKPT, int(info["global_step"]), skipped=True)
    resume = None if cfg.overwrite else _resume_path(cfg, sdir)
    if resume is not None:
        check_identity(read_checkpoint(resume), cfg, resume, compare_tokenizer=(name == "distill"))

    # Frozen parts (VAE, codec in stages 2-3, the teacher) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
        # Lightning's DDP/DeepSpeed set torch's thread count from the core count unless this is set.
        os.environ.setdefault("OMP_NUM_THREADS", str(int(cfg.trainer.num_threads)))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = build_stage(cfg, stage_cfg)
    if resume is None:
        loaded = load_init_weights(module, init_from, cfg)["loaded"] if init_from is not None else []
        fresh = start_fresh_generator(module, cfg, loaded)
        module.set_frozen_sources(frozen_sources(module, cfg, init_from, loaded, fresh_generator=fresh))
    else:
        restore_frozen_sources(module, read_checkpoint(resume), cfg, resume)
    datamodule = build_datamodule(cfg.data, seed=int(cfg.seed))
    if _rank() == 0:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["stage"] = OmegaConf.to_container(stage_cfg, resolve=True)
        atomic_write_text(sdir / "config.yaml", OmegaConf.to_yaml(resolved))
    trainer = make_trainer(cfg, stage_cfg, sdir, strategy=strategy, module=module)
    module.trainable_only = trainable_only(cfg, trainer)
    if resume is not None:
        log.info("resuming stage %s from %s", name, resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    final = sdir / FINAL_CKPT
    trainer.save_checkpoint(final, weights_only=True)
    if trainer.is_global_zero:
        atomic_write_text(sdir / "val_history.json", json.dumps(module.val_history, indent=1))
        atomic_write_text(done, json.dumps({"stage": name, "global_step": trainer.global_step,
                                            "final": FINAL_CKPT}, indent=2))
    return StageResult(name, sdir, final, int(trainer.global_step))


def trainable_only(cfg: DictConfig, trainer: Any) -> bool:
    """Whether this stage writes trainable-only checkpoints: ``trainer.trainable_only_checkpoints`` (default
    true), except under DeepSpeed, whose checkpoint folders hold every parameter of the engine."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    wanted = bool(cfg.trainer.get("trainable_only_checkpoints", True))
    return wanted and not isinstance(trainer.strategy, DeepSpeedStrategy)


def file_source(value: Any) -> str | None:
    """The location of a weights source named in a config, if a file holds it: ``asset:NAME`` (shipped with
    onedc) or an existing local path, made absolute; None for null or anything else (a hub id)."""
    if value is None:
        return None
    text = str(value)
    if text.startswith("asset:"):
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else None


def frozen_sources(module: torch.nn.Module, cfg: DictConfig, init_from: str | Path | None, loaded: list[str],
                   fresh_generator: bool = False) -> dict[str, str]:
    """Part -> ``KIND:LOCATION`` for each frozen part of a freshly started stage whose weights a file holds.

    A part comes from ``init_from`` when that file filled every one of its frozen parameters; else from
    the pretrained source its config names (``model.vae.pretrained``, ``model.generator.pretrained``
    unless ``model.generator.init`` just rewrote the generator, ``guidance.pretrained`` or
    ``guidance.real_pretrained`` for the real score UNet). A part drawn from a seed has no source:
    checkpoints keep it, since redrawing it bit for bit would hang on the RNG's order.
    """
    from onedc.stages.common import frozen_parts

    done = set(loaded)
    init = f"init_from:{Path(str(init_from)).resolve()}" if init_from is not None else None
    model = cfg.model
    guidance = cfg.get("guidance") or {}
    named: dict[str, tuple[str, Any]] = {
        "vae": ("model.vae.pretrained", (model.get("vae") or {}).get("pretrained")),
        "generator": ("model.generator.pretrained",
                      None if fresh_generator else (model.get("generator") or {}).get("pretrained")),
    }
    if guidance.get("pretrained") is not None:
        named["guidance"] = ("guidance.pretrained", guidance.get("pretrained"))
    else:
        named["guidance"] = ("guidance.real_pretrained", guidance.get("real_pretrained"))
    sources: dict[str, str] = {}
    for part, keys in frozen_parts(module).items():
        if init is not None and all(k in done for k in keys):
            sources[part] = init
            continue
        kind, value = named.get(part, ("", None))
        if kind == "guidance.real_pretrained" and not all(k.startswith("guidance.real_unet.") for k in keys):
            continue
        location = file_source(value)
        if location is not None:
            sources[part] = f"{kind}:{location}"
    return sources


def restore_frozen_sources(module: torch.nn.Module, checkpoint: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Before resuming from a trainable-only checkpoint, reload its frozen parts from their sources.

    Parts built from the config (pretrained dirs and files, shipped assets) are already rebuilt; parts
    that came from an ``init_from`` file are read from it again. The module's ``on_load_checkpoint``
    then checks every frozen part's hash against the one recorded (:meth:`StageModule.restore_frozen`).
    """
    frozen = (checkpoint.get("onedc") or {}).get("frozen") or {}
    sources = {part: info["source"] for part, info in frozen.items()}
    module.set_frozen_sources(sources)
    files = sorted({s.partition(":")[2] for s in sources.values() if s.startswith("init_from:")})
    for file in files:
        if not Path(file).exists():
            parts = ", ".join(p for p, s in sources.items() if s == f"init_from:{file}")
            raise CheckpointError(f"{path} stores only trained weights; its frozen part(s) {parts} come from "
                                  f"{file}, which is missing: restore that file (or start the stage again)")
        load_init_weights(module, file, cfg)


def preflight(cfg: DictConfig, stages: list[DictConfig]) -> None:
    """Fail before any training if a later stage's weights are missing (not hours into the chain)."""
    from onedc.training.build import build_perceptual_loss

    for stage_cfg in stages:
        if str(stage_cfg.name) in ("finetune", "dmd") and float(stage_cfg.lpips_weight) > 0:
            build_perceptual_loss(stage_cfg.lpips)  # WeightsError naming the file and where it goes


def run(cfg: DictConfig) -> list[StageResult]:
    """Run ``cfg.stage``: one stage, or the whole chain when ``stage=all``."""
    if str(cfg.stage.name) != "all":
        return [run_stage(cfg, cfg.stage, init_from=cfg.init_from)]
    preflight(cfg, [cfg.stage[name] for name in cfg.stage.chain])
    results: list[StageResult] = []
    init_from = cfg.init_from
    for name in cfg.stage.chain:
        result = run_stage(cfg, cfg.stage[name], init_from=init_from)
        results.append(result)
        init_from = result.final_ckpt
    if cfg.stage.get("report", False) and _rank() == 0:
        report(cfg, results)
    return results


def report(cfg: DictConfig, results: list[StageResult]) -> Path | None:
    """Write ``<run_dir>/report/`` for the chain's final checkpoints on the validation photos."""
    from onedc.training.build import build_datamodule
    from onedc.training.report import write_report

    data = build_datamodule(cfg.data, seed=int(cfg.seed))
    data.setup()
    if data.val_set is None:
        log.info("no validation photos (data.val_names / val_root / val_fraction): no report")
        return None
    out = Path(str(cfg.run_dir)) / "report"
    write_report({r.name: r.final_ckpt for r in results}, list(data.val_set.files), out,
                 say=lambda text: log.info("%s", text))
    log.info("report: %s (rd.png, reconstructions.png, report.json)", out)
    return out
