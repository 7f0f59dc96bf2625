"""What the quick-train recipes share: the bundled training photos, random crops, recipe options.

The photos ship inside scikit-image. The default sample-photo validation images (matplotlib's
``grace_hopper``, skimage's ``motorcycle_right``) and ``motorcycle_right``'s stereo twin
``motorcycle_left`` are left out, so the shipped parts never saw the held-out content their
figures are measured on.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from onedc.errors import ConfigError
from onedc.coding.images import load_image
from onedc.modules.teachers.base import _resize, _scaled_size, _to_range

__all__ = ["HELD_OUT_IMAGES", "QUICK_TRAIN_IMAGES", "quick_train_images", "random_crops"]

QUICK_TRAIN_IMAGES: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
    "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
    "gravel.png")
# The sample photos the shipped parts are measured on (onedc.samples names), never trained on.
HELD_OUT_IMAGES: tuple[str, ...] = ("grace_hopper", "motorcycle_right")


def quick_train_images(names: Sequence[str], scale: float, crop: int, input_range: tuple[float, float],
                       resize: str) -> list[torch.Tensor]:
    """The recipe's images (scikit-image data names or paths), resized by ``scale`` and mapped to
    ``input_range`` exactly as a teacher's ``targets()`` prepares its input."""
    skimage_dir = None
    images = []
    for name in names:
        path = Path(name).expanduser()
        if not path.is_file():
            if skimage_dir is None:
                try:
                    import skimage.data
                except ImportError as err:
                    raise ConfigError(f"quick_train image {name!r} is not a file, and scikit-image "
                                      "(whose bundled photos it would name) is not installed") from err
                skimage_dir = Path(skimage.data.__file__).parent
            path = skimage_dir / name
        if not path.is_file():
            raise ConfigError(f"quick_train image {name!r} not found (neither a file nor in "
                              f"{skimage_dir}): give a path or a scikit-image data file name")
        image = load_image(path)[None]
        image = _to_range(_resize(image, _scaled_size(image.shape[-2], image.shape[-1], scale), resize),
                          input_range)[0]
        if min(image.shape[-2:]) < crop:
            raise ConfigError(f"quick_train image {path} is {tuple(image.shape[-2:])} px at input_scale "
                              f"{scale:g}, smaller than the {crop} px training crop")
        images.append(image)
    return images


def random_crops(images: Sequence[torch.Tensor], count: int, size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size``-px crops (random image, position and horizontal flip)."""
    def draw(high: int) -> int:
        return int(torch.randint(high, (), generator=generator))

    crops = []
    for _ in range(count):
        image = images[draw(len(images))]
        top, left = draw(image.shape[-2] - size + 1), draw(image.shape[-1] - size + 1)
        crop = image[:, top:top + size, left:left + size]
        crops.append(crop.flip(-1) if draw(2) else crop)
    return torch.stack(crops)
