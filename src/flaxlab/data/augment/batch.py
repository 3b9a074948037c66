"""The training batch transform, Mixup, and the AugReg paper's named settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flaxlab.data.augment.common import (
    RANDAUG_CUTOUT_CONST,
    RANDAUG_TRANSLATE_CONST,
    _as_batch,
    _check_rng,
)
from flaxlab.data.augment.crops import (
    inception_crop_batch,
)
from flaxlab.data.augment.randaug import (
    rand_augment,
)

# --------------------------------------------------------------------------------------------
# Batch-level augmentation and Mixup.


def augment_batch(
    images_uint8: np.ndarray,
    rng: np.random.Generator,
    *,
    inception_crop_size=None,
    flip: bool = False,
    randaug: tuple[int, float] | None = None,
    translate_const: float = RANDAUG_TRANSLATE_CONST,
    cutout_const: float = RANDAUG_CUTOUT_CONST,
) -> np.ndarray:
    """The AugReg training transform ``inception_crop(size)|flip_lr|randaug(l, m)`` on a batch.

    Steps, each optional and in the reference's order (``big_vision/configs/vit_i1k.py``):
    :func:`inception_crop_batch` to ``inception_crop_size``; a left-right flip of each image
    with probability 1/2 (``tf.image.random_flip_left_right``; draws ``random(N) < 0.5``);
    :func:`rand_augment` with ``randaug = (num_layers, magnitude)``. The input is not modified.

    Args:
        images_uint8: uint8 ``[N, H, W, C]``, C = 1 or 3.
        rng: the generator to draw from (e.g. ``default_rng([seed, step, 1])``).
        inception_crop_size: output ``(height, width)`` or int; ``None`` skips the crop.
        flip: whether to flip left-right at random.
        randaug: ``(num_layers, magnitude)``, or ``None`` for no RandAugment.
        translate_const: RandAugment TranslateX/Y pixels at magnitude 10 (reference: 100).
        cutout_const: RandAugment Cutout half-size at magnitude 10 (reference: 40).

    Returns:
        uint8 ``[N, H', W', C]`` (``H', W'`` = ``inception_crop_size`` when given).
    """
    batch, single = _as_batch(images_uint8, "images_uint8")
    _check_rng(rng)
    if single:
        raise ValueError(f"images_uint8 must have shape [N, H, W, C], got {batch.shape[1:]}")
    if randaug is not None and (not isinstance(randaug, Sequence) or len(randaug) != 2):
        raise ValueError(f"randaug={randaug!r} is not supported; accepted: (layers, magnitude)")
    out = batch
    if inception_crop_size is not None:
        out = inception_crop_batch(out, rng, inception_crop_size)
    if flip:
        flips = rng.random(out.shape[0]) < 0.5
        out = np.where(flips[:, None, None, None], out[:, :, ::-1], out)
    if randaug is not None:
        out = rand_augment(
            out,
            rng,
            randaug[0],
            randaug[1],
            translate_const=translate_const,
            cutout_const=cutout_const,
        )
    if out is batch:
        out = batch.copy()
    return np.ascontiguousarray(out, dtype=np.uint8)


def mixup(
    images_float: np.ndarray, labels_onehot: np.ndarray, rng: np.random.Generator, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mixup as big_vision's ``utils.get_mixup``: one coefficient per batch, partners by roll.

    ``a ~ Beta(alpha, alpha)``, ``a = max(a, 1 - a)``, then ``x' = a x + (1 - a) roll(x, 1)``
    and ``y' = a y + (1 - a) roll(y, 1)`` along the batch axis (image ``i`` is mixed with image
    ``i - 1``). Because ``a >= 1/2`` each example keeps its own label as the larger weight;
    soft labels stay non-negative and sum to one when ``y`` does. big_vision applies it per
    device shard (``shard_map``), i.e. it rolls within each device's part of the batch; pass
    that part here to reproduce a multi-device run. ``alpha = 0`` (the settings ``none`` and
    ``light1``) returns copies of the inputs without drawing.

    Args:
        images_float: float ``[N, ...]`` (any affine pixel scale: mixing is linear).
        labels_onehot: float ``[N, K]`` one-hot or soft labels.
        rng: the generator to draw the coefficient from.
        alpha: Beta concentration (AugReg: 0, 0.2, 0.5, 0.8).

    Returns:
        ``(mixed_images, mixed_labels)`` with the inputs' shapes and float dtypes.
    """
    images = np.asarray(images_float)
    labels = np.asarray(labels_onehot)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images_float must be a float array, got dtype {images.dtype}")
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.floating):
        raise ValueError(
            f"labels_onehot must be a float [N, K] array, got {labels.dtype} {labels.shape}"
        )
    if images.ndim < 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images_float {images.shape} and labels_onehot {labels.shape} differ in batch size"
        )
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha={alpha} must be a finite number >= 0")
    _check_rng(rng)
    if alpha == 0:
        return images.copy(), labels.copy()
    a = float(rng.beta(alpha, alpha))
    a = max(a, 1.0 - a)

    def mix(x):
        return (x.dtype.type(a) * x + x.dtype.type(1.0 - a) * np.roll(x, 1, axis=0)).astype(x.dtype)

    return mix(images), mix(labels)


