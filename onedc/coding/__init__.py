"""The coding product: what turns images into ``.onedc`` files and back, with no training library.

::

    images.py       image files in and out (decode any format, write PNG atomically)
    bitstream.py    the .onedc container, byte by byte (magic, version, sizes, streams, CRCs)
    checkpoints.py  weight files -> (model config dict, prefixed state dict): stage checkpoints,
                    DeepSpeed folders, exported safetensors
    identity.py     the 16-byte model identity every file carries
    bundle.py       OneDCCodec: a trained model that compresses and decompresses (built by its family)
    rate.py         real bits of the files against the model's rate estimate
    export.py       a checkpoint -> inference-only safetensors

The public entry point is :class:`onedc.coding.bundle.OneDCCodec` (also importable as
``onedc.inference.OneDCCodec``). Nothing here imports Lightning, Hydra or OmegaConf
(``tests/test_layers.py``).
"""
