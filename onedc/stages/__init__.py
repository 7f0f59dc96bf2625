"""The training stages: one ``LightningModule`` per stage (docs/architecture.md §3).

``distill`` (:class:`~onedc.stages.distill.DistillStage`), ``latent``
(:class:`~onedc.stages.latent.LatentStage`) and ``finetune``
(:class:`~onedc.stages.finetune.FinetuneStage`); what they share is in :mod:`onedc.stages.common`.
Each receives built modules, its model family (:mod:`onedc.families`) and optimiser specs, and
reads no config.
"""
