"""Lightning callbacks and plugins of onedc; :func:`training_callbacks` lists a run's callbacks in their order."""
from onedc.callbacks.checkpoint_io import AtomicCheckpointIO
from onedc.callbacks.ema import EMACallback
from onedc.callbacks.images import ImageGridCallback
from onedc.callbacks.rd_eval import RDEvalCallback
from onedc.callbacks.registry import check_order, training_callbacks
from onedc.callbacks.rng import RNGStateCallback

__all__ = ["AtomicCheckpointIO", "EMACallback", "ImageGridCallback", "RDEvalCallback", "RNGStateCallback", "check_order",
           "training_callbacks"]
