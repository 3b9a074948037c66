"""Inception crop (as ``tf.image.sample_distorted_bounding_box``) and the evaluation resize."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from flaxlab.data.augment.common import (
    _F32,
    INCEPTION_AREA_RANGE,
    INCEPTION_ASPECT_RANGE,
    INCEPTION_MAX_ATTEMPTS,
    _as_batch,
    _check_rng,
    _size2,
    _unbatch,
)

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
