"""The sample photos that ship inside installed packages: training and tests with no dataset.

Six photographs from scikit-image's ``skimage/data`` folder and matplotlib's
``grace_hopper.jpg`` are found through each package's own install path; nothing is ever
downloaded. Base layer (docs/architecture.md).
"""
from __future__ import annotations

from pathlib import Path

from onedc.errors import OneDCError

_SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
)
_MATPLOTLIB_PHOTO = "grace_hopper.jpg"


def sample_photo_paths() -> dict[str, Path]:
    """Return the embedded default photos, keyed by file stem ("astronaut", "grace_hopper", ...).

    These are real photographs that ship inside installed packages: six from scikit-image's
    ``skimage/data`` folder (astronaut, chelsea, coffee, rocket, motorcycle_left,
    motorcycle_right) and matplotlib's ``grace_hopper.jpg``. They are found through each
    package's own install path; nothing is ever downloaded. Raises
    :class:`~onedc.errors.OneDCError` if a package or one of its files is missing.
    """
    try:
        import matplotlib
        import skimage.data
    except ImportError as exc:
        raise OneDCError(
            f"the sample photos need scikit-image and matplotlib ({exc}). "
            "Install them with `pip install scikit-image matplotlib` (or `pip install "
            "onedc[samples]`), or pass a folder of your own images as root."
        ) from exc
    skimage_dir = Path(skimage.data.__file__).parent
    paths = [skimage_dir / name for name in _SKIMAGE_PHOTOS]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / _MATPLOTLIB_PHOTO)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise OneDCError(
            f"sample photos are missing from the installed packages: {', '.join(missing)}. "
            "Reinstall them with `pip install --force-reinstall scikit-image matplotlib`, "
            "or pass a folder of your own images as root."
        )
    return {p.stem: p for p in paths}
