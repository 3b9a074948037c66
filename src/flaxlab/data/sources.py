"""Image data sources: bundled digits, a folder of images, CIFAR python batches, ``.npz`` files.

Every source returns an :class:`ImageDataset`: uint8 NHWC images and int32 labels held in
memory, plus the class names. Transforms (scaling to [-1, 1], augmentation) live in
:mod:`flaxlab.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

# The bundled digits split: scikit-learn's 1,797 8x8 digits, stratified, seed 0, 360 for test.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images (uint8, [N, H, W, C]) with integer labels ([N]; -1: unlabelled), class names and,
    for images read from files, their paths."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[str, ...] = ()

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape [N, H, W, C], got shape {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape [{self.images.shape[0]}], got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_digits(split: str = "train") -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits as uint8 images of shape [N, 8, 8, 1].

    The 17 grey levels (0..16) are mapped to 0..255 (``round(v * 255 / 16)``). The split is
    fixed: a stratified shuffle with seed 0 puts 360 images in ``test`` and 1,437 in ``train``.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"digits split {split!r} is unknown; accepted: ['train', 'test']")
    bunch: Any = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    return ImageDataset(np.ascontiguousarray(x), np.asarray(y), tuple(str(i) for i in range(10)))


def _read_image(file: Path, channels: int, image_size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    from flaxlab.data.augment import resize_center_crop

    with Image.open(file) as img:
        array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if image_size is not None and array.shape[:2] != tuple(image_size):
        array = resize_center_crop(array, image_size)
    return array


def load_image_file(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None, channels: int = 3
) -> np.ndarray:
    """One image file as uint8 ``[H, W, channels]``, resized (shorter side) and centre-cropped
    to ``image_size`` when given."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"image {str(file)!r} does not exist")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; accepted: [1, 3]")
    try:
        return _read_image(file, channels, image_size)
    except OSError as error:
        raise ValueError(f"image {str(file)!r} is not readable: {error}") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    channels: int = 3,
    class_names: tuple[str, ...] | None = None,
) -> ImageDataset:
    """A folder with one sub-folder per class (``root/<class>/<image>``, classes sorted by
    name), or a folder of images without classes (unlabelled: labels -1).

    Images are converted to ``channels`` (1 = greyscale, 3 = RGB) and, when ``image_size`` is
    given, resized (shorter side) and centre-cropped to it; otherwise all images must share one
    size. ``class_names`` (e.g. the training run's) fixes the label of each sub-folder name.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; accepted: [1, 3]")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        names = tuple(class_names) if class_names else tuple(classes)
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise ValueError(
                f"image folder {str(root)!r} has classes {unknown} the model does not know; "
                f"it knows {list(names)}"
            )
        entries = [(f, names.index(c)) for c in classes for f in _image_files(root / c)]
    else:
        names = tuple(class_names or ())
        entries = [(f, -1) for f in _image_files(root)]
    if not entries:
        raise ValueError(
            f"image folder {str(root)!r} has no images with extensions {IMAGE_EXTENSIONS}"
        )
    images = []
    for file, _ in entries:
        array = _read_image(file, channels, image_size)
        if images and array.shape != images[0].shape:
            raise ValueError(
                f"image {str(file)!r} has shape {array.shape} but earlier images have "
                f"{images[0].shape}; set data.image_size to resize them all"
            )
        images.append(array)
    labels = np.asarray([label for _, label in entries], np.int32)
    files = tuple(str(f) for f, _ in entries)
    return ImageDataset(np.stack(images), labels, names, files)


EVAL_SUBFOLDERS = ("test", "val", "validation")


def folder_splits(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(train folder, evaluation folder or None)``: a folder's ``train`` and ``test`` (or
    ``val``, ``validation``) sub-folders when it has them, else the folder itself and None."""
    root = Path(path)
    if (root / "train").is_dir():
        for name in EVAL_SUBFOLDERS:
            if (root / name).is_dir():
                return root / "train", root / name
    return root, None


