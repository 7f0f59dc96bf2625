"""The codec's rANS tables as state-dict buffers: their names, and resizing them before a load.

CompressAI's ``GaussianConditional`` keeps its CDF tables in buffers whose sizes change with
``update()``. A freshly built codec has empty ones, so a strict ``load_state_dict`` of a
checkpoint fails on their shapes unless they are resized first. Stages (resume), the pipeline
(``init_from``) and the inference bundle all do this through :func:`fit_cdf_buffers`.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

# The buffers of ``GaussianConditional`` that update() resizes, in CompressAI's naming.
CDF_BUFFERS: tuple[str, ...] = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def fit_cdf_buffers(gaussian_conditional: nn.Module, prefix: str, state_dict: Mapping[str, Tensor]) -> None:
    """Resize ``gaussian_conditional``'s CDF buffers to those of ``state_dict`` under ``prefix``.

    ``prefix`` is the module's name in ``state_dict`` without the trailing dot (e.g.
    ``"codec.gaussian_conditional"``); every buffer of :data:`CDF_BUFFERS` must be in it.
    """
    from compressai.models.utils import update_registered_buffers

    update_registered_buffers(gaussian_conditional, prefix, list(CDF_BUFFERS), state_dict)


def tables_missing(codec: nn.Module) -> bool:
    """Whether ``codec``'s rANS tables were never built (``update()`` not run since construction)."""
    return codec.gaussian_conditional._offset.numel() == 0
