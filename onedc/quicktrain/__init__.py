"""Offline recipes that make the embedded default's frozen parts (run by ``python -m onedc.assets.make``).

:mod:`.vae` trains the tiny ``AutoencoderKL`` of ``model=tiny``, :mod:`.vq` the tiny VQ teacher
of ``tokenizer=vq_tiny``, both on photos bundled with scikit-image (:mod:`.common`: never the
held-out sample photos). Nothing here runs when a model is built: the results ship as files in
:mod:`onedc.assets`, which ``model=tiny`` and ``tokenizer=vq_tiny`` load.
"""
from onedc.quicktrain.common import HELD_OUT_IMAGES, QUICK_TRAIN_IMAGES
from onedc.quicktrain.vae import VAEQuickTrainRecipe, pca_encoder, quick_train_vae
from onedc.quicktrain.vq import QuickTrainRecipe, quick_train_vq

__all__ = ["HELD_OUT_IMAGES", "QUICK_TRAIN_IMAGES", "QuickTrainRecipe", "VAEQuickTrainRecipe", "pca_encoder",
           "quick_train_vae", "quick_train_vq"]