def split_dataset(dataset: ImageDataset, fraction: float) -> tuple[ImageDataset, ImageDataset]:
    """``(train, eval)``: a fixed stratified hold-out (seed 0) of ``fraction`` of each class
    (at least one image of every class with two or more)."""
    rng = np.random.default_rng(0)
    held = np.zeros(len(dataset), bool)
    for label in np.unique(dataset.labels):
        members = np.flatnonzero(dataset.labels == label)
        if len(members) < 2:
            continue
        count = max(1, int(round(fraction * len(members))))
        held[rng.permutation(members)[:count]] = True
    if not held.any():
        raise ValueError("the image folder is too small to hold out an evaluation split")

    def part(mask):
        files = tuple(np.asarray(dataset.files)[mask]) if dataset.files else ()
        return ImageDataset(dataset.images[mask], dataset.labels[mask], dataset.class_names, files)

    return part(~held), part(held)


# What the official CIFAR python batches contain besides builtins (dicts, lists, bytes, str,
# ints): NumPy arrays (and integer scalars, as re-pickled copies hold), through these names.
# Nothing else may be loaded.
_CIFAR_PICKLE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the official archive's batches and refuses any other global (a crafted batch
    can name ``os.system`` and a plain ``pickle.load`` would call it)."""

    def __init__(self, file, name: str):
        super().__init__(file, encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(
            f"CIFAR batch {self.name!r} is not an official CIFAR batch: it asks to load "
            f"{module}.{name}, and only dicts, lists, bytes, str, ints and NumPy arrays are read"
        )


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(file, "rb") as f:
        try:
            batch = _CifarUnpickler(f, str(file)).load()
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as error:
            raise ValueError(f"CIFAR batch {str(file)!r} is not readable: {error}") from None
    if not isinstance(batch, dict) or b"data" not in batch:
        raise ValueError(f"CIFAR batch {str(file)!r} is not a dict with a 'data' entry")
    data = batch[b"data"]
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if labels is None:
        raise ValueError(f"CIFAR batch {str(file)!r} has no 'labels' or 'fine_labels' entry")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"CIFAR batch {str(file)!r}: 'data' must be a uint8 [N, 3072] array")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(labels, np.int32)


def load_cifar(path: str | os.PathLike, split: str = "train") -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the python-pickle batches of the official archive.

    ``path`` is the extracted folder (``cifar-10-batches-py`` with ``data_batch_1..5`` and
    ``test_batch``, or ``cifar-100-python`` with ``train`` and ``test``).
    """
    root = Path(path)
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split {split!r} is unknown; accepted: ['train', 'test']")
    if (root / "test_batch").exists():
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        names = [f"class_{i}" for i in range(10)]
    elif (root / "test").exists():
        files = [root / split]
        names = [f"class_{i}" for i in range(100)]
    else:
        raise ValueError(
            f"{str(root)!r} holds no CIFAR python batches (expected data_batch_*/test_batch "
            "for CIFAR-10 or train/test for CIFAR-100)"
        )
    if not files:
        raise ValueError(f"{str(root)!r} has no CIFAR {split} batches")
    parts = [_read_cifar_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(images, labels, tuple(names))


def load_npz(
    path: str | os.PathLike, image_key: str = "image", label_key: str = "label"
) -> ImageDataset:
    """Arrays from an ``.npz`` file: uint8 images [N, H, W, C] (or [N, H, W]) and int labels."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f".npz file {str(file)!r} does not exist")
    with np.load(file, allow_pickle=False) as arrays:
        for key in (image_key, label_key):
            if key not in arrays:
                raise ValueError(
                    f"{str(file)!r} has no array {key!r}; it holds {sorted(arrays.files)}"
                )
        images, labels = arrays[image_key], arrays[label_key]
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        raise ValueError(
            f"{str(file)!r}: images must be uint8 in [0, 255], got dtype {images.dtype}"
        )
    labels = labels.astype(np.int32)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    return ImageDataset(images, labels, tuple(str(i) for i in range(num_classes)))
