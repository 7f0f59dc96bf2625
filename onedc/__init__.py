"""onedc: a PyTorch Lightning framework for OneDC, the one-step diffusion image codec with
semantic distillation (Xue et al., NeurIPS 2025, arXiv:2505.16687).

Layers (dependencies flow one way): ``onedc.modules`` (pure torch) -> ``onedc.stages``
(LightningModules) -> ``onedc.training.pipeline`` / ``train.py`` (configs).
"""
from onedc.errors import OneDCError

__version__ = "0.1.0"
__all__ = ["OneDCError", "__version__"]
