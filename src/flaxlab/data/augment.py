"""AugReg augmentation and regularisation in NumPy and PIL: Inception crop, RandAugment, Mixup.

This reimplements, without TensorFlow, the training-time input pipeline of the AugReg paper
("How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers",
Steiner et al. 2021) as released in google-research/big_vision:

* ``decode_jpeg_and_inception_crop(224)|flip_lr|randaug(l, m)`` for training
  (``big_vision/configs/vit_i1k.py``), :func:`augment_batch` here;
* ``resize_small(256)|central_crop(224)`` for evaluation, :func:`resize_center_crop`;
* Mixup as ``big_vision/utils.py::get_mixup``, :func:`mixup`;
* the seven named settings ``none, light1, light2, medium1, medium2, strong1, strong2``,
  :data:`AUGREG_SETTINGS`.

Conventions follow :mod:`flaxlab.data.pipeline`: images are uint8 ``[H, W, C]`` or
``[N, H, W, C]`` in [0, 255] with ``C`` = 1 (greyscale) or 3 (RGB); every random choice is drawn
from a caller-supplied ``numpy.random.Generator``, so results are a pure function of the
generator's state (a batch is a pure function of ``(seed, step)`` when the caller seeds the
generator with them).

The RandAugment operations reproduce ``big_vision/pp/autoaugment.py`` (a fork of
tensorflow/tpu ``efficientnet/autoaugment.py``, run with TensorFlow and tensorflow_addons)
value for value, including its float32 arithmetic (up to the summation order of TensorFlow's
kernels: Sharpness and Color can rarely truncate one grey level apart), truncating uint8
casts, nearest-neighbour geometry with grey (128) fill and three well-known quirks of that
code that the released AugReg models were trained with (each is documented at its op):
``contrast`` blends towards ``H * W / 256`` instead of the mean grey level (big_vision issue
#109), ``solarize`` compares against its threshold cast to uint8, so a threshold of 256 wraps
to 0 (issue #110), and ``posterize`` shifts by at most 7 bits (TensorFlow clamps shift
counts). Greyscale images are treated exactly as the RGB image with three equal channels
would be, then reduced back to one channel. Crop boxes follow the rule of
``tf.image.sample_distorted_bounding_box`` exactly; crops are resized with PIL (see
:func:`inception_crop` for how that differs from ``tf.image.resize``). The random choices
come from NumPy, not TensorFlow's generators: outputs match the reference in distribution,
and value for value given the same choices.
"""

from __future__ import annotations

import dataclasses
import math
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


# --------------------------------------------------------------------------------------------
# Colour operations.


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """The reference's ``blend``: ``image1 + factor * (image2 - image1)``, cast to uint8.

    ``factor`` 0 gives ``image1`` and 1 gives ``image2`` exactly. Otherwise the sum is formed in
    float32 (``difference = image2 - image1``, ``scaled = factor * difference``,
    ``temp = image1 + scaled``) and truncated to uint8, after clipping to [0, 255] when
    ``factor`` lies outside (0, 1) (extrapolation), as ``tf.cast`` does.

    Args:
        image1: uint8 array (the "degenerate" image of PIL's ImageEnhance).
        image2: uint8 array broadcastable with ``image1``.
        factor: the blend factor (>= 0 in the reference's uses).

    Returns:
        uint8 array of the broadcast shape.
    """
    image1, image2 = np.broadcast_arrays(np.asarray(image1), np.asarray(image2))
    factor = float(factor)
    if factor == 0.0:
        return image1.astype(np.uint8)
    if factor == 1.0:
        return image2.astype(np.uint8)
    a = image1.astype(_F32)
    temp = a + _F32(factor) * (image2.astype(_F32) - a)
    if 0.0 < factor < 1.0:
        return temp.astype(np.uint8)
    return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def _grey(batch: np.ndarray) -> np.ndarray:
    """``tf.image.rgb_to_grayscale`` of uint8 ``[N, H, W, C]`` as uint8 ``[N, H, W, 1]``.

    ``trunc(255.5 * sum_c w_c * (x_c / 255))`` in float32 with w = (0.2989, 0.5870, 0.1140); a
    one-channel image is taken as its three-equal-channel RGB version.
    """
    f = batch.astype(_F32) * _F32(1.0 / 255.0)
    r, g, b = (f[..., 0], f[..., 0], f[..., 0]) if batch.shape[-1] == 1 else np.moveaxis(f, -1, 0)
    grey = r * _GREY_WEIGHTS[0] + g * _GREY_WEIGHTS[1] + b * _GREY_WEIGHTS[2]
    return (grey * _F32(255.5)).astype(np.uint8)[..., None]


