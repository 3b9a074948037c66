"""Data sources (bundled digits, image folders, CIFAR batches, .npz, text) and transforms."""

from flaxlab.data import augment
from flaxlab.data.config import DataConfig
from flaxlab.data.factory import class_names, make_data, register_data_source
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
    folder_splits,
    load_cifar,
    load_digits,
    load_image_folder,
    load_npz,
    split_dataset,
)

__all__ = [
    "DataConfig",
    "ImageDataset",
    "TrainBatches",
    "augment",
    "batch_indices",
    "class_names",
    "epoch_permutation",
    "eval_batches",
    "folder_splits",
    "load_cifar",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "make_data",
    "random_crop",
    "random_flip",
    "register_data_source",
    "split_dataset",
    "to_float_images",
]
