r"""Sharpness-aware gradients: SAM and GSAM, as pure functions usable with any optax optimizer.

SAM (Foret et al. 2021, "Sharpness-Aware Minimization", arXiv 2010.01412; for ViTs and
Mixers: Chen et al. 2021, arXiv 2106.01548) minimises the loss at the worst nearby point: with
the clean gradient ``g = grad f(w)`` and the global norm ``||g||`` over the whole tree,

.. math::
    e = \rho \frac{g}{\|g\| + \epsilon} \quad (\text{adaptive: } e = |w| \odot \rho
    \frac{g}{\|g\| + \epsilon}), \qquad g_r = \nabla f(w + e),

and steps with ``g_r``. GSAM (Zhuang et al. 2022, "Surrogate Gap Guided Sharpness-Aware
Minimization", arXiv 2203.08065) also descends the surrogate gap ``h = f(w + e) - f(w)``
along the part of ``g`` orthogonal to ``g_r``: with ``u = g_r / ||g_r||``,

.. math::
    g_{gsam} = g_r - \alpha\,(g - \langle g, u\rangle u).

``alpha = 0`` is SAM. The radius ``rho`` follows the learning rate between ``rho_min`` and
``rho_max`` (:func:`gsam_rho`). These match big_vision ``trainers/proj/gsam/gsam.py`` with
``minimize_fp=True``, and fix it: ``jax.tree_map`` (gone from current JAX) is not used, a zero
gradient gives the clean gradient instead of a division by a zero norm (NaN), and the
perturbation scope (per device, "m-sharpness", or over the global batch) is the caller's
explicit choice (the estimator's ``optimizer.sharpness_scope``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

SHARPNESS_KINDS = ("none", "sam", "gsam")


def _tree_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _tree_vdot(a, b) -> jax.Array:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    total = jnp.zeros((), jnp.float32)
    for x, y in pairs:
        total = total + jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
    return total


class SharpnessGradient(NamedTuple):
    """What a sharpness-aware gradient computes besides the gradient."""

    loss: jax.Array  # f(w), the clean loss
    grads: Any  # the sharpness-aware gradient
    perturbed_loss: jax.Array  # f(w + e)
    aux: Any  # the clean call's auxiliary output (None without has_aux)


def sharpness_gradient(
    loss_fn: Callable,
    params,
    *args,
    rho: float | jax.Array,
    alpha: float | jax.Array = 0.0,
    adaptive: bool = False,
    eps: float = 1e-12,
    has_aux: bool = False,
) -> SharpnessGradient:
    """GSAM's gradient with the clean and perturbed losses (``alpha = 0``: SAM's).

    Args:
      loss_fn: ``loss_fn(params, *args) -> loss`` (``(loss, aux)`` with ``has_aux``).
      params: a pytree of arrays.
      *args: the rest of ``loss_fn``'s arguments (the batch, keys, ...).
      rho: the perturbation radius.
      alpha: GSAM's weight on the surrogate-gap direction (0: SAM).
      adaptive: scale the perturbation by ``|params|`` (ASAM-style, as the reference's
        ``adaptive_perturbation``).
      eps: added to ``||g||`` in the perturbation.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the clean call's aux is returned.

    Returns:
      :class:`SharpnessGradient` ``(loss, grads, perturbed_loss, aux)``.
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    clean, g = value_and_grad(params, *args)
    loss, aux = clean if has_aux else (clean, None)
    g_norm = _tree_norm(g)
    scale = rho / (g_norm + eps)
    if adaptive:
        perturbed = jax.tree.map(lambda w, gi: w + jnp.abs(w) * scale * gi, params, g)
    else:
        perturbed = jax.tree.map(lambda w, gi: w + scale * gi, params, g)
    robust, g_r = value_and_grad(perturbed, *args)
    perturbed_loss = robust[0] if has_aux else robust
    g_r_norm = _tree_norm(g_r)
    # u = g_r / ||g_r||, or 0 when g_r = 0 (then g = 0 too and the result is the clean g).
    inv = jnp.where(g_r_norm > 0, 1.0 / jnp.where(g_r_norm > 0, g_r_norm, 1.0), 0.0)
    parallel = _tree_vdot(g, g_r) * inv * inv  # <g, u> / ||g_r||
    grads = jax.tree.map(
        lambda gr, gc: (gr - alpha * (gc - parallel * gr)).astype(gr.dtype), g_r, g
    )
    return SharpnessGradient(loss, grads, perturbed_loss, aux)


def sam_gradient(
    loss_fn: Callable,
    params,
    *args,
    rho: float | jax.Array,
    adaptive: bool = False,
    eps: float = 1e-12,
    has_aux: bool = False,
):
    """SAM: the gradient at ``params + rho g / (||g|| + eps)`` (adaptive: times ``|params|``).

    Returns ``(loss, grads)`` with the clean loss ``f(params)`` (``((loss, aux), grads)`` with
    ``has_aux``), like ``jax.value_and_grad``.

    Example:
      >>> loss, grads = sam_gradient(loss_fn, params, batch, rho=0.05)
      >>> updates, opt_state = tx.update(grads, opt_state, params)
    """
    out = sharpness_gradient(
        loss_fn, params, *args, rho=rho, alpha=0.0, adaptive=adaptive, eps=eps, has_aux=has_aux
    )
    return ((out.loss, out.aux) if has_aux else out.loss), out.grads


def gsam_gradient(
    loss_fn: Callable,
    params,
    *args,
    rho: float | jax.Array,
    alpha: float | jax.Array,
    adaptive: bool = False,
    eps: float = 1e-12,
    has_aux: bool = False,
):
    """GSAM: ``g_r - alpha (g - <g, u> u)`` with ``g_r`` SAM's gradient and ``u = g_r/||g_r||``.

    ``alpha`` weighs the descent of the surrogate gap (a constant, not a schedule value); with
    ``alpha = 0`` this is :func:`sam_gradient`. Returns ``(loss, grads)`` as that does.
    """
    out = sharpness_gradient(
        loss_fn, params, *args, rho=rho, alpha=alpha, adaptive=adaptive, eps=eps, has_aux=has_aux
    )
    return ((out.loss, out.aux) if has_aux else out.loss), out.grads


def gsam_rho(learning_rate, *, rho_max: float, rho_min: float, lr_max: float, lr_min: float):
    """GSAM's radius following the learning rate linearly:
    ``rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min)``; ``rho_max`` when
    ``lr_max == lr_min``."""
    if lr_max == lr_min:
        return jnp.asarray(rho_max, jnp.float32) + 0.0 * jnp.asarray(learning_rate)
    return rho_min + (rho_max - rho_min) * (learning_rate - lr_min) / (lr_max - lr_min)
