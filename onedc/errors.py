"""The project's own error types.

Every failure a user can cause (a bad config key, a missing checkpoint, a corrupt bitstream, an
unreadable image) is raised as a subclass of :class:`OneDCError` at the boundary where it is
detected, with a message that names the problem and says what to do. The CLI and ``train.py``
print that message on one line and exit non-zero instead of showing a traceback.
"""
from __future__ import annotations


class OneDCError(Exception):
    """Base class of every error onedc raises on purpose."""

    exit_code: int = 2


class ConfigError(OneDCError):
    """A config group option or key does not exist, or values contradict each other."""


class CheckpointError(OneDCError):
    """A checkpoint is missing, unreadable, or belongs to a different model."""


class WeightsError(OneDCError):
    """Pretrained weights (VAE, UNet, teacher, perceptual backbone) are missing or do not fit."""


class ImageReadError(OneDCError):
    """An input file is not a readable image."""


class DataError(OneDCError):
    """Too many samples of a training source cannot be used (undecodable, missing, too small)."""


class BitstreamError(OneDCError):
    """A ``.onedc`` file cannot be decoded. Subclasses say why."""


class TruncatedBitstreamError(BitstreamError):
    """The file ends before the lengths in its header say it should."""


class BadMagicError(BitstreamError):
    """The file does not start with the onedc magic number."""


class UnsupportedVersionError(BitstreamError):
    """The file was written by a newer format version than this onedc reads."""


class ChecksumError(BitstreamError):
    """The payload's CRC32 does not match the header: the file is corrupt."""


class ModelMismatchError(BitstreamError):
    """The file was written by a different model than the one given for decoding."""


class CodingMismatchError(BitstreamError):
    """The decoder's coding decisions (rANS tables, means) differ from the encoder's."""


class PixelLimitError(OneDCError):
    """An image or a ``.onedc`` header declares more pixels than the allowed limit.

    Raised from the declared size alone, before any pixel buffer is allocated (like Pillow's
    ``DecompressionBombError``), so an untrusted file cannot exhaust memory; the limit is a
    parameter (``max_pixels``; the CLI's ``--max-pixels``).
    """
