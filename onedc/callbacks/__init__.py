"""Lightning callbacks and plugins of onedc."""
from onedc.callbacks.checkpoint_io import AtomicCheckpointIO

__all__ = ["AtomicCheckpointIO"]
