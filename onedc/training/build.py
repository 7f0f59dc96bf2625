"""Config -> built objects. With ``pipeline.py`` and ``train.py``, the only code that reads configs.

Each ``build_*`` takes a config node and returns a plain module, so that stages, the CLI and the
tests all build models the same way. Stage builders are registered in :data:`STAGE_BUILDERS`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig

from onedc.training.config import to_dict
from onedc.errors import ConfigError
from onedc.families import ModelFamily, family_of


def _plain(node: DictConfig | dict) -> dict:
    return to_dict(node) if isinstance(node, DictConfig) else dict(node)


def family(model_cfg: DictConfig | dict) -> ModelFamily:
    """The model family of ``model=`` (``model.family``: light or reference)."""
    return family_of(_plain(model_cfg))


def vae_from_config(model_cfg: DictConfig | dict, device: str | torch.device | None = None):
    """The frozen VAE of ``model.vae`` (a model config node or the dict stored in a checkpoint).

    Its weights are loaded (``model.vae.pretrained``: a dir, a file or a packaged ``asset:NAME``)
    or drawn from the seed; building never trains anything.
    """
    return family(model_cfg).build_vae(_plain(model_cfg), device=device)


def codec_from_config(model_cfg: DictConfig | dict, vae_channels: int = 4):
    """The codec of ``model.codec`` (random init; weights come from checkpoints), built by its family."""
    return family(model_cfg).build_codec(_plain(model_cfg), vae_channels)


def generator_from_config(model_cfg: DictConfig | dict, device: str | torch.device | None = None):
    """The one-step generator of ``model.generator``, built by its family.

    For the light family its conv_in input and cross-attention width come from ``model.codec``
    (gs_channels, token_dim); see :func:`onedc.families.light.generator_kwargs`.
    """
    return family(model_cfg).build_generator(_plain(model_cfg), device=device)


def teacher_kwargs(tokenizer_cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`onedc.modules.teachers.build_teacher` from a ``tokenizer=`` config."""
    cfg = to_dict(tokenizer_cfg)
    kwargs: dict[str, Any] = {
        "pretrained": cfg.get("pretrained"),
        "seed": int(cfg.get("seed", 0)),
        "input_scale": float(cfg.get("input_scale", 1.0)),
    }
    for key in ("config", "model_name", "model_kwargs", "tile_size", "input_range", "resize"):
        if cfg.get(key) is not None:
            kwargs[key] = cfg[key]
    return kwargs


def teacher_from_config(tokenizer_cfg: DictConfig, device: str | torch.device | None = None, allow_random: bool = True):
    """The frozen teacher of ``tokenizer=``."""
    from onedc.modules.teachers import build_teacher as _build

    return _build(str(tokenizer_cfg.kind), device=device, allow_random=allow_random, **teacher_kwargs(tokenizer_cfg))


def build_distill_loss(tokenizer_cfg: DictConfig, model_cfg: DictConfig, teacher, in_channels: int | None = None) -> Any:
    """The training-only semantic predictor head + loss for ``teacher``.

    The head reads the codec's semantic map: ``in_channels`` wide (default ``model.codec.token_dim``,
    the light codec's; :func:`_build_distill` passes the built codec's width).
    """
    from onedc.modules.distill import SemanticDistillLoss

    head = to_dict(tokenizer_cfg.head)
    kwargs: dict[str, Any] = dict(hidden=int(head.get("hidden", 256)), depth=int(head.get("depth", 2)),
                                  heads=int(head.get("heads", 4)), head_type=str(head.get("type", "transformer")),
                                  loss_weight=float(head.get("loss_weight", 1.0)))
    if "window" in head:
        kwargs["window"] = int(head["window"])
    if teacher.kind == "vq":
        kwargs["mse_weight"] = float(head.get("mse_weight", 0.01))
    else:
        kwargs["feature_loss"] = str(head.get("feature_loss", "cosine"))
    width = int(model_cfg.codec.token_dim) if in_channels is None else int(in_channels)
    return SemanticDistillLoss(width, teacher_kind=teacher.kind,
                               target_dim=teacher.target_dim, num_codes=teacher.num_codes, **kwargs)


def build_datamodule(data_cfg: DictConfig, seed: int = 0):
    """The data module of ``data=``: ``SourceDataModule`` when the config names a ``source``, else ``ImageFolderDataModule``."""
    cfg = to_dict(data_cfg)
    cfg.pop("name", None)
    if cfg.get("source"):
        from onedc.datamodules.source_data import SourceDataModule

        return SourceDataModule(cfg.pop("source"), seed=seed, **cfg)
    from onedc.datamodules import ImageFolderDataModule

    cfg.pop("protocol", None)
    if str(cfg.pop("crop_protocol", "plain")) != "plain":
        raise ConfigError(f"data={data_cfg.get('name')} (ImageFolderDataModule) has no per-batch crop protocol: read the "
                          "folder with data=captioned_folder data.root=DIR (the source loader, which has it), or set "
                          "data.crop_protocol=plain")
    return ImageFolderDataModule(cfg.pop("root"), seed=seed, **cfg)