def autocontrast(image: np.ndarray) -> np.ndarray:
    """AutoContrast: stretch each channel linearly so its minimum maps to 0 and maximum to 255.

    Per image and channel with ``lo < hi``: ``trunc(clip(x * s + o, 0, 255))`` with
    ``s = 255 / (hi - lo)`` and ``o = -lo * s`` in float32; a constant channel is unchanged.
    As the reference's ``autocontrast`` (PIL ``ImageOps.autocontrast`` with ``cutoff=0``, except
    that PIL rounds through a lookup table where the reference truncates).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    lo = batch.min(axis=(1, 2), keepdims=True).astype(_F32)
    hi = batch.max(axis=(1, 2), keepdims=True).astype(_F32)
    stretch = hi > lo
    scale = _F32(255.0) / np.where(stretch, hi - lo, _F32(1.0))
    offset = -lo * scale
    scaled = np.clip(batch.astype(_F32) * scale + offset, 0.0, 255.0).astype(np.uint8)
    return _unbatch(np.where(stretch, scaled, batch), single)


def equalize(image: np.ndarray) -> np.ndarray:
    """Equalize: histogram equalisation per channel, as PIL ``ImageOps.equalize``.

    With ``h`` the 256-bin histogram of a channel and ``last`` the count of its highest
    occupied bin, ``step = (sum(h) - last) // 255``; if ``step == 0`` the channel is unchanged,
    otherwise ``lut[0] = 0``, ``lut[v] = min((cumsum(h)[v - 1] + step // 2) // step, 255)``
    and ``x -> lut[x]``. Integer arithmetic, identical to the reference and to PIL.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n, h, w, c = batch.shape
    planes = np.moveaxis(batch, -1, 1).reshape(n * c, h * w).astype(np.int64)
    rows = np.arange(n * c)[:, None]
    hist = np.bincount((rows * 256 + planes).ravel(), minlength=n * c * 256).reshape(n * c, 256)
    last_bin = 255 - np.argmax(hist[:, ::-1] > 0, axis=1)
    last = hist[np.arange(n * c), last_bin]
    step = (hist.sum(axis=1) - last) // 255
    safe = np.maximum(step, 1)[:, None]
    lut = (np.cumsum(hist, axis=1) + safe // 2) // safe
    lut = np.clip(np.concatenate([np.zeros((n * c, 1), np.int64), lut[:, :-1]], axis=1), 0, 255)
    mapped = np.take_along_axis(lut, planes, axis=1)
    out = np.where((step == 0)[:, None], planes, mapped).astype(np.uint8)
    return _unbatch(np.moveaxis(out.reshape(n, c, h, w), 1, -1), single)


def invert(image: np.ndarray) -> np.ndarray:
    """Invert: ``255 - x``.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    return _unbatch(255 - batch, single)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Posterize: keep the ``bits`` most significant bits, ``(x >> s) << s`` with ``s = 8 - bits``.

    The reference shifts with ``tf.bitwise.right_shift``/``left_shift``, which cast the count to
    uint8 and whose kernels clamp it to [0, 7]: ``s = min((8 - bits) mod 256, 7)``. So
    ``bits = 0`` (magnitude < 2.5) keeps one bit, not none (PIL's ``posterize`` would give
    black); ``bits = 8`` (magnitude 20 to 22.4) is the identity; ``bits > 8`` (a negative count
    that wraps to >= 248) keeps one bit again.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        bits: number of bits to keep (``int(magnitude / 10 * 4)`` in RandAugment).

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    shift = np.uint8(min((8 - int(bits)) % 256, 7))
    return _unbatch((batch >> shift) << shift, single)


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Solarize: ``x`` where ``x < t``, else ``255 - x``, with ``t = threshold mod 256``.

    The reference compares the uint8 image with a Python int, which TensorFlow casts to uint8:
    RandAugment's threshold ``int(magnitude / 10 * 256)`` is 256 at magnitude 10 and wraps to 0,
    inverting every pixel (big_vision issue #110 checks this in TensorFlow); 384 (magnitude 15)
    wraps to 128 and 512 (magnitude 20) to 0. PIL's ``solarize(image, 256)`` would instead be
    the identity; the reference's wrap-around is what the AugReg models saw.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        threshold: non-negative int.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    t = np.uint8(int(threshold) % 256)
    return _unbatch(np.where(batch < t, batch, 255 - batch), single)


def solarize_add(image: np.ndarray, addition: int = 0, threshold: int = 128) -> np.ndarray:
    """SolarizeAdd: ``clip(x + addition, 0, 255)`` where ``x < threshold``, else ``x``.

    The sum is formed in int64 as in the reference; ``threshold`` is taken mod 256 like
    :func:`solarize` (the reference always uses 128).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        addition: int added to the dark pixels (``int(magnitude / 10 * 110)`` in RandAugment).
        threshold: pixels below it are changed.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    added = np.clip(batch.astype(np.int64) + int(addition), 0, 255).astype(np.uint8)
    t = np.uint8(int(threshold) % 256)
    return _unbatch(np.where(batch < t, added, batch), single)


def color(image: np.ndarray, factor: float) -> np.ndarray:
    """Color (saturation): ``blend(grey(x), x, factor)``, ``grey`` as ``tf.image.rgb_to_grayscale``.

    ``grey = trunc(255.5 * (0.2989 r + 0.5870 g + 0.1140 b) / 255)`` in float32, replicated to
    every channel. PIL's ``ImageEnhance.Color`` uses ITU-R 601 weights (299, 587, 114)/1000
    with rounding and blends with rounding; the reference's values differ from PIL's by at most
    a grey level or two, and are reproduced here. For a greyscale image the grey image equals
    the image, so Color is the identity (as in PIL).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        factor: 0 gives the grey image, 1 the image; > 1 boosts saturation.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    return _unbatch(blend(_grey(batch), batch, factor), single)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Contrast: ``blend(d, x, factor)`` with the reference's constant degenerate image ``d``.

    The reference means to blend towards the mean grey level (PIL ``ImageEnhance.Contrast``)
    but computes ``mean = sum(histogram) / 256``, the pixel count ``H * W`` divided by 256
    (big_vision issue #109, tensorflow/tpu issue #1057; still in big_vision at this writing).
    That value, clipped to [0, 255] and truncated, is reproduced here because the AugReg models
    were trained with it: 196 for 224x224 images, 4 for 32x32, 0 for 8x8 (where Contrast acts
    as Brightness).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        factor: 0 gives the constant image, 1 the image.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    mean = _F32(batch.shape[1] * batch.shape[2]) / _F32(256.0)
    degenerate = np.uint8(np.clip(mean, 0.0, 255.0))
    return _unbatch(blend(np.full_like(batch, degenerate), batch, factor), single)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Brightness: ``blend(0, x, factor)``, i.e. ``trunc(clip(factor * x, 0, 255))`` in float32.

    PIL's ``ImageEnhance.Brightness`` rounds where the reference truncates.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        factor: 0 gives black, 1 the image.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    return _unbatch(blend(np.zeros_like(batch), batch, factor), single)


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Sharpness: ``blend(s, x, factor)`` with ``s`` the image smoothed by PIL's SMOOTH kernel.

    ``s`` is the 'valid' 3x3 convolution with ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``
    (float32, clipped, truncated) inside a one-pixel border that keeps the original pixels, as
    the reference's depthwise convolution and as PIL's ``ImageEnhance.Sharpness`` (which
    rounds). TensorFlow's convolution may sum the nine products in another order, so a
    truncation can rarely land one grey level apart. Images under 3x3 are unchanged.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        factor: 0 gives the smoothed image, 1 the image, > 1 sharpens.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    _, h, w, _ = batch.shape
    if h < 3 or w < 3:
        return _unbatch(batch.copy(), single)
    x = batch.astype(_F32)
    k1, k5 = _F32(1.0) / _F32(13.0), _F32(5.0) / _F32(13.0)
    acc = np.zeros_like(x[:, 1:-1, 1:-1])
    for dy in range(3):
        for dx in range(3):
            acc = acc + x[:, dy : h - 2 + dy, dx : w - 2 + dx] * (k5 if dy == dx == 1 else k1)
    smooth = batch.copy()
    smooth[:, 1:-1, 1:-1] = np.clip(acc, 0.0, 255.0).astype(np.uint8)
    return _unbatch(blend(smooth, batch, factor), single)


# --------------------------------------------------------------------------------------------
# Geometric operations (tensorflow_addons ``transform`` with wrap/unwrap, nearest neighbour).


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """``std::round`` (half away from zero) of float32 values, as int64.

    Computed in float64, where adding +-0.5 to a float32 value is exact (a float32 sum could
    round 0.49999997 + 0.5 up to 1).
    """
    v = v.astype(np.float64)
    return np.trunc(v + np.copysign(0.5, v)).astype(np.int64)


def _transform(batch: np.ndarray, matrices: np.ndarray, replace: int) -> np.ndarray:
    """Projective transform with nearest-neighbour sampling and constant fill.

    ``matrices`` is ``[N, 6]`` float32 ``(a0, a1, a2, b0, b1, b2)``: output pixel (column x,
    row y) reads input ``(round(a0 x + a1 y + a2), round(b0 x + b1 y + b2))`` (float32 products
    and sums, ``std::round``), as TensorFlow's ``ImageProjectiveTransformV3`` kernel; inputs
    outside the image become ``replace`` in every channel (the reference's ``wrap``/``unwrap``
    with an all-ones extra channel).
    """
    n, h, w, c = batch.shape
    grid = np.indices((h, w), dtype=_F32).reshape(2, 1, h * w)
    ys, xs = grid[0], grid[1]
    m = matrices.astype(_F32)
    in_x = _round_half_away(m[:, 0:1] * xs + m[:, 1:2] * ys + m[:, 2:3])  # [n, h*w]
    in_y = _round_half_away(m[:, 3:4] * xs + m[:, 4:5] * ys + m[:, 5:6])
    inside = (in_x.astype(np.uint64) < w) & (in_y.astype(np.uint64) < h)  # negatives wrap high
    flat = np.where(inside, in_y * w + in_x, 0)
    gathered = np.take_along_axis(batch.reshape(n, h * w, c), flat[:, :, None], axis=1)
    out = np.where(inside[:, :, None], gathered, np.uint8(replace))
    return out.reshape(n, h, w, c)


def _affine_rows(n: int, a0, a1, a2, b0, b1, b2) -> np.ndarray:
    rows = np.empty((n, 6), _F32)
    for j, value in enumerate((a0, a1, a2, b0, b1, b2)):
        rows[:, j] = value
    return rows


def rotate(image: np.ndarray, degrees, replace: int = RANDAUG_REPLACE) -> np.ndarray:
    """Rotate about the image centre by ``degrees`` (counterclockwise for positive angles).

    As ``tfa.image.rotate`` (nearest neighbour): with ``c = cos(theta)``, ``s = sin(theta)``,
    ``theta = degrees * pi / 180`` (float32), output pixel (x, y) reads input
    ``(c x - s y + ox, s x + c y + oy)`` with ``ox = ((W-1) - (c (W-1) - s (H-1))) / 2`` and
    ``oy = ((H-1) - (s (W-1) + c (H-1))) / 2``; uncovered pixels become ``replace``. PIL's
    ``rotate`` pivots at ``(W/2, H/2)`` instead; the reference's pivot is used here.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        degrees: scalar, or one angle per image ``[N]``.
        replace: fill value for uncovered pixels.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n, h, w, _ = batch.shape
    theta = (_per_image(degrees, n, "degrees") * (math.pi / 180.0)).astype(_F32)
    c, s = np.cos(theta), np.sin(theta)
    hm1, wm1 = _F32(h - 1), _F32(w - 1)
    ox = (wm1 - (c * wm1 - s * hm1)) / _F32(2.0)
    oy = (hm1 - (s * wm1 + c * hm1)) / _F32(2.0)
    return _unbatch(_transform(batch, _affine_rows(n, c, -s, ox, s, c, oy), replace), single)


def shear_x(image: np.ndarray, level, replace: int = RANDAUG_REPLACE) -> np.ndarray:
    """ShearX: output pixel (x, y) reads input ``(x + level * y, y)``; the rest is ``replace``.

    The reference's transform ``[1, level, 0, 0, 1, 0, 0, 0]`` (shear about the top-left
    corner, as PIL's ``Image.transform(AFFINE, (1, level, 0, 0, 1, 0))``), nearest neighbour.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        level: shear factor, scalar or ``[N]``.
        replace: fill value for uncovered pixels.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n = batch.shape[0]
    lv = _per_image(level, n, "level").astype(_F32)
    rows = _affine_rows(n, _F32(1), lv, _F32(0), _F32(0), _F32(1), _F32(0))
    return _unbatch(_transform(batch, rows, replace), single)


def shear_y(image: np.ndarray, level, replace: int = RANDAUG_REPLACE) -> np.ndarray:
    """ShearY: output pixel (x, y) reads input ``(x, level * x + y)``; the rest is ``replace``.

    The reference's transform ``[1, 0, 0, level, 1, 0, 0, 0]``, nearest neighbour.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        level: shear factor, scalar or ``[N]``.
        replace: fill value for uncovered pixels.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n = batch.shape[0]
    lv = _per_image(level, n, "level").astype(_F32)
    rows = _affine_rows(n, _F32(1), _F32(0), _F32(0), lv, _F32(1), _F32(0))
    return _unbatch(_transform(batch, rows, replace), single)


def translate_x(image: np.ndarray, pixels, replace: int = RANDAUG_REPLACE) -> np.ndarray:
    """TranslateX: output pixel (x, y) reads input ``(x + pixels, y)`` (content moves left).

    The reference calls ``tfa.image.translate(image, [-pixels, 0])``, whose transform
    ``[1, 0, pixels, 0, 1, 0, 0, 0]`` is sampled with nearest neighbour (``std::round``), as PIL's
    ``Image.transform(AFFINE, (1, 0, pixels, 0, 1, 0))``; vacated pixels become ``replace``.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        pixels: shift in pixels, scalar or ``[N]`` (need not be an integer).
        replace: fill value for vacated pixels.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n = batch.shape[0]
    p = _per_image(pixels, n, "pixels").astype(_F32)
    rows = _affine_rows(n, _F32(1), _F32(0), p, _F32(0), _F32(1), _F32(0))
    return _unbatch(_transform(batch, rows, replace), single)


def translate_y(image: np.ndarray, pixels, replace: int = RANDAUG_REPLACE) -> np.ndarray:
    """TranslateY: output pixel (x, y) reads input ``(x, y + pixels)`` (content moves up).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        pixels: shift in pixels, scalar or ``[N]``.
        replace: fill value for vacated pixels.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n = batch.shape[0]
    p = _per_image(pixels, n, "pixels").astype(_F32)
    rows = _affine_rows(n, _F32(1), _F32(0), _F32(0), _F32(0), _F32(1), p)
    return _unbatch(_transform(batch, rows, replace), single)


def cutout(image: np.ndarray, pad_size: int, center, replace: int = RANDAUG_REPLACE) -> np.ndarray:
    """Cutout: fill rows ``[cy - p, cy + p)`` by columns ``[cx - p, cx + p)`` with ``replace``.

    The window is clipped to the image (the reference pads a zero mask of that extent). In
    RandAugment ``p = int(magnitude / 10 * 40)`` and the centre is drawn uniformly from the
    pixel grid (``cy`` in [0, H), ``cx`` in [0, W)), as the reference's ``tf.random_uniform``.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``.
        pad_size: half the side of the square, ``p >= 0`` (0 leaves the image unchanged).
        center: ``(cy, cx)``, each a scalar or ``[N]``.
        replace: fill value.

    Returns:
        uint8 array of the same shape.
    """
    batch, single = _as_batch(image)
    n, h, w, _ = batch.shape
    if int(pad_size) < 0:
        raise ValueError(f"pad_size={pad_size} must be >= 0")
    if len(center) != 2:
        raise ValueError(f"center={center!r} is not supported; accepted: (cy, cx)")
    cy = _per_image(center[0], n, "center[0]").astype(np.int64)
    cx = _per_image(center[1], n, "center[1]").astype(np.int64)
    p = int(pad_size)
    rows = np.arange(h)[None, :]
    cols = np.arange(w)[None, :]
    in_rows = (rows >= np.maximum(cy - p, 0)[:, None]) & (rows < np.minimum(cy + p, h)[:, None])
    in_cols = (cols >= np.maximum(cx - p, 0)[:, None]) & (cols < np.minimum(cx + p, w)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return _unbatch(np.where(mask[..., None], np.uint8(replace), batch), single)


# --------------------------------------------------------------------------------------------
# RandAugment.


def level_to_arg(
    name: str,
    magnitude: float,
    *,
    translate_const: float = RANDAUG_TRANSLATE_CONST,
    cutout_const: float = RANDAUG_CUTOUT_CONST,
):
    """The argument the reference's ``level_to_arg`` gives op ``name`` at ``magnitude``.

    With ``l = magnitude / 10``: Rotate ``30 l`` degrees, ShearX/Y ``0.3 l``, TranslateX/Y
    ``translate_const * l`` pixels (these five are then negated with probability 1/2),
    Color/Contrast/Brightness/Sharpness ``1.8 l + 0.1``, Posterize ``int(4 l)`` bits, Solarize
    ``int(256 l)``, SolarizeAdd ``int(110 l)``, Cutout ``int(cutout_const * l)``;
    AutoContrast, Equalize and Invert take none (``None`` here).

    Args:
        name: one of :data:`RANDAUG_OPS`.
        magnitude: the RandAugment magnitude ``m`` (float; 10 is the reference's "max").
        translate_const: pixels of translation at magnitude 10 (reference: 100).
        cutout_const: Cutout half-size at magnitude 10 (reference: 40).

    Returns:
        The unsigned argument (float or int), or ``None``.
    """
    lv = float(magnitude) / MAX_LEVEL
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return lv * 30.0
    if name in ("ShearX", "ShearY"):
        return lv * 0.3
    if name in ("TranslateX", "TranslateY"):
        return lv * float(translate_const)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    if name == "Posterize":
        return int(lv * 4)
    if name == "Solarize":
        return int(lv * 256)
    if name == "SolarizeAdd":
        return int(lv * 110)
    if name == "Cutout":
        return int(lv * cutout_const)
    raise ValueError(f"RandAugment op {name!r} is unknown; accepted: {list(RANDAUG_OPS)}")


def _apply_op(name, batch, arg, sign, cy, cx, replace):
    """Applies op ``name`` to a uint8 batch; ``sign``, ``cy``, ``cx`` are per image."""
    if name == "AutoContrast":
        return autocontrast(batch)
    if name == "Equalize":
        return equalize(batch)
    if name == "Invert":
        return invert(batch)
    if name == "Posterize":
        return posterize(batch, arg)
    if name == "Solarize":
        return solarize(batch, arg)
    if name == "SolarizeAdd":
        return solarize_add(batch, arg)
    if name == "Color":
        return color(batch, arg)
    if name == "Contrast":
        return contrast(batch, arg)
    if name == "Brightness":
        return brightness(batch, arg)
    if name == "Sharpness":
        return sharpness(batch, arg)
    if name == "Cutout":
        return cutout(batch, arg, (cy, cx), replace)
    geometric = {
        "Rotate": rotate,
        "ShearX": shear_x,
        "ShearY": shear_y,
        "TranslateX": translate_x,
        "TranslateY": translate_y,
    }
    return geometric[name](batch, sign * arg, replace)


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    num_layers: int,
    magnitude: float,
    *,
    translate_const: float = RANDAUG_TRANSLATE_CONST,
    cutout_const: float = RANDAUG_CUTOUT_CONST,
    replace: int = RANDAUG_REPLACE,
) -> np.ndarray:
    """RandAugment as the reference's ``distort_image_with_randaugment(image, l, m)``.

    For each of ``num_layers`` layers, one op is drawn uniformly (with replacement across
    layers) from the 16 :data:`RANDAUG_OPS` and applied with the argument
    :func:`level_to_arg` gives at ``magnitude``; Rotate, ShearX/Y and TranslateX/Y negate it
    with probability 1/2, Cutout draws its centre uniformly over the pixels. The selected op is
    always applied: the reference samples a probability ``U(0.2, 0.8)`` per op but never uses
    it in RandAugment (only AutoAugment's ``_apply_func_with_prob`` does), so no probability
    gate is drawn here. A batch ``[N, H, W, C]`` gets independent draws per image.

    The reference's constants are absolute pixel counts meant for 224x224 images (translation
    100 px and Cutout half-size 40 px at magnitude 10); on small images they blank most of
    the image, so pass e.g. ``translate_const=100 / 224 * size`` and
    ``cutout_const=40 / 224 * size`` to keep the reference's relative strength.

    Random draws, in this order: op indices ``integers(0, 16, [N, L])``, negation flags
    ``random([N, L]) < 0.5``, Cutout centres ``integers(0, H, [N, L])`` then
    ``integers(0, W, [N, L])`` (all drawn whatever ops are chosen).

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``, C = 1 or 3.
        rng: the generator to draw from.
        num_layers: number of ops per image ``l >= 0``.
        magnitude: shared magnitude ``m >= 0`` (the reference's scale tops at 10 but is not
            clipped; AugReg uses 0, 10, 15, 20).
        translate_const: TranslateX/Y pixels at magnitude 10.
        cutout_const: Cutout half-size at magnitude 10.
        replace: fill value of the geometric ops and Cutout.

    Returns:
        uint8 array of the input's shape.
    """
    batch, single = _as_batch(image)
    _check_rng(rng)
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
        raise ValueError(f"num_layers={num_layers!r} must be an int >= 0")
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers} must be >= 0")
    if not np.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"magnitude={magnitude} must be a finite number >= 0")
    n, h, w, _ = batch.shape
    ops = rng.integers(0, len(RANDAUG_OPS), size=(n, num_layers))
    negate = rng.random((n, num_layers)) < 0.5
    cys = rng.integers(0, h, size=(n, num_layers))
    cxs = rng.integers(0, w, size=(n, num_layers))
    out = batch.copy()
    args = {
        name: level_to_arg(
            name, magnitude, translate_const=translate_const, cutout_const=cutout_const
        )
        for name in RANDAUG_OPS
    }
    for layer in range(num_layers):
        column = ops[:, layer]
        for k in np.unique(column):
            sel = np.flatnonzero(column == k)
            name = RANDAUG_OPS[int(k)]
            sign = np.where(negate[sel, layer], -1.0, 1.0)
            whole = len(sel) == n
            sub = out if whole else out[sel]
            res = _apply_op(name, sub, args[name], sign, cys[sel, layer], cxs[sel, layer], replace)
            if whole:
                out = res
            else:
                out[sel] = res
    return _unbatch(np.ascontiguousarray(out, dtype=np.uint8), single)


# --------------------------------------------------------------------------------------------
# Crops and resizing.


def _check_box_args(area_range, aspect_range, max_attempts) -> tuple[float, float, float, float]:
    try:
        lo_area, hi_area = (float(a) for a in area_range)
        lo_ratio, hi_ratio = (float(a) for a in aspect_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"area_range={area_range!r} and aspect_range={aspect_range!r} must be (min, max) pairs"
        ) from None
    if not 0.0 < lo_area <= hi_area <= 1.0:
        raise ValueError(f"area_range={area_range!r} must satisfy 0 < min <= max <= 1")
    if not 0.0 < lo_ratio <= hi_ratio:
        raise ValueError(f"aspect_range={aspect_range!r} must satisfy 0 < min <= max")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, (int, np.integer)):
        raise ValueError(f"max_attempts={max_attempts!r} must be an int >= 1")
    if max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts} must be >= 1")
    return lo_area, hi_area, lo_ratio, hi_ratio


