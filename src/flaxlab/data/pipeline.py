"""Deterministic batching and augmentation.

A training batch is a pure function of ``(seed, step)``: example ``i`` of the stream is position
``i mod N`` of the permutation of epoch ``i // N``, drawn from ``default_rng([seed, epoch])``,
and the augmentation of step ``s`` draws from ``default_rng([seed, s, 1])``. A resumed run
therefore sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from flaxlab.data.sources import ImageDataset


def to_float_images(images: np.ndarray) -> np.ndarray:
    """uint8 pixels in [0, 255] to float32 in [-1, 1] (the reference models' input range)."""
    return images.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Indices of the examples in training batch ``step`` (0-based)."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(seed, int(epoch), num_examples)[offsets[sel]]
    return out


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Zero-pads by ``padding`` pixels and crops back to the original size at a random offset."""
    if padding <= 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flips each image left-right with probability 1/2."""
    flip = rng.random(images.shape[0]) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


@dataclasses.dataclass(frozen=True)
class TrainBatches:
    """Training batches of a dataset as a pure function of the step.

    ``batches(step)`` returns ``{"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]}``
    and, with Mixup, ``"soft_label"`` float32 ``[B, classes]`` (the mixed one-hot labels; the
    images are mixed the same way, ``label`` stays each example's dominant class).
    Augmentations, in order: the padded random crop, then
    (:func:`flaxlab.data.augment.augment_batch`) the Inception crop, a flip and RandAugment, then
    Mixup; each draws from ``default_rng([seed, step, k])``.
    """

    dataset: ImageDataset
    batch_size: int
    seed: int = 0
    crop_padding: int = 0
    flip: bool = False
    inception_crop: bool = False
    randaug: tuple[int, int] | None = None
    mixup_alpha: float = 0.0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if len(self.dataset) == 0:
            raise ValueError("the training set is empty")

    def __call__(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batch of ``step``; ``rows``: only those rows of it (one host's share on
        several hosts). Without augmentation only those examples are read; augmentations
        draw for the whole batch in sequence, so with them the batch is built whole and
        sliced (every host's rows equal one process's)."""
        idx = batch_indices(self.seed, step, self.batch_size, len(self.dataset))
        plain = not (
            self.crop_padding or self.flip or self.inception_crop or self.randaug
        ) and not (self.mixup_alpha > 0)
        if rows is not None and plain:
            idx = idx[rows]
            return {
                "image": to_float_images(self.dataset.images[idx]),
                "label": self.dataset.labels[idx],
            }
        batch = self._augmented(step, idx)
        return batch if rows is None else {k: v[rows] for k, v in batch.items()}

    def _augmented(self, step: int, idx: np.ndarray) -> dict[str, np.ndarray]:
        from flaxlab.data.augment import augment_batch, mixup

        images = self.dataset.images[idx]
        labels = self.dataset.labels[idx]
        extended = self.inception_crop or self.randaug is not None
        if self.crop_padding or (self.flip and not extended):
            rng = np.random.default_rng([self.seed, step, 1])
            images = random_crop(images, rng, self.crop_padding)
            if self.flip and not extended:
                images = random_flip(images, rng)
        if extended:
            height = images.shape[1]
            images = augment_batch(
                images,
                np.random.default_rng([self.seed, step, 2]),
                inception_crop_size=images.shape[1:3] if self.inception_crop else None,
                flip=self.flip,
                randaug=self.randaug,
                # The reference's 100 and 40 pixels are for 224-pixel images.
                translate_const=100.0 * height / 224,
                cutout_const=40.0 * height / 224,
            )
        batch = {"image": to_float_images(images), "label": labels}
        if self.mixup_alpha > 0:
            classes = max(self.dataset.num_classes, int(labels.max()) + 1)
            onehot = np.eye(classes, dtype=np.float32)[labels]
            rng = np.random.default_rng([self.seed, step, 3])
            batch["image"], batch["soft_label"] = mixup(
                batch["image"], onehot, rng, self.mixup_alpha
            )
        return batch


def eval_batches(dataset: ImageDataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole dataset in order, in batches of one fixed size.

    The last batch is padded with copies of example 0; its ``mask`` marks the real examples, so
    summed metrics count every example exactly once and one compiled shape serves all batches.
    """
    n = len(dataset)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield {
            "image": to_float_images(dataset.images[idx]),
            "label": dataset.labels[idx],
            "mask": mask,
        }