def optimizer_spec(stage_cfg: DictConfig, prefix: str = ""):
    """The stage's ``OptimizerSpec`` (AdamW + linear warm-up) from ``{prefix}lr``, ``{prefix}betas``, ... and
    ``warmup_start`` (one for all of a stage's groups: ``first`` | ``zero``, see :func:`onedc.stages.common.warmup_factor`)."""
    from onedc.stages.common import OptimizerSpec

    return OptimizerSpec(lr=float(stage_cfg[f"{prefix}lr"]), betas=tuple(stage_cfg[f"{prefix}betas"]),
                         weight_decay=float(stage_cfg[f"{prefix}weight_decay"]),
                         warmup_steps=int(stage_cfg[f"{prefix}warmup_steps"]),
                         warmup_start=str(stage_cfg.get("warmup_start", "first")))


def identity(cfg: DictConfig, stage_cfg: DictConfig, teacher=None, vae=None):
    """What the stage checkpoint records about its model (checked when loading).

    The VAE's weights identity goes to ``model.vae.identity``: the config alone does not say
    which weights a pretrained dir or file held.
    """
    from onedc.stages.common import ModelIdentity

    tokenizer = {"name": str(cfg.tokenizer.name)}
    if teacher is not None:
        tokenizer["identity"] = teacher.identity
    model = to_dict(cfg.model)
    if getattr(vae, "identity", ""):
        model["vae"]["identity"] = vae.identity
    return ModelIdentity(model=model, tokenizer=tokenizer, stage=str(stage_cfg.name))


def _build_distill(cfg: DictConfig, stage_cfg: DictConfig):
    """Stage 1. A family that ``distills_with_generator`` (the published OneDC: no light latent head)
    trains its codec jointly with the one-step generator (docs/reference-model.md §10.1), which v̂ then comes from."""
    from onedc.stages.distill import DistillStage

    model_family = family(cfg.model)
    if model_family.distills_with_generator:
        vae, codec, generator = _vae_codec_generator(cfg)
    else:
        vae = vae_from_config(cfg.model)
        codec, generator = codec_from_config(cfg.model, vae.latent_channels), None
    teacher = teacher_from_config(cfg.tokenizer)
    distill = build_distill_loss(cfg.tokenizer, cfg.model, teacher, in_channels=model_family.semantic_width(codec))
    lpips_weight = float(stage_cfg.get("lpips_weight", 0.0))
    perceptual = build_perceptual_loss(stage_cfg.lpips) if lpips_weight > 0 else None
    return DistillStage(
        family=model_family, vae=vae, codec=codec, teacher=teacher, distill=distill, optimizer=optimizer_spec(stage_cfg),
        identity=identity(cfg, stage_cfg, teacher, vae), lmbda=float(stage_cfg.lmbda),
        lmbda_warmup_steps=int(stage_cfg.lmbda_warmup_steps), lmbda_start=float(stage_cfg.get("lmbda_start", 0.0)),
        lmbda_step0=str(stage_cfg.get("lmbda_step0", "ramp")), distill_weight=float(stage_cfg.distill_weight),
        latent_weight=float(stage_cfg.latent_weight), generator=generator,
        pixel_weight=float(stage_cfg.get("pixel_weight", 0.0)), lpips_weight=lpips_weight, perceptual=perceptual,
        vae_gradient_checkpointing=bool(stage_cfg.get("vae_gradient_checkpointing", False)),
    )


def _vae_codec_generator(cfg: DictConfig):
    """The VAE, codec and one-step generator of ``cfg.model`` (stages 2 and 3), checked to fit together.

    Each is built by the model's family (:mod:`onedc.families`).
    """
    vae = vae_from_config(cfg.model)
    codec = codec_from_config(cfg.model, vae.latent_channels)
    generator = generator_from_config(cfg.model)
    if generator.latent_channels != vae.latent_channels:
        raise ConfigError(f"the UNet outputs {generator.latent_channels} channels but the VAE latent has "
                          f"{vae.latent_channels}: set model.generator.unet.out_channels={vae.latent_channels}")
    return vae, codec, generator


def _build_latent(cfg: DictConfig, stage_cfg: DictConfig):
    from onedc.stages.latent import LatentStage

    vae, codec, generator = _vae_codec_generator(cfg)
    ema = stage_cfg.get("ema_decay")
    images = stage_cfg.get("image_every_n_steps")
    return LatentStage(
        family=family(cfg.model), vae=vae, codec=codec, generator=generator, optimizer=optimizer_spec(stage_cfg),
        identity=identity(cfg, stage_cfg, vae=vae), train_codec=bool(stage_cfg.train_codec),
        lmbda=float(stage_cfg.lmbda),
        latent_loss=str(stage_cfg.latent_loss), ema_decay=None if ema is None else float(ema),
        image_every_n_steps=None if images is None else int(images),
    )


