"""Config composition: Hydra's compose API over ``configs/``, with errors a user can act on.

Hydra is used only to *compose* (groups, defaults, overrides); it never changes the working
directory and never creates output dirs: run dirs are deterministic and owned by
:mod:`onedc.training.pipeline`. Unknown group options and unknown keys raise :class:`ConfigError`
listing the valid choices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from onedc.errors import ConfigError

GROUPS = ("stage", "model", "tokenizer", "data", "trainer", "discriminator", "guidance", "experiment", "ladder")


def config_dir() -> Path:
    """The ``configs/`` directory: ``$ONEDC_CONFIG_DIR`` or the one beside the package."""
    env = os.environ.get("ONEDC_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}: set ONEDC_CONFIG_DIR to onedc's configs/ directory")
    return path


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (``model`` -> ``['sd15', 'tiny']``)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _explain(err: Exception, overrides: Sequence[str]) -> str:
    text = str(err)
    for group in GROUPS:
        for override in overrides:
            key, _, value = override.lstrip("+~").partition("=")
            if key == group and value not in group_options(group):
                return (f"unknown {group} '{value}'. Valid {group} options: "
                        f"{', '.join(group_options(group)) or '(none)'}")
    if "Could not override" in text or "not in struct" in text:
        for override in overrides:
            key = override.lstrip("+~").partition("=")[0]
            if f"'{key}'" in text:
                parent, _, leaf = key.rpartition(".")
                valid = _keys_of(parent, [o for o in overrides if o != override])
                hint = f" Valid keys of '{parent or '<root>'}': {', '.join(valid)}." if valid else ""
                return (f"unknown config key '{key}'.{hint} To add a new key on purpose, "
                        f"write '+{override}'; `python train.py --cfg` prints the composed config")
    return text.strip().splitlines()[0] if text.strip() else repr(err)


def _keys_of(parent: str, overrides: list[str]) -> list[str]:
    try:
        node = OmegaConf.select(compose(overrides), parent) if parent else compose(overrides)
    except ConfigError:
        return []
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with command-line style ``overrides``.

    The result is resolved (interpolations evaluated) and in struct mode, so a typo in a key
    later raises instead of silently creating a new key.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
    except Exception as err:  # Hydra raises several unrelated types; all mean "bad overrides"
        raise ConfigError(_explain(err, overrides)) from err
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:
        raise ConfigError(f"cannot resolve the config: {err}") from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config values are missing: {', '.join(missing)} "
                          "(e.g. data=folder needs data.root=/path/to/images)")
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_dict(node: DictConfig | None) -> dict:
    """A plain, resolved ``dict`` of a config node (what modules receive)."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
