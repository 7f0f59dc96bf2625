#!/usr/bin/env python
"""Train OneDC: one stage or the whole curriculum.

    python train.py stage=distill                       # stage 1 on the embedded sample photos
    python train.py stage=all                           # distill -> latent -> finetune
    python train.py stage=latent init_from=runs/tiny-vq_tiny/distill/final.ckpt
    python train.py stage=distill trainer=ddp trainer.devices=2 stage.lmbda=4.0
    python train.py --help | --cfg [overrides]          # groups and options | print the composed config
"""
from __future__ import annotations

import logging
import sys

HELP = __doc__ + """
Config groups (GROUP=OPTION):
{groups}

Top-level keys: seed, run_dir, init_from (weights only), resume (auto|never|PATH), overwrite.
Any key can be overridden with dotted paths (stage.lmbda=4.0, data.root=/imgs, trainer.devices=8).
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point: compose the config from ``argv`` overrides and run it. Returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from onedc.training.config import GROUPS, compose, group_options
    from onedc.errors import OneDCError

    if "-h" in argv or "--help" in argv:
        groups = "\n".join(f"  {g:<14} {', '.join(group_options(g)) or '-'}" for g in GROUPS)
        print(HELP.format(groups=groups))
        return 0
    print_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    # One voice: DDP re-runs this script per rank; only rank 0 reports.
    handler: logging.Handler = logging.StreamHandler() if rank_zero_only.rank == 0 else logging.NullHandler()
    handler.setFormatter(logging.Formatter("[onedc] %(message)s"))
    logging.getLogger("onedc").addHandler(handler)
    logging.getLogger("onedc").setLevel(logging.INFO)
    try:
        cfg = compose(argv)
        if print_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        from onedc.training.pipeline import run

        for result in run(cfg):
            state = "skipped (already done)" if result.skipped else f"trained to step {result.global_step}"
            logging.getLogger("onedc").info("stage %s %s -> %s", result.name, state, result.final_ckpt)
    except OneDCError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