def build_discriminator(disc_cfg: DictConfig | dict, latent_channels: int):
    """The GAN critic of ``discriminator=``: ``diffusion`` (noised latents) or ``patchgan`` (pixels)."""
    from onedc.modules.discriminators import build_diffusion_discriminator, build_patch_discriminator

    cfg = _plain(disc_cfg)
    kind = str(cfg["kind"])
    if kind == "diffusion":
        t_min, t_max = (int(t) for t in cfg["timesteps"])
        return build_diffusion_discriminator(latent_channels=latent_channels, unet_class=str(cfg["unet_class"]),
                                             unet_config=cfg.get("unet"), pretrained=cfg.get("pretrained"),
                                             scheduler_config=cfg.get("scheduler") or {}, t_min=t_min, t_max=t_max,
                                             seed=int(cfg.get("seed", 0)))
    if kind == "patchgan":
        return build_patch_discriminator(in_channels=3, channels=int(cfg["channels"]), layers=int(cfg["layers"]),
                                         seed=int(cfg.get("seed", 0)))
    raise ConfigError(f"unknown discriminator kind '{kind}': diffusion | patchgan")


def build_perceptual_loss(lpips_cfg: DictConfig | dict):
    """LPIPS of ``stage.lpips``: ``backbone`` alex | vgg (piq's, average pooling), its weights from local files
    (``weights``: a file or dir; null = torch hub's cache); WeightsError with the paths when missing."""
    from onedc.modules.losses import PerceptualLoss

    cfg = _plain(lpips_cfg)
    return PerceptualLoss(cfg.get("weights"), backbone=str(cfg.get("backbone") or "alex"),
                          random_backbone=bool(cfg.get("random_backbone", False)), seed=int(cfg.get("seed", 0)))


def _build_finetune(cfg: DictConfig, stage_cfg: DictConfig):
    from onedc.modules.losses import build_gan_loss
    from onedc.stages.common import OptimizerSpec
    from onedc.stages.finetune import FinetuneStage

    gan_weight, lpips_weight = float(stage_cfg.gan_weight), float(stage_cfg.lpips_weight)
    # First: a missing AlexNet file fails at once, not after building a full-size model (its RNG is forked).
    perceptual = build_perceptual_loss(stage_cfg.lpips) if lpips_weight > 0 else None
    vae, codec, generator = _vae_codec_generator(cfg)
    discriminator = build_discriminator(cfg.discriminator, vae.latent_channels) if gan_weight > 0 else None
    disc_optimizer = OptimizerSpec(lr=float(stage_cfg.disc_lr), betas=tuple(stage_cfg.disc_betas),
                                   weight_decay=float(stage_cfg.disc_weight_decay),
                                   warmup_steps=int(stage_cfg.disc_warmup_steps))
    ema = stage_cfg.get("ema_decay")
    images = stage_cfg.get("image_every_n_steps")
    return FinetuneStage(
        family=family(cfg.model), vae=vae, codec=codec, generator=generator, discriminator=discriminator, perceptual=perceptual,
        gan_loss=build_gan_loss(str(stage_cfg.gan_loss)), optimizer=optimizer_spec(stage_cfg),
        disc_optimizer=disc_optimizer, identity=identity(cfg, stage_cfg, vae=vae),
        train_codec=bool(stage_cfg.train_codec),
        lmbda=float(stage_cfg.lmbda), latent_loss=str(stage_cfg.latent_loss), pixel_loss=str(stage_cfg.pixel_loss),
        pixel_weight=float(stage_cfg.pixel_weight), lpips_weight=lpips_weight,
        latent_weight=float(stage_cfg.latent_weight), gan_weight=gan_weight,
        gan_start_step=int(stage_cfg.gan_start_step), adaptive_gan_weight=bool(stage_cfg.adaptive_gan_weight),
        ema_decay=None if ema is None else float(ema), image_every_n_steps=None if images is None else int(images),
    )


