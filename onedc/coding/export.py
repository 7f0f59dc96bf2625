"""``onedc export``: a stage checkpoint -> inference weights in one ``.safetensors`` file.

The file holds only what decoding and encoding need, the ``vae.``, ``codec.`` and ``generator.``
tensors (the codec's rANS tables included), with the model config as JSON in the safetensors
metadata. No teacher, predictor head, discriminator, optimiser state or EMA copy: it is the
file to ship. It is self-contained: a trainable-only checkpoint's frozen parts (the VAE, a frozen
codec, the UNet base under LoRA) are read back from their sources first, so the exported file
decodes on a machine that has none of them. :class:`onedc.coding.bundle.OneDCCodec` loads it like a checkpoint (by suffix; the reader is
:func:`onedc.coding.checkpoints.read_exported`).
"""
from __future__ import annotations

import json
from pathlib import Path

from onedc.coding.checkpoints import EXPORT_FORMAT, read_exported, read_weights
from onedc.errors import CheckpointError
from onedc.coding.bundle import OneDCCodec
from onedc.io import atomic_write_bytes

__all__ = ["EXPORT_FORMAT", "KEEP_PREFIXES", "export_inference_weights", "read_exported"]
KEEP_PREFIXES = ("vae.", "codec.", "generator.")


def export_inference_weights(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the inference weights of ``checkpoint`` to ``output`` (.safetensors), atomically.

    The codec's coding tables are refreshed (``update()``) before writing, so the exported file
    can compress at once. Returns the output path.
    """
    from safetensors.torch import save

    output, checkpoint = Path(output), Path(checkpoint)
    if output.suffix != ".safetensors":
        raise CheckpointError(f"export writes a .safetensors file, got {output}")
    loaded = read_weights(checkpoint)
    # A strict load + update() of the bundle: a bad checkpoint fails here, not at decode time.
    bundle = OneDCCodec.from_weights(loaded.model_config, loaded.state_dict, source=checkpoint)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.state_dict().items()
               if k.startswith(KEEP_PREFIXES)}
    metadata = {"onedc_export_format": EXPORT_FORMAT, "model": json.dumps(loaded.model_config),
                "source": str(Path(checkpoint).name)}
    atomic_write_bytes(output, save(tensors, metadata=metadata))
    return output
