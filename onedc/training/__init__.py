"""The training plumbing: the only code that reads configs.

::

    config.py     compose the Hydra config (configs/), one-line errors for unknown options or keys
    build.py      config -> built objects: the stage's modules through the model family, the
                  teacher, the losses, the data module, the optimiser specs
    pipeline.py   trainers, run dirs, init_from / resume, the distill -> latent -> finetune chain
    report.py     the end-of-chain report (rd.png, reconstructions.png, report.json)

``train.py`` at the repository root is the entry point; the stages (``onedc.stages``) receive
built modules and read no config.
"""
