"""Builds training and evaluation data from a data config (duck-typed ``DataConfig``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import numpy as np

from flaxlab.data.pipeline import TrainBatches, eval_batches
from flaxlab.data.sources import (
    ImageDataset,
    load_cifar,
    load_digits,
    load_image_folder,
    load_npz,
)

# Sources for non-image tasks register here: name -> "module:function", the function taking the
# data config and returning (train_batches(step) -> dict, eval_iterator_factory() -> Iterator).
_EXTRA_SOURCES: dict[str, str] = {"stdlib_text": "flaxlab.data.text:text_batches"}
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


def load_image_dataset(config, split: str) -> ImageDataset:
    """The ``train`` or ``eval`` split named by the config."""
    name = config.name
    if name == "digits":
        return load_digits("train" if split == "train" else "test")
    if name == "cifar":
        return load_cifar(_require_path(config), "train" if split == "train" else "test")
    path = _require_path(config) if split == "train" else (config.eval_path or None)
    if path is None:
        raise ValueError(f"data.name={name!r} needs data.eval_path=<location> for evaluation")
    if name == "npz":
        return load_npz(path)
    if name == "image_folder":
        return load_image_folder(path)
    raise ValueError(
        f"data.name={name!r} is not an image source; accepted: "
        "['digits', 'npz', 'image_folder', 'cifar']"
    )


def make_data(config) -> tuple[Callable[[int], dict], Callable[[], Iterator[dict]]]:
    """``(train_batches, eval_iterator)``: batches as a pure function of the step, and a fresh
    iterator over the whole evaluation set (padded to fixed-size batches with a ``mask``)."""
    if config.name in _EXTRA_SOURCES:
        module, fn = _EXTRA_SOURCES[config.name].split(":")
        return getattr(importlib.import_module(module), fn)(config)
    train = load_image_dataset(config, "train")
    batches = TrainBatches(
        train,
        config.batch_size,
        seed=config.seed,
        crop_padding=config.crop_padding,
        flip=config.flip,
    )
    holder: dict[str, ImageDataset] = {}

    def eval_iterator() -> Iterator[dict[str, np.ndarray]]:
        if "eval" not in holder:
            holder["eval"] = load_image_dataset(config, "eval")
        return eval_batches(holder["eval"], config.eval_batch_size)

    return batches, eval_iterator