# --------------------------------------------------------------------------------------------
# The AugReg settings.


@dataclasses.dataclass(frozen=True)
class AugRegSetting:
    """One AugReg setting.

    Attributes:
        randaug_layers: RandAugment ``l``, or ``None`` for no RandAugment.
        randaug_magnitude: RandAugment ``m``, or ``None`` for no RandAugment.
        mixup_alpha: Mixup's Beta concentration; 0 means no Mixup.
        dropout_rate: dropout on the ViT's intermediate activations.
        stochastic_depth_rate: the largest stochastic-depth drop rate (the paper increases it
            linearly with depth up to this value).
    """

    randaug_layers: int | None
    randaug_magnitude: int | None
    mixup_alpha: float
    dropout_rate: float
    stochastic_depth_rate: float

    @property
    def randaug(self) -> tuple[int, int] | None:
        """``(layers, magnitude)`` for :func:`augment_batch`, or ``None``."""
        if self.randaug_layers is None or self.randaug_magnitude is None:
            return None
        return self.randaug_layers, self.randaug_magnitude


AUGREG_REGULARIZATION = 0.1
"""Dropout and stochastic depth of the paper's regularised runs (checkpoint names ``do_0.1-sd_0.1``
in google-research/vision_transformer); the unregularised runs use 0.0 (``do_0.0-sd_0.0``)."""

AUGREG_SETTINGS: dict[str, AugRegSetting] = {
    # RANDAUG_DEF and MIXUP_DEF of big_vision/configs/vit_i1k.py and vit_i21k.py; the named
    # settings carry no regularisation (vit_i1k.py: "This config does NOT include
    # regularization"); see augreg_setting(name, regularized=True) for the 0.1 variant.
    "none": AugRegSetting(None, None, 0.0, 0.0, 0.0),
    "light1": AugRegSetting(2, 0, 0.0, 0.0, 0.0),
    "light2": AugRegSetting(2, 10, 0.2, 0.0, 0.0),
    "medium1": AugRegSetting(2, 15, 0.2, 0.0, 0.0),
    "medium2": AugRegSetting(2, 15, 0.5, 0.0, 0.0),
    "strong1": AugRegSetting(2, 20, 0.5, 0.0, 0.0),
    "strong2": AugRegSetting(2, 20, 0.8, 0.0, 0.0),
}
"""The paper's seven augmentation settings (RandAugment ``(l, m)`` and Mixup ``alpha``).

Note ``light1`` = RandAugment(2, 0) is not the identity ("Actually not nothing!" in the
reference config): at magnitude 0 the enhance factors are 0.1, Solarize inverts (threshold 0),
Posterize keeps one bit, and AutoContrast/Equalize/Invert act in full."""


def augreg_setting(name: str, *, regularized: bool = False) -> AugRegSetting:
    """The AugReg setting ``name``, optionally with the paper's regularisation.

    Args:
        name: one of ``none, light1, light2, medium1, medium2, strong1, strong2``.
        regularized: if true, dropout and stochastic depth are 0.1 (the paper's "reg" runs)
            instead of 0.0.

    Returns:
        The :class:`AugRegSetting`.
    """
    if name not in AUGREG_SETTINGS:
        raise ValueError(f"AugReg setting {name!r} is unknown; accepted: {list(AUGREG_SETTINGS)}")
    setting = AUGREG_SETTINGS[name]
    if regularized:
        setting = dataclasses.replace(
            setting,
            dropout_rate=AUGREG_REGULARIZATION,
            stochastic_depth_rate=AUGREG_REGULARIZATION,
        )
    return setting
