"""The two pieces of the Amos update that run on every step, for :mod:`flaxlab.optim.amos`.

:func:`reduced_squares` gives the mean squared (clipped) gradient over each slot's reduced
axes, packed into one vector; :func:`packed_slot_update` runs the Amos slot maths on the packed
vectors of all parameters at once and returns the per-slot coefficients of the one
elementwise pass ``theta_coef * theta + grad_coef * clip(g)``. Both are written for the
fusion rules of XLA (see the comments); the maths is that of the module docstring of
:mod:`flaxlab.optim.amos`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def safe_epsilon(epsilon: float, dtype) -> float:
    """``epsilon`` raised to the smallest normal number of ``dtype``.

    ``1 / max(v, eps)`` is then finite, so a zero gradient gives a zero update, never NaN.
    """
    return max(float(epsilon), float(jnp.finfo(dtype).tiny))


def _reduced_axes(slot_shape: Sequence[int], shape: Sequence[int]) -> tuple[int, ...] | None:
    """Axes averaged over for ``g2``; ``None`` means all (a scalar slot)."""
    if len(slot_shape) == 0:
        return None
    return tuple(i for i, (s, k) in enumerate(zip(slot_shape, shape, strict=True)) if s < k)


_SMALL = 2**14  # entries; below this a tensor's clipped reduction runs unconditionally


def _sum_squares(g, axes):
    """Sum of ``g**2`` over ``axes`` (``None``: all, as one dot product)."""
    if axes is None:
        flat = g.reshape(-1)
        return jnp.dot(flat, flat, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.square(g), axis=axes)


def _clipped_sum_squares(g, sums=None, *, axes, clip_value):
    """Sum of ``clip(g)**2`` over ``axes`` (``None``: all); ``sums`` is unused (``lax.cond``)."""
    del sums
    return _sum_squares(jnp.clip(g, -clip_value, clip_value), axes)


def reduced_squares(grads, slot_shapes, dtype, clip_value):
    """The (clipped) gradients and the packed vector of ``g2`` (mean square over reduced axes).

    With a clip, every slot's plain sum of squares is computed first: XLA:CPU runs that as one
    fast reduction kernel, while the clipped form ``min(g**2, c**2)`` needs ``c**2`` broadcast
    to a full-size array first (about twice the cost). A float sum of non-negative terms is at
    least each of its terms, so where every slot of a parameter sums to at most ``c**2`` no
    entry reaches the clip and the plain sums are the clipped ones exactly; only parameters
    with a larger slot sum run the clipped reduction (``lax.cond``).
    """
    clipped, pieces = [], []
    for g, slot_shape in zip(grads, slot_shapes, strict=True):
        g = g.astype(dtype)
        axes = _reduced_axes(slot_shape, g.shape)
        if axes == ():  # full-size slot: no reduction
            g = jnp.clip(g, -clip_value, clip_value) if clip_value else g
            clipped.append(g)
            pieces.append(jnp.square(g).reshape(-1))
            continue
        if clip_value and g.size <= _SMALL:
            # Small tensors: the clipped reduction directly (a lax.cond costs more here).
            sums = _clipped_sum_squares(g, axes=axes, clip_value=clip_value)
            g = jnp.clip(g, -clip_value, clip_value)
        elif clip_value:
            sums = jax.lax.cond(
                jnp.max(_sum_squares(g, axes)) <= clip_value**2,
                lambda g, sums: sums,
                functools.partial(_clipped_sum_squares, axes=axes, clip_value=clip_value),
                g,
                _sum_squares(g, axes),
            )
            g = jnp.clip(g, -clip_value, clip_value)
        else:
            sums = _sum_squares(g, axes)
        count = g.size if axes is None else math.prod(g.shape[a] for a in axes)
        clipped.append(g)
        pieces.append((sums * (1.0 / max(count, 1))).reshape(-1))
    if not pieces:
        return clipped, jnp.zeros([0], dtype)
    return clipped, jnp.concatenate(pieces)


def packed_slot_update(
    g2, v, b, layout, *, count, xi, beta, extra_l2, d_coef, c_coef, epsilon, update_scale
):
    """Amos on the packed slot vectors of all parameters at once.

    Returns the new ``v`` and ``b`` and the two coefficients of the update
    ``update_scale * u = theta_coef * theta + grad_coef * g``. Doing this for every parameter
    in one vector keeps the per-parameter work to one reduction and one elementwise pass.
    """
    dtype = layout.dtype
    sizes = np.diff(layout.offsets)
    eta = jnp.asarray(np.repeat(np.asarray(layout.etas, np.float64), sizes), dtype)
    xi = jnp.asarray(xi, dtype)
    bias_correction = 1 - jnp.power(jnp.asarray(beta, dtype), count.astype(dtype))
    v = beta * v + (1 - beta) * g2
    r = bias_correction / jnp.maximum(v, safe_epsilon(epsilon, dtype))
    gamma = jax.lax.rsqrt(1 + c_coef * jnp.sqrt(xi) * b) * jnp.square(xi) * r * g2
    lr0 = xi * eta
    # Both coefficients end in a division by (1 + d_coef * sqrt(lr0) * b) = 1 / d: XLA:CPU
    # keeps such "expensive" results in memory instead of recomputing the whole chain of
    # slot maths for every entry of the broadcasting full-size pass.
    d_inverse = 1 + d_coef * jnp.sqrt(lr0) * b
    theta_coef = -update_scale * (0.5 * gamma + extra_l2) / d_inverse
    grad_coef = -update_scale * lr0 * jnp.sqrt(r) / d_inverse
    b = b + gamma * (1 + b)
    return v, b, theta_coef, grad_coef
