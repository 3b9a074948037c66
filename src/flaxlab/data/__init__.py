"""Data sources (bundled digits, image folders, CIFAR batches, .npz, text) and transforms."""

from flaxlab.data.pipeline import (
    TrainBatches,
    batch_indices,
    epoch_permutation,
    eval_batches,
    random_crop,
    random_flip,
    to_float_images,
)
from flaxlab.data.sources import (
    ImageDataset,
    load_cifar,
    load_digits,
    load_image_folder,
    load_npz,
)

__all__ = [
    "ImageDataset",
    "TrainBatches",
    "batch_indices",
    "epoch_permutation",
    "eval_batches",
    "load_cifar",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "random_crop",
    "random_flip",
    "to_float_images",
]
