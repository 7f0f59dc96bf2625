"""Lightning callbacks and plugins of onedc."""
from onedc.callbacks.checkpoint_io import AtomicCheckpointIO
from onedc.callbacks.ema import EMACallback
from onedc.callbacks.images import ImageGridCallback
from onedc.callbacks.rd_eval import RDEvalCallback
from onedc.callbacks.rng import RNGStateCallback

__all__ = ["AtomicCheckpointIO", "EMACallback", "ImageGridCallback", "RDEvalCallback", "RNGStateCallback"]
