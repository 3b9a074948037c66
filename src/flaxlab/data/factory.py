"""Builds training and evaluation data from a :class:`~flaxlab.data.config.DataConfig`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from flaxlab.data.pipeline import TrainBatches, eval_batches
from flaxlab.data.sources import (
    ImageDataset,
    folder_splits,
    load_cifar,
    load_digits,
    load_image_folder,
    load_npz,
    split_dataset,
)

# Sources for non-image tasks register here: name -> "module:function", the function taking the
# data config and returning (train_batches(step) -> dict, eval_iterator_factory() -> Iterator).
_EXTRA_SOURCES: dict[str, str] = {
    "stdlib_text": "flaxlab.data.text:text_batches",
    "digits_captions": "flaxlab.data.captions:captioned_digits",
}
IMAGE_SOURCES = ("digits", "npz", "image_folder", "cifar")


def data_source_names() -> list[str]:
    """Every accepted ``data.name``."""
    return sorted(set(IMAGE_SOURCES) | set(_EXTRA_SOURCES))


def register_data_source(name: str, spec: str) -> None:
    _EXTRA_SOURCES[name] = spec


def _require_path(config, attr: str = "path") -> str:
    value = getattr(config, attr)
    if not value:
        raise ValueError(f"data.name={config.name!r} needs data.{attr}=<location>")
    return value


def _folder(config, split: str) -> ImageDataset:
    """An image folder's split: its own train/test sub-folders, ``data.eval_path``, or the fixed
    stratified hold-out of ``data.eval_fraction``."""
    channels = config.channels or 3
    load = lambda p: load_image_folder(p, config.image_size, channels, config.class_names)
    if split == "eval" and config.eval_path:
        return load(config.eval_path)
    train_dir, eval_dir = folder_splits(_require_path(config))
    if eval_dir is not None:
        return load(train_dir if split == "train" else eval_dir)
    train, held_out = split_dataset(load(train_dir), config.eval_fraction)
    return train if split == "train" else held_out


def load_image_dataset(config, split: str) -> ImageDataset:
    """The ``train`` or ``eval`` split named by the config."""
    name = config.name
    if name == "digits":
        return load_digits("train" if split == "train" else "test")
    if name == "cifar":
        return load_cifar(_require_path(config), "train" if split == "train" else "test")
    if name == "image_folder":
        return _folder(config, split)
    path = _require_path(config) if split == "train" else (config.eval_path or None)
    if path is None:
        raise ValueError(f"data.name={name!r} needs data.eval_path=<location> for evaluation")
    if name == "npz":
        return load_npz(path)
    raise ValueError(
        f"data.name={name!r} is not an image source; accepted: "
        "['digits', 'npz', 'image_folder', 'cifar']"
    )


def class_names(config) -> tuple[str, ...]:
    """The class names of the configured training data (``data.class_names`` when set)."""
    if config.class_names:
        return tuple(config.class_names)
    if config.name == "image_folder":
        train_dir, _ = folder_splits(_require_path(config))
        names = tuple(sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir()))
        if names:
            return names
    return load_image_dataset(config, "train").class_names


def make_data(config) -> tuple[Callable[[int], dict], Callable[[], Iterator[dict]]]:
    """``(train_batches, eval_iterator)``: batches as a pure function of the step, and a fresh
    iterator over the whole evaluation set (padded to fixed-size batches with a ``mask``)."""
    if config.name in _EXTRA_SOURCES:
        module, fn = _EXTRA_SOURCES[config.name].split(":")
        return getattr(importlib.import_module(module), fn)(config)
    holder: dict[str, ImageDataset] = {}

    def dataset(split: str) -> ImageDataset:
        if split not in holder:
            holder[split] = load_image_dataset(config, split)
        return holder[split]

    randaug = (config.randaug_layers, config.randaug_magnitude) if config.randaug_layers else None
    batches = _LazyTrainBatches(
        lambda: TrainBatches(
            dataset("train"),
            config.batch_size,
            seed=config.seed,
            crop_padding=config.crop_padding,
            flip=config.flip,
            inception_crop=config.inception_crop,
            randaug=randaug,
            mixup_alpha=config.mixup_alpha,
        )
    )

    def eval_iterator() -> Iterator[dict[str, np.ndarray]]:
        return eval_batches(dataset("eval"), config.eval_batch_size)

    eval_iterator.dataset = lambda: dataset("eval")  # type: ignore[attr-defined]
    return batches, eval_iterator


class _LazyTrainBatches:
    """Loads the training split at the first batch (evaluation and prediction never do)."""

    accepts_rows = True  # batches(step, rows=...) reads only those rows (one host's share)

    def __init__(self, build: Callable[[], TrainBatches]):
        self._build, self._batches = build, None

    def __call__(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._batches = self._build()
        return self._batches(step, rows)