def _uniform_int(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``floor(v k)`` for ``v ~ U[0, 1)``: uniform on ``{0, ..., k - 1}`` where ``k >= 1``."""
    return np.clip(np.floor(v * k), 0, np.maximum(k - 1, 0)).astype(np.int64)


def _rint(v: np.ndarray) -> np.ndarray:
    """``lrintf``: float32 to the nearest integer, ties to even."""
    return np.rint(v).astype(np.int64)


def sample_crop_boxes(
    rng: np.random.Generator,
    num: int,
    height: int,
    width: int,
    *,
    area_range: tuple[float, float] = INCEPTION_AREA_RANGE,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    max_attempts: int = INCEPTION_MAX_ATTEMPTS,
) -> np.ndarray:
    """Crop boxes as ``tf.image.sample_distorted_bounding_box`` draws them with no object boxes.

    Reproduces TensorFlow's ``GenerateRandomCrop`` (float32 arithmetic, ``lrintf`` rounding)
    for ``min_object_covered=0`` and ``use_image_if_no_bounding_boxes=True``, big_vision's
    call. Each attempt draws an aspect ratio ``r = a0 + u (a1 - a0)``, ``u ~ U[0, 1)`` float32
    (uniform, not log-uniform), then a height uniformly among the integers from
    ``rint(sqrt(A0 / r))`` to ``rint(sqrt(A1 / r))`` (lowered so that ``rint(h r) <= W`` and
    ``h <= H``), with ``A0, A1 = area_range * H * W``, and the width ``rint(h r)``; if rounding
    left the area ``w h`` below ``A0`` the height is raised by one, then if above ``A1`` lowered
    by one, and the attempt fails if the area is still outside ``[A0, A1]`` or the box does not
    fit. The offset is ``y ~ U{0, ..., H - h - 1}`` (0 when ``h = H``) and likewise ``x``:
    TensorFlow's exclusive upper bound means a crop shorter than the image never touches its
    bottom edge (narrower: its right edge), reproduced here. After ``max_attempts`` failed
    attempts the box is the whole image.

    The boxes of a batch are drawn together: each round draws, for every image still without a
    box, ``u`` (float32) then three float64 uniforms ``v``, and an integer uniform on
    ``{0, ..., k - 1}`` is ``floor(v k)``.

    Args:
        rng: the generator to draw from.
        num: number of boxes.
        height: image height ``H``.
        width: image width ``W``.
        area_range: ``(A0, A1)`` fractions of the image area, ``0 < A0 <= A1 <= 1``.
        aspect_range: ``(a0, a1)`` width/height ratios, ``0 < a0 <= a1``.
        max_attempts: attempts before falling back to the whole image.

    Returns:
        int64 ``[num, 4]``: ``(y, x, h, w)`` per box, offset and size.
    """
    _check_rng(rng)
    lo_area, hi_area, lo_ratio, hi_ratio = _check_box_args(area_range, aspect_range, max_attempts)
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} must be positive")
    min_area = _F32(_F32(lo_area) * _F32(width)) * _F32(height)
    max_area = _F32(_F32(hi_area) * _F32(width)) * _F32(height)
    ratio_span = _F32(hi_ratio) - _F32(lo_ratio)
    k_eps = float(_F32(1e-7))
    boxes = np.tile(np.array([0, 0, height, width], np.int64), (num, 1))
    pending = np.arange(num)
    for _ in range(max_attempts):
        if pending.size == 0:
            break
        m = pending.size
        ratio = rng.random(m, dtype=np.float32) * ratio_span + _F32(lo_ratio)
        v = rng.random((m, 3))
        h = _rint(np.sqrt(min_area / ratio))
        max_h = _rint(np.sqrt(max_area / ratio))
        too_wide = _rint(max_h.astype(_F32) * ratio) > width
        max_h = np.where(too_wide, ((width + 0.5 - k_eps) / ratio.astype(np.float64)), max_h)
        max_h = max_h.astype(np.int64)  # truncation, as the C++ int cast
        max_h -= too_wide & (_rint(max_h.astype(_F32) * ratio) > width)
        max_h = np.minimum(max_h, height)
        h = np.minimum(h, max_h)
        h += np.where(h < max_h, _uniform_int(v[:, 0], max_h - h + 1), 0)
        w = _rint(h.astype(_F32) * ratio)
        area = (w * h).astype(_F32)
        small = area < min_area
        h += small
        w = np.where(small, _rint(h.astype(_F32) * ratio), w)
        area = (w * h).astype(_F32)
        large = area > max_area
        h -= large
        w = np.where(large, _rint(h.astype(_F32) * ratio), w)
        area = (w * h).astype(_F32)
        ok = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height)
        ok &= (w > 0) & (h > 0)
        y = np.where(h < height, _uniform_int(v[:, 1], height - h), 0)
        x = np.where(w < width, _uniform_int(v[:, 2], width - w), 0)
        boxes[pending[ok]] = np.stack([y, x, h, w], axis=1)[ok]
        pending = pending[~ok]
    return boxes


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    area_range: tuple[float, float] = INCEPTION_AREA_RANGE,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    max_attempts: int = INCEPTION_MAX_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """One box of :func:`sample_crop_boxes`: ``(y, x, h, w)``.

    Args:
        rng: the generator to draw from.
        height: image height.
        width: image width.
        area_range: crop area as fractions of the image area.
        aspect_range: crop width/height ratio range.
        max_attempts: attempts before falling back to the whole image.

    Returns:
        ``(y, x, h, w)``: offset and size of the crop.
    """
    box = sample_crop_boxes(
        rng,
        1,
        height,
        width,
        area_range=area_range,
        aspect_range=aspect_range,
        max_attempts=max_attempts,
    )[0]
    return int(box[0]), int(box[1]), int(box[2]), int(box[3])


def _pil_resize(image: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Resizes one uint8 ``[H, W, C]`` image (C = 1 or 3) to ``size = (h, w)`` with PIL."""
    h, w, c = image.shape
    if (h, w) == tuple(size):
        return image.copy()
    from PIL import Image

    mode = "L" if c == 1 else "RGB"
    pil = Image.frombuffer(mode, (w, h), np.ascontiguousarray(image).tobytes(), "raw", mode, 0, 1)
    out = pil.resize((size[1], size[0]), resample)
    return np.frombuffer(out.tobytes(), np.uint8).reshape(size[0], size[1], c)


def inception_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size,
    *,
    area_range: tuple[float, float] = INCEPTION_AREA_RANGE,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    max_attempts: int = INCEPTION_MAX_ATTEMPTS,
) -> np.ndarray:
    """Inception-style random crop resized to ``size``, as big_vision's ``inception_crop``.

    The box is drawn by :func:`sample_crop_boxes` (area fraction in ``area_range``, default
    (0.05, 1.0); width/height ratio uniform in ``aspect_range``, default (0.75, 1.33); the
    whole image after ``max_attempts`` = 100 failed attempts) and the crop is resized to
    ``size`` with ``PIL.Image.resize(..., BILINEAR)`` (skipped when it already has ``size``).
    The reference resizes with ``tf.image.resize(method="bilinear", antialias=False)`` and
    truncates to uint8: PIL rounds (the reference is on average half a grey level darker)
    and, when shrinking, PIL's filter widens with the scale (antialiasing) where TensorFlow's
    does not; crops of an image already at the output size are only ever enlarged, where the
    two agree up to that rounding (and PIL's rounding between its two separable passes).

    Args:
        image: uint8 ``[H, W, C]``, C = 1 or 3.
        rng: the generator to draw from.
        size: output ``(height, width)`` or an int for a square.
        area_range: crop area as fractions of the image area.
        aspect_range: crop width/height ratio range.
        max_attempts: attempts before falling back to the whole image.

    Returns:
        uint8 ``[size_h, size_w, C]``.
    """
    batch, single = _as_batch(image)
    if not single:
        raise ValueError(
            f"image must have shape [H, W, C], got {batch.shape}; use inception_crop_batch"
        )
    return inception_crop_batch(
        batch,
        rng,
        size,
        area_range=area_range,
        aspect_range=aspect_range,
        max_attempts=max_attempts,
    )[0]


