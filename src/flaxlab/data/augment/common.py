"""Constants and argument checks shared by the augmentation modules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Constants of the reference (big_vision/pp/autoaugment.py).

MAX_LEVEL = 10.0
"""``_MAX_LEVEL``: magnitudes are divided by 10, with no clipping (so 15 and 20 extrapolate)."""

RANDAUG_TRANSLATE_CONST = 100
"""``HParams(translate_const=100)`` of ``distort_image_with_randaugment``: pixels at level 10."""

RANDAUG_CUTOUT_CONST = 40
"""``HParams(cutout_const=40)`` of ``distort_image_with_randaugment``: half-size at level 10."""

RANDAUG_REPLACE = 128
"""``replace_value = [128] * 3``: the grey that geometric ops and Cutout fill with."""

RANDAUG_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
"""``available_ops`` of ``distort_image_with_randaugment``, in the reference's order."""

NEGATED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
"""Ops whose argument ``_randomly_negate_tensor`` flips to negative with probability 1/2."""

INCEPTION_AREA_RANGE = (0.05, 1.0)
"""``get_inception_crop(area_min=5, area_max=100)`` of ``big_vision/pp/ops_image.py``."""

INCEPTION_ASPECT_RANGE = (0.75, 1.33)
"""``tf.image.sample_distorted_bounding_box``'s default ``aspect_ratio_range`` (also the
``ratio_min``/``ratio_max`` defaults of big_vision's ``decode_jpeg_and_inception_crop``)."""

INCEPTION_MAX_ATTEMPTS = 100
"""``tf.image.sample_distorted_bounding_box``'s default ``max_attempts``."""

_GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale
_F32 = np.float32


# --------------------------------------------------------------------------------------------
# Validation helpers.


def _as_batch(images: np.ndarray, what: str = "image") -> tuple[np.ndarray, bool]:
    """``images`` as a uint8 ``[N, H, W, C]`` batch, and whether it was a single image."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        batch, single = images[None], True
    elif images.ndim == 4:
        batch, single = images, False
    else:
        raise ValueError(
            f"{what} must have shape [H, W, C] or [N, H, W, C], got shape {images.shape}"
        )
    if batch.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels, got shape {images.shape}")
    if batch.shape[1] < 1 or batch.shape[2] < 1:
        raise ValueError(f"{what} must have a positive height and width, got {images.shape}")
    return batch, single


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng={rng!r} is not supported; accepted: a numpy.random.Generator (default_rng)"
        )


def _unbatch(batch: np.ndarray, single: bool) -> np.ndarray:
    return batch[0] if single else batch


def _per_image(value, n: int, what: str) -> np.ndarray:
    """A scalar or ``[n]`` argument as an ``[n]`` float64 array."""
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
        return np.full(n, float(array))
    if array.shape != (n,):
        raise ValueError(f"{what} must be a scalar or have shape [{n}], got shape {array.shape}")
    return array


def _size2(size, what: str = "size") -> tuple[int, int]:
    """An int or an ``(h, w)`` pair of positive ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what}={size!r} is not supported; accepted: an int or (height, width)")
    if min(pair) < 1:
        raise ValueError(f"{what}={size!r} must be positive")
    return pair
