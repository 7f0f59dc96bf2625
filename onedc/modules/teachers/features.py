"""ViT feature teachers (timm, transformers): patch tokens as continuous distillation targets."""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from onedc.modules.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Teacher, TeacherTargets, _scaled_size


class _FeatureTeacher(Teacher):
    """Shared input handling of the ViT feature teachers: resize, [-1,1] -> input_range -> mean/std."""

    def __init__(self, *, target_dim: int, identity: str, input_scale: float,
                 mean: Sequence[float], std: Sequence[float], **protocol: Any) -> None:
        super().__init__(kind="feature", target_dim=target_dim, num_codes=None, identity=identity,
                         input_scale=input_scale, **protocol)
        # Non-persistent: the statistics come from the backbone's config, not from checkpoints.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def _normalise(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return (self._prepare(x, size) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @staticmethod
    def _tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, prefix + h*w, C) -> (B, C, h, w), dropping the leading CLS/register tokens."""
        prefix = tokens.shape[1] - height * width
        if prefix < 0:
            raise RuntimeError(f"backbone returned {tokens.shape[1]} tokens, fewer than the "
                               f"{height}x{width} patch grid")
        patches = tokens[:, prefix:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class TimmFeatureTeacher(_FeatureTeacher):
    """A timm backbone (e.g. ``vit_base_patch14_dinov2``) whose patch tokens are the targets.

    The normalisation comes from the model's ``pretrained_cfg``. A ViT built with
    ``dynamic_img_size=True`` sees the image at ``input_scale`` rounded to whole patches; a
    fixed-size ViT (the timm default) needs exactly its ``img_size``, so the image is resized to
    that (the aspect ratio is then not kept). CNN backbones' ``forward_features`` already return
    a (B, C, h, w) map and are used as is.
    """

    def __init__(self, model: nn.Module, *, identity: str, input_scale: float = 0.5, **protocol: Any) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(target_dim=model.num_features, identity=identity, input_scale=input_scale,
                         mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD), **protocol)
        self.model = model
        self._freeze()

    def _input_size(self, height: int, width: int) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None:
            return _scaled_size(height, width, self.input_scale)
        if getattr(patch_embed, "strict_img_size", False):
            return tuple(patch_embed.img_size)
        return _scaled_size(height, width, self.input_scale, multiple=patch_embed.patch_size[0])

    def _targets(self, x: torch.Tensor) -> TeacherTargets:
        size = self._input_size(x.shape[-2], x.shape[-1])
        feats = self.model.forward_features(self._normalise(x, size))
        if feats.ndim == 4:
            return TeacherTargets(None, feats)
        patch = self.model.patch_embed.patch_size
        grid = self._tokens_to_grid(feats, size[0] // patch[0], size[1] // patch[1])
        return TeacherTargets(None, grid)


class TransformersFeatureTeacher(_FeatureTeacher):
    """A transformers vision backbone (e.g. ``Dinov2Model``) whose patch tokens are the targets.

    The image is resized by ``input_scale`` to whole patches; DINOv2 interpolates its position
    embeddings to any grid (ViT-style models get ``interpolate_pos_encoding=True``). The leading
    CLS and register tokens of ``last_hidden_state`` are dropped.
    """

    def __init__(self, model: nn.Module, *, identity: str, input_scale: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, **protocol: Any) -> None:
        super().__init__(target_dim=model.config.hidden_size, identity=identity,
                         input_scale=input_scale, mean=mean, std=std, **protocol)
        self.model = model
        patch = model.config.patch_size
        self.patch_size: tuple[int, int] = tuple(patch) if isinstance(patch, Sequence) else (patch, patch)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self._freeze()

    def _targets(self, x: torch.Tensor) -> TeacherTargets:
        ph, pw = self.patch_size
        height = _scaled_size(x.shape[-2], x.shape[-1], self.input_scale, multiple=ph)[0]
        width = _scaled_size(x.shape[-2], x.shape[-1], self.input_scale, multiple=pw)[1]
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=self._normalise(x, (height, width)), **kwargs)
        return TeacherTargets(None, self._tokens_to_grid(out.last_hidden_state, height // ph, width // pw))
