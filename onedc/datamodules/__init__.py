"""Lightning data modules: where training and validation images come from."""
from onedc.datamodules.image_folder import (
    FULL_DECODE_LIMIT,
    IMAGE_SUFFIXES,
    SMALL_IMAGE_POLICIES,
    ImageCropDataset,
    ImageFolderDataModule,
    list_images,
    load_image,
    sample_photo_paths,
)

__all__ = [
    "FULL_DECODE_LIMIT",
    "IMAGE_SUFFIXES",
    "SMALL_IMAGE_POLICIES",
    "ImageCropDataset",
    "ImageFolderDataModule",
    "list_images",
    "load_image",
    "sample_photo_paths",
]