def inception_crop_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    size,
    *,
    area_range: tuple[float, float] = INCEPTION_AREA_RANGE,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    max_attempts: int = INCEPTION_MAX_ATTEMPTS,
) -> np.ndarray:
    """:func:`inception_crop` of every image of ``[N, H, W, C]`` (boxes drawn together).

    Args:
        images: uint8 ``[N, H, W, C]``, C = 1 or 3.
        rng: the generator to draw from.
        size: output ``(height, width)`` or an int.
        area_range: crop area as fractions of the image area.
        aspect_range: crop width/height ratio range.
        max_attempts: attempts before falling back to the whole image.

    Returns:
        uint8 ``[N, size_h, size_w, C]``.
    """
    batch, single = _as_batch(images, "images")
    if single:
        raise ValueError(f"images must have shape [N, H, W, C], got {batch.shape[1:]}")
    out_size = _size2(size)
    from PIL import Image

    n, h, w, c = batch.shape
    boxes = sample_crop_boxes(
        rng, n, h, w, area_range=area_range, aspect_range=aspect_range, max_attempts=max_attempts
    )
    out = np.empty((n, *out_size, c), np.uint8)
    for i, (y, x, ch, cw) in enumerate(boxes.tolist()):
        out[i] = _pil_resize(batch[i, y : y + ch, x : x + cw], out_size, Image.Resampling.BILINEAR)
    return out


