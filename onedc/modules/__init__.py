"""Plain ``nn.Module``s of OneDC: no Lightning, no config objects (docs/architecture.md, layer 2)."""
from onedc.modules.codec import DecodedLatents, HyperpriorCodec, HyperpriorOutput, pad_to_multiple
from onedc.modules.fsq import FSQ
from onedc.modules.vae import FrozenVAE, build_vae

__all__ = ["DecodedLatents", "FSQ", "FrozenVAE", "HyperpriorCodec", "HyperpriorOutput", "build_vae", "pad_to_multiple"]
