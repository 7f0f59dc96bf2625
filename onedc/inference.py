"""The public inference API under its stable import path: ``from onedc.inference import OneDCCodec``.

The coding product lives in :mod:`onedc.coding` (the bundle in :mod:`onedc.coding.bundle`); this
module only names its public entry points for users and downstream checks. onedc's own code
imports :mod:`onedc.coding` directly (``tests/test_layers.py`` checks that nothing inside the
package imports this module).
"""
from onedc.coding.bundle import DecodedImage, OneDCCodec

__all__ = ["DecodedImage", "OneDCCodec"]