def resize_center_crop(image: np.ndarray, size, resize_size: int | None = None) -> np.ndarray:
    """The evaluation transform ``resize_small(resize_size)|central_crop(size)``.

    ``resize_small(s)`` scales the image so its shorter side becomes ``s``, keeping the aspect
    ratio: ``factor = s / min(H, W)`` and new sides ``round(H * factor)``, ``round(W * factor)``
    (float32, round half to even, as ``tf.round``); it is skipped when the size is unchanged.
    ``central_crop`` then takes ``size`` at offset ``((H' - h) // 2, (W' - w) // 2)``. The
    reference resizes with ``method="area"`` (box averaging), here PIL's BOX filter; they agree
    when shrinking up to rounding (PIL rounds, TensorFlow truncates), while when enlarging PIL's
    box is nearest neighbour and TensorFlow's area method blends neighbours at the seams.
    AugReg evaluates ImageNet with ``resize_small(256)|central_crop(224)``.

    Args:
        image: uint8 ``[H, W, C]`` or ``[N, H, W, C]``, C = 1 or 3.
        size: crop ``(height, width)`` or an int for a square.
        resize_size: target shorter side; ``None`` uses the smallest that lets ``size`` fit,
            ``ceil(min(H, W) * max(h / H, w / W))`` (no resize for an image of shape ``size``).

    Returns:
        uint8 ``[size_h, size_w, C]`` (or ``[N, size_h, size_w, C]``).
    """
    from PIL import Image

    batch, single = _as_batch(image)
    crop_h, crop_w = _size2(size)
    n, h, w, c = batch.shape
    if resize_size is None:
        smaller = math.ceil(min(h, w) * max(crop_h / h, crop_w / w) - 1e-9)
    elif isinstance(resize_size, bool) or not isinstance(resize_size, (int, np.integer)):
        raise ValueError(f"resize_size={resize_size!r} must be a positive int or None")
    else:
        smaller = int(resize_size)
    if smaller < 1:
        raise ValueError(f"resize_size={resize_size!r} must be a positive int or None")
    factor = _F32(smaller) / _F32(min(h, w))
    new_h, new_w = int(np.round(_F32(h) * factor)), int(np.round(_F32(w) * factor))
    if new_h < crop_h or new_w < crop_w:
        raise ValueError(
            f"size={size!r} does not fit in the resized image {new_h}x{new_w}; "
            "accepted: a crop no larger than the resized image"
        )
    dy, dx = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    out = np.empty((n, crop_h, crop_w, c), np.uint8)
    for i in range(n):
        resized = _pil_resize(batch[i], (new_h, new_w), Image.Resampling.BOX)
        out[i] = resized[dy : dy + crop_h, dx : dx + crop_w]
    return _unbatch(out, single)


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
