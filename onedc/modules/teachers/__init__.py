"""Frozen generative-tokenizer teachers that produce the semantic-distillation targets.

OneDC trains the hyperprior's semantic features to predict what a pretrained tokenizer sees in
the image (docs/architecture.md, "Stage 1"). The teacher is swappable; every teacher maps an image in ``[-1, 1]`` to
a :class:`TeacherTargets` on its own token grid::

    x (B,3,H,W) in [-1,1]
      -> resize by input_scale (`resize`: bilinear_antialias | bilinear), map to `input_range`
         (VQ: what the tokenizer was trained on; feature teachers: [0,1], then mean/std)
      -> VQ tokenizer      : encoder -> quant_conv -> nearest code -> indices (B,h,w), z_q (B,C,h,w)
      -> feature backbone  : ViT patch tokens (prefix tokens dropped)  -> features (B,C,h,w)

Three implementations: :class:`VQTeacher` (diffusers ``VQModel``, e.g. MaskGIT-VQGAN: f16 on the
image downsampled x2 gives a token grid at 1/32), :class:`TimmFeatureTeacher` (any timm ViT such
as DINOv2) and :class:`TransformersFeatureTeacher` (transformers vision models such as DINOv2).
:func:`build_teacher` builds one from the plain-dict contents of a ``configs/tokenizer/*.yaml``.

Tiny VQ presets are small VQModels; a random tokenizer's codes are noise that no student can
learn, so ``tokenizer=vq_tiny`` loads one trained offline on photos bundled with scikit-image
(``pretrained: asset:vq_tiny_teacher``, see :mod:`onedc.assets` and :mod:`onedc.quicktrain.vq`),
and ``tile_size`` makes its codes depend on their own patch only (:class:`VQTeacher`).

A teacher is frozen for good: no parameter requires grad and ``train()`` keeps it in eval mode,
so targets stay a fixed function of the image for the whole run. ``identity`` names the teacher
(weights content hash, or architecture + seed for random weights) so a stage can refuse to
resume a checkpoint whose predictor head was trained against another teacher.

Files: :mod:`.base` (the contract and input protocol), :mod:`.vq` and :mod:`.features` (the
backbones), :mod:`.identity` (naming the weights), :mod:`.codebook` (k-means init of random VQ
codebooks), :mod:`.build` (options -> teacher). Every public name (and the helpers
``onedc.modules.vae`` and ``onedc.quicktrain`` share) stays importable from ``onedc.modules.teachers``.
"""
from onedc.modules.teachers.base import (
    IMAGENET_MEAN, IMAGENET_STD, RESIZE_METHODS, TEACHER_KINDS, Teacher, TeacherTargets, _build_random, _check_range,
    _protocol_suffix, _resize, _scaled_size, _to_range)
from onedc.modules.teachers.build import build_teacher
from onedc.modules.teachers.features import TimmFeatureTeacher, TransformersFeatureTeacher
from onedc.modules.teachers.identity import _random_identity, _sha256_files, _weights_identity
from onedc.modules.teachers.vq import VQTeacher

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_METHODS",
    "TEACHER_KINDS",
    "Teacher",
    "TeacherTargets",
    "TimmFeatureTeacher",
    "TransformersFeatureTeacher",
    "VQTeacher",
    "build_teacher",
    # shared with onedc.modules.vae / onedc.quicktrain and the tests
    "_build_random", "_check_range", "_protocol_suffix", "_random_identity",
    "_resize", "_scaled_size", "_sha256_files", "_to_range", "_weights_identity",
]
