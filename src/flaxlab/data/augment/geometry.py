"""RandAugment's geometric operations: rotate, shear, translate, cutout (nearest, grey fill)."""

from __future__ import annotations

import math

import numpy as np

from flaxlab.data.augment.common import (
    _F32,
    RANDAUG_REPLACE,
    _as_batch,
    _per_image,
    _unbatch,
)

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