def build_guidance_model(guidance_cfg: DictConfig | dict, device: str | torch.device | None = None):
    """The DMD2 guidance model of ``guidance=``: a whole guidance state file (``pretrained``), or the real UNet
    from ``real_pretrained`` (random from ``unet`` without) with a fake UNet copied from it or from
    ``fake_pretrained``; ᾱ from ``guidance.scheduler``."""
    from diffusers import DDPMScheduler

    from onedc.modules.guidance import build_guidance
    from onedc.modules.state_dict_files import load_state_dict_file

    cfg = _plain(guidance_cfg)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if str(cfg.get("real_dtype", "float32")) not in dtypes:
        raise ConfigError(f"guidance.real_dtype must be one of {', '.join(dtypes)}, got {cfg.get('real_dtype')}")
    real_dtype = dtypes[str(cfg.get("real_dtype", "float32"))]
    alphas = DDPMScheduler(**dict(cfg.get("scheduler") or {})).alphas_cumprod.to(torch.float32)
    kwargs = dict(alphas_cumprod=alphas, guidance_scale=float(cfg.get("guidance_scale", 1.75)), seed=int(cfg.get("seed", 0)),
                  gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)))
    if cfg.get("pretrained") is not None:
        guidance = build_guidance(dict(cfg["unet"]), device="meta", **kwargs)
        load_state_dict_file(guidance, cfg["pretrained"], what="the DMD2 guidance model (guidance.unet)",
                             expected="a guidance state file written by onedc import-reference --guidance")
        guidance.real_unet.to(dtype=real_dtype)
        return guidance.to(device) if device is not None and str(device) != "meta" else guidance
    return build_guidance(dict(cfg["unet"]), real_pretrained=cfg.get("real_pretrained"),
                          fake_pretrained=cfg.get("fake_pretrained"), real_dtype=real_dtype, device=device, **kwargs)


def text_encoder_from_config(guidance_cfg: DictConfig | dict):
    """The frozen CLIP text encoder of ``guidance.text`` (a local dir, or random of ``config`` without one)."""
    from onedc.modules.text import build_text_encoder

    cfg = _plain(guidance_cfg).get("text") or {}
    return build_text_encoder(pretrained=cfg.get("pretrained"), config=cfg.get("config"), seed=int(cfg.get("seed", 0)),
                              max_length=int(cfg.get("max_length", 77)))


def _build_dmd(cfg: DictConfig, stage_cfg: DictConfig):
    """Stage II of the paper (DMD2): the generator stage's modules, the guidance model and the text encoder."""
    from onedc.stages.dmd import DMDStage

    lpips_weight = float(stage_cfg.lpips_weight)
    perceptual = build_perceptual_loss(stage_cfg.lpips) if lpips_weight > 0 else None
    vae, codec, generator = _vae_codec_generator(cfg)
    guidance = build_guidance_model(cfg.guidance)
    if guidance.latent_channels != vae.latent_channels:
        raise ConfigError(f"guidance.unet.in_channels={guidance.latent_channels} but the VAE latent has "
                          f"{vae.latent_channels} channels: set guidance.unet.in_channels={vae.latent_channels}")
    text = text_encoder_from_config(cfg.guidance)
    if text.width != int(guidance.fake_unet.config.cross_attention_dim):
        raise ConfigError(f"the text encoder gives {text.width}-d embeddings but guidance.unet.cross_attention_dim="
                          f"{guidance.fake_unet.config.cross_attention_dim}: they must be equal")
    guidance_optimizer = optimizer_spec(stage_cfg, "guidance_")
    ema = stage_cfg.get("ema_decay")
    images = stage_cfg.get("image_every_n_steps")
    return DMDStage(
        family=family(cfg.model), vae=vae, codec=codec, generator=generator, guidance=guidance, text=text,
        perceptual=perceptual, optimizer=optimizer_spec(stage_cfg), guidance_optimizer=guidance_optimizer,
        identity=identity(cfg, stage_cfg, vae=vae), captions=str(stage_cfg.captions),
        generator_every=int(stage_cfg.generator_every), dm_weight=float(stage_cfg.dm_weight),
        gan_weight=float(stage_cfg.gan_weight), guidance_cls_weight=float(stage_cfg.guidance_cls_weight),
        pixel_weight=float(stage_cfg.pixel_weight), lpips_weight=lpips_weight,
        dm_timesteps=tuple(stage_cfg.dm_timesteps), gan_timesteps=tuple(stage_cfg.gan_timesteps),
        fake_timesteps=tuple(stage_cfg.fake_timesteps), ema_decay=None if ema is None else float(ema),
        image_every_n_steps=None if images is None else int(images),
    )


STAGE_BUILDERS: dict[str, Callable[[DictConfig, DictConfig], Any]] = {
    "distill": _build_distill,
    "latent": _build_latent,
    "finetune": _build_finetune,
    "dmd": _build_dmd,
}


def build_stage(cfg: DictConfig, stage_cfg: DictConfig):
    """The LightningModule of ``stage_cfg.name`` with all its modules built from ``cfg``."""
    name = str(stage_cfg.name)
    if name not in STAGE_BUILDERS:
        raise ConfigError(f"stage '{name}' has no builder; known stages: {', '.join(STAGE_BUILDERS)}")
    return STAGE_BUILDERS[name](cfg, stage_cfg)
