"""``onedc export``: a stage checkpoint -> inference weights in one ``.safetensors`` file.

The file holds only what decoding and encoding need, the ``vae.``, ``codec.`` and ``generator.``
tensors (the codec's rANS tables included), with the model config as JSON in the safetensors
metadata. No teacher, predictor head, discriminator, optimiser state or EMA copy: it is the
file to ship. :class:`onedc.inference.OneDCCodec` loads it like a checkpoint (by suffix).
"""
from __future__ import annotations

import json
from pathlib import Path

from onedc.errors import CheckpointError
from onedc.io import atomic_write_bytes

EXPORT_FORMAT = "1"
KEEP_PREFIXES = ("vae.", "codec.", "generator.")


def export_inference_weights(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the inference weights of ``checkpoint`` to ``output`` (.safetensors), atomically.

    The codec's coding tables are refreshed (``update()``) before writing, so the exported file
    can compress at once. Returns the output path.
    """
    from safetensors.torch import save

    from onedc.inference import CHECKPOINT_READERS, OneDCCodec, _read_stage_checkpoint

    output, checkpoint = Path(output), Path(checkpoint)
    if output.suffix != ".safetensors":
        raise CheckpointError(f"export writes a .safetensors file, got {output}")
    loaded = CHECKPOINT_READERS.get(checkpoint.suffix.lower(), _read_stage_checkpoint)(checkpoint)
    # A strict load + update() of the bundle: a bad checkpoint fails here, not at decode time.
    bundle = OneDCCodec.from_weights(loaded.model_config, loaded.state_dict, source=checkpoint)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.state_dict().items()
               if k.startswith(KEEP_PREFIXES)}
    metadata = {"onedc_export_format": EXPORT_FORMAT, "model": json.dumps(loaded.model_config),
                "source": str(Path(checkpoint).name)}
    atomic_write_bytes(output, save(tensors, metadata=metadata))
    return output


def read_exported(path: Path):
    """Reader of exported files for :data:`onedc.inference.CHECKPOINT_READERS`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from onedc.inference import LoadedWeights

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path), device="cpu")
    except FileNotFoundError as err:
        raise CheckpointError(f"exported weights not found: {path}") from err
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    if "model" not in metadata:
        raise CheckpointError(f"{path} has no onedc model metadata: write it with `onedc export`")
    if int(metadata.get("onedc_export_format", "0")) > int(EXPORT_FORMAT):
        raise CheckpointError(f"{path} uses export format {metadata['onedc_export_format']}: upgrade onedc")
    return LoadedWeights(json.loads(metadata["model"]), state_dict)
