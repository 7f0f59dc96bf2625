"""Config -> built objects. With ``pipeline.py`` and ``train.py``, the only code that reads configs.

Each ``build_*`` takes a config node and returns a plain module, so that stages, the CLI and the
tests all build models the same way. Stage builders are registered in :data:`STAGE_BUILDERS`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig

from onedc.config import to_dict
from onedc.errors import ConfigError


def _plain(node: DictConfig | dict) -> dict:
    return to_dict(node) if isinstance(node, DictConfig) else dict(node)


def build_vae(model_cfg: DictConfig | dict, device: str | torch.device | None = None):
    """The frozen VAE of ``model.vae`` (a model config node or the dict stored in a checkpoint)."""
    from onedc.modules.vae import build_vae as _build

    vae = _plain(model_cfg["vae"])
    return _build(pretrained=vae.get("pretrained"), config=vae.get("config"), seed=int(vae.get("seed", 0)),
                  scaling_factor=vae.get("scaling_factor"), device=device)


def build_codec(model_cfg: DictConfig | dict, vae_channels: int = 4, device: str | torch.device | None = None):
    """The ``HyperpriorCodec`` of ``model.codec`` (random init; weights come from checkpoints)."""
    from onedc.modules.codec import HyperpriorCodec

    kwargs = _plain(model_cfg["codec"])
    if str(device) == "meta":
        with torch.device("meta"):
            return HyperpriorCodec(vae_channels=vae_channels, **kwargs)
    return HyperpriorCodec(vae_channels=vae_channels, **kwargs)


def teacher_kwargs(tokenizer_cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of ``build_teacher`` from a ``tokenizer=`` config."""
    cfg = to_dict(tokenizer_cfg)
    kwargs: dict[str, Any] = {
        "pretrained": cfg.get("pretrained"),
        "seed": int(cfg.get("seed", 0)),
        "input_scale": float(cfg.get("input_scale", 1.0)),
    }
    for key in ("config", "model_name", "model_kwargs"):
        if cfg.get(key) is not None:
            kwargs[key] = cfg[key]
    return kwargs


def build_teacher(tokenizer_cfg: DictConfig, device: str | torch.device | None = None, allow_random: bool = True):
    """The frozen teacher of ``tokenizer=``."""
    from onedc.modules.teachers import build_teacher as _build

    return _build(str(tokenizer_cfg.kind), device=device, allow_random=allow_random, **teacher_kwargs(tokenizer_cfg))


def build_distill_loss(tokenizer_cfg: DictConfig, model_cfg: DictConfig, teacher) -> Any:
    """The training-only semantic predictor head + loss for ``teacher``."""
    from onedc.modules.distill import SemanticDistillLoss

    head = to_dict(tokenizer_cfg.head)
    kwargs: dict[str, Any] = dict(hidden=int(head.get("hidden", 256)), depth=int(head.get("depth", 2)),
                                  heads=int(head.get("heads", 4)))
    if teacher.kind == "vq":
        kwargs["mse_weight"] = float(head.get("mse_weight", 0.01))
    else:
        kwargs["feature_loss"] = str(head.get("feature_loss", "cosine"))
    return SemanticDistillLoss(int(model_cfg.codec.token_dim), teacher_kind=teacher.kind,
                               target_dim=teacher.target_dim, num_codes=teacher.num_codes, **kwargs)


def build_datamodule(data_cfg: DictConfig, seed: int = 0):
    """The ``ImageFolderDataModule`` of ``data=``."""
    from onedc.datamodules import ImageFolderDataModule

    cfg = to_dict(data_cfg)
    cfg.pop("name", None)
    return ImageFolderDataModule(cfg.pop("root"), seed=seed, **cfg)


def optimizer_spec(stage_cfg: DictConfig):
    """The stage's ``OptimizerSpec`` (AdamW + linear warm-up)."""
    from onedc.stages.common import OptimizerSpec

    return OptimizerSpec(lr=float(stage_cfg.lr), betas=tuple(stage_cfg.betas), weight_decay=float(stage_cfg.weight_decay),
                         warmup_steps=int(stage_cfg.warmup_steps))


def identity(cfg: DictConfig, stage_cfg: DictConfig, teacher=None):
    """What the stage checkpoint records about its model (checked when loading)."""
    from onedc.stages.common import ModelIdentity

    tokenizer = {"name": str(cfg.tokenizer.name)}
    if teacher is not None:
        tokenizer["identity"] = teacher.identity
    return ModelIdentity(model=to_dict(cfg.model), tokenizer=tokenizer, stage=str(stage_cfg.name))


def _build_distill(cfg: DictConfig, stage_cfg: DictConfig):
    from onedc.stages.distill import DistillStage

    vae = build_vae(cfg.model)
    codec = build_codec(cfg.model, vae.latent_channels)
    teacher = build_teacher(cfg.tokenizer)
    distill = build_distill_loss(cfg.tokenizer, cfg.model, teacher)
    return DistillStage(
        vae=vae, codec=codec, teacher=teacher, distill=distill, optimizer=optimizer_spec(stage_cfg),
        identity=identity(cfg, stage_cfg, teacher), lmbda=float(stage_cfg.lmbda),
        lmbda_warmup_steps=int(stage_cfg.lmbda_warmup_steps), distill_weight=float(stage_cfg.distill_weight),
        latent_weight=float(stage_cfg.latent_weight),
    )


STAGE_BUILDERS: dict[str, Callable[[DictConfig, DictConfig], Any]] = {
    "distill": _build_distill,
}


def build_stage(cfg: DictConfig, stage_cfg: DictConfig):
    """The LightningModule of ``stage_cfg.name`` with all its modules built from ``cfg``."""
    name = str(stage_cfg.name)
    if name not in STAGE_BUILDERS:
        raise ConfigError(f"stage '{name}' has no builder; known stages: {', '.join(STAGE_BUILDERS)}")
    return STAGE_BUILDERS[name](cfg, stage_cfg)
