"""Amos: Adam-style scaling with adaptive weight decay towards a model-oriented scale.

Amos (Tian & Parikh, 2022, https://arxiv.org/abs/2210.11693) keeps, for every parameter
``theta``, a running mean ``v`` of squared gradients and a decay state ``b``, both of a
possibly reduced "slot" shape. At step ``t`` (1-based), with the global learning rate ``xi``
(the schedule evaluated at ``t``) and the parameter's expected entry scale ``eta``::

    g2    = mean(g**2 over the axes where the slot has size 1)
    v     = beta * v + (1 - beta) * g2
    r     = (1 - beta**t) / max(v, epsilon)
    gamma = xi**2 * r * g2 / sqrt(1 + c_coef * sqrt(xi) * b_old)
    lr0   = xi * eta
    d     = 1 / (1 + d_coef * sqrt(lr0) * b_old)
    u     = -d * ((gamma / 2 + extra_l2) * theta + lr0 * sqrt(r) * g)
    b     = b_old + gamma * (1 + b_old)

``u`` is additive (``optax.apply_updates`` adds it). :func:`amos` optionally clips ``g``
elementwise to ``[-clip_value, clip_value]`` before these steps and returns the momentum
``m = momentum * m + (1 - momentum) * u`` (no bias correction) instead of ``u``. These are
the numbers of google-research/jestimator ``amos.py``; beyond it:

* slots (``v``, ``b`` and the momentum) are kept in float32 for bfloat16/float16 parameters,
  and ``epsilon`` is raised to the smallest normal of the slot dtype, so zero-gradient rows do
  not give ``0 * inf = NaN`` (the reference's ``2**-125`` underflows to 0 in float16);
* ``shape_fn`` results and ``eta_fn`` values are validated at ``init`` with errors that name
  the parameter;
* clip, Amos and momentum run as one fused elementwise pass per parameter.

Leaves of any pytree (nested dicts, lists, ``nnx.State``) are named by their path as a tuple
of strings: dict keys, list indices as ``str(i)``, attribute names; an ``nnx.Variable``
contributes no component of its own. A bare array is named ``()``.

The per-parameter rule helper and default rules live in :mod:`flaxlab.optim.amos_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Shape = tuple[int, ...]
ParamsFn = Callable[[tuple[str, ...], Shape], Any]
ScalarOrSchedule = float | optax.Schedule


class ScaleByAmosState(NamedTuple):
    """State of :func:`scale_by_amos` (same fields as the reference)."""

    count: jax.Array  # int32 scalar: number of updates done so far.
    v: optax.Updates  # running mean of squared gradients, slot shapes.
    b: optax.Updates  # decay state, slot shapes.


class AmosState(NamedTuple):
    """State of :func:`amos`: the Amos slots plus the momentum (``None`` without one)."""

    count: jax.Array
    v: optax.Updates
    b: optax.Updates
    momentum: optax.Updates | None


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def leaf_names(tree) -> list[tuple[str, ...]]:
    """Names of the array leaves of ``tree``, in ``jax.tree.leaves`` order.

    Example:
      >>> leaf_names({"dense": {"kernel": 1, "bias": 2}, "layers": [3]})
      [('dense', 'bias'), ('dense', 'kernel'), ('layers', '0')]
    """
    names = []
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        name = tuple(_key_name(k) for k in path)
        # An nnx.Variable is a node holding its value: its leaves share the Variable's name.
        names.extend([name] * len(jax.tree.leaves(node)))
    return names


def slot_dtype(param_dtype) -> jnp.dtype:
    """dtype of the Amos slots of a parameter: at least float32."""
    return jnp.promote_types(jnp.dtype(param_dtype), jnp.float32)


def safe_epsilon(epsilon: float, dtype) -> float:
    """``epsilon`` raised to the smallest normal number of ``dtype``.

    ``1 / max(v, eps)`` is then finite, so a zero gradient gives a zero update, never NaN.
    """
    return max(float(epsilon), float(jnp.finfo(dtype).tiny))


def _format_name(name: tuple[str, ...]) -> str:
    return "/".join(name) if name else "<root>"


def validated_slot_shape(name: tuple[str, ...], shape: Shape, slot_shape) -> Shape:
    """Checks a ``shape_fn`` result: ``()`` or, axis by axis, the parameter's size or 1."""
    try:
        result = tuple(int(s) for s in slot_shape)
        exact = all(int(s) == s for s in slot_shape)
    except (TypeError, ValueError):
        result, exact = None, False
    if result is not None and exact:
        if result == ():
            return result
        if len(result) == len(shape) and all(
            s in (k, 1) for s, k in zip(result, shape, strict=True)
        ):
            return result
    raise ValueError(
        f"shape_fn returned slot shape {slot_shape!r} for parameter {_format_name(name)!r} of "
        f"shape {tuple(shape)}; accepted: () for one scalar per tensor, or a tuple of "
        f"{len(shape)} ints where each is the parameter's size on that axis or 1 (reduced)"
    )


def validated_eta(name: tuple[str, ...], shape: Shape, eta) -> float:
    """Checks an ``eta_fn`` value: a finite number > 0."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"eta_fn returned {eta!r} for parameter {_format_name(name)!r} of shape "
            f"{tuple(shape)}; accepted: a finite number > 0 (the expected scale of its entries)"
        )
    return value


def _check_hyperparameters(learning_rate, beta, extra_l2, d_coef, c_coef, epsilon):
    if not callable(learning_rate):
        lr = float(learning_rate)
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"learning_rate must be > 0 or a schedule, got {learning_rate!r}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    for label, value in (("extra_l2", extra_l2), ("d_coef", d_coef), ("c_coef", c_coef)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")


def _build(
    learning_rate,
    eta_fn,
    shape_fn,
    beta,
    extra_l2,
    d_coef,
    c_coef,
    epsilon,
    clip_value,
    momentum,
    momentum_dtype,
    with_momentum_state,
):
    """Init and update functions shared by :func:`scale_by_amos` and :func:`amos`."""
    _check_hyperparameters(learning_rate, beta, extra_l2, d_coef, c_coef, epsilon)
    if not callable(eta_fn):
        raise ValueError(f"eta_fn must be a callable (name, shape) -> float, got {eta_fn!r}")
    if shape_fn is not None and not callable(shape_fn):
        raise ValueError(
            f"shape_fn must be None or a callable (name, shape) -> shape, got {shape_fn!r}"
        )

    def init_fn(params):
        treedef = jax.tree.structure(params)
        leaves = jax.tree.leaves(params)
        v_leaves, b_leaves, m_leaves = [], [], []
        for name, theta in zip(leaf_names(params), leaves, strict=True):
            shape = tuple(theta.shape)
            validated_eta(name, shape, eta_fn(name, shape))
            slot_shape = (
                shape
                if shape_fn is None
                else validated_slot_shape(name, shape, shape_fn(name, shape))
            )
            dtype = slot_dtype(theta.dtype)
            v_leaves.append(jnp.zeros(slot_shape, dtype))
            b_leaves.append(jnp.zeros(slot_shape, dtype))
            if momentum:
                m_leaves.append(jnp.zeros(shape, momentum_dtype or dtype))
        count = jnp.zeros([], jnp.int32)
        v, b = treedef.unflatten(v_leaves), treedef.unflatten(b_leaves)
        if not with_momentum_state:
            return ScaleByAmosState(count=count, v=v, b=b)
        m = treedef.unflatten(m_leaves) if momentum else None
        return AmosState(count=count, v=v, b=b, momentum=m)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("Amos needs the parameters: call update(grads, state, params)")
        treedef = jax.tree.structure(params)
        names = leaf_names(params)
        thetas = treedef.flatten_up_to(params)
        grads = treedef.flatten_up_to(updates)
        vs = treedef.flatten_up_to(state.v)
        bs = treedef.flatten_up_to(state.b)
        ms = treedef.flatten_up_to(state.momentum) if momentum else [None] * len(thetas)

        count = optax.safe_int32_increment(state.count)
        xi = learning_rate(count) if callable(learning_rate) else learning_rate
        out_u, out_v, out_b, out_m = [], [], [], []
        for name, g, theta, v, b, m in zip(names, grads, thetas, vs, bs, ms, strict=True):
            eta = validated_eta(name, tuple(theta.shape), eta_fn(name, tuple(theta.shape)))
            u, v, b, m = _amos_leaf(
                g,
                theta,
                v,
                b,
                m,
                count=count,
                xi=xi,
                eta=eta,
                beta=beta,
                extra_l2=extra_l2,
                d_coef=d_coef,
                c_coef=c_coef,
                epsilon=epsilon,
                clip_value=clip_value,
                momentum=momentum,
            )
            out_u.append(u)
            out_v.append(v)
            out_b.append(b)
            out_m.append(m)
        new_updates = treedef.unflatten(out_u)
        v, b = treedef.unflatten(out_v), treedef.unflatten(out_b)
        if not with_momentum_state:
            return new_updates, ScaleByAmosState(count=count, v=v, b=b)
        m = treedef.unflatten(out_m) if momentum else None
        return new_updates, AmosState(count=count, v=v, b=b, momentum=m)

    return optax.GradientTransformation(init_fn, update_fn)


def _reduced_axes(slot_shape: Sequence[int], shape: Sequence[int]) -> tuple[int, ...] | None:
    """Axes averaged over for ``g2``; ``None`` means all (a scalar slot)."""
    if len(slot_shape) == 0:
        return None
    return tuple(i for i, (s, k) in enumerate(zip(slot_shape, shape, strict=True)) if s < k)


def _amos_leaf(
    grad,
    theta,
    v,
    b,
    m,
    *,
    count,
    xi,
    eta,
    beta,
    extra_l2,
    d_coef,
    c_coef,
    epsilon,
    clip_value,
    momentum,
):
    """One parameter's clip -> Amos -> momentum, fused into a single elementwise pass.

    The slot-shaped quantities (``v``, ``b``, ``gamma``, ``d``, ``sqrt(r)``) are tiny for
    factored slots; they are folded into two coefficients so each parameter entry costs one
    multiply-add pair: ``u = theta_coef * theta + grad_coef * g``.
    """
    dtype = v.dtype
    g = grad.astype(dtype)
    if clip_value:
        g = jnp.clip(g, -clip_value, clip_value)
    axes = _reduced_axes(v.shape, g.shape)
    if axes is None:
        g2 = jnp.mean(jnp.square(g))
    elif axes:
        g2 = jnp.mean(jnp.square(g), axis=axes, keepdims=True)
    else:
        g2 = jnp.square(g)
    xi = jnp.asarray(xi, dtype)
    bias_correction = 1 - jnp.power(jnp.asarray(beta, dtype), count.astype(dtype))
    v = beta * v + (1 - beta) * g2
    r = bias_correction / jnp.maximum(v, safe_epsilon(epsilon, dtype))
    gamma = jax.lax.rsqrt(1 + c_coef * jnp.sqrt(xi) * b) * jnp.square(xi) * r * g2
    lr0 = xi * eta
    d = 1 / (1 + d_coef * jnp.sqrt(lr0) * b)
    theta_coef = -d * (0.5 * gamma + extra_l2)
    grad_coef = -d * lr0 * jnp.sqrt(r)
    u = theta_coef * theta.astype(dtype) + grad_coef * g
    b = b + gamma * (1 + b)
    if momentum:
        m_new = momentum * m.astype(dtype) + (1 - momentum) * u
        return m_new.astype(theta.dtype), v, b, m_new.astype(m.dtype)
    return u.astype(theta.dtype), v, b, None


def scale_by_amos(
    learning_rate: ScalarOrSchedule,
    eta_fn: ParamsFn,
    shape_fn: ParamsFn | None = None,
    beta: float = 0.999,
    extra_l2: float = 0.0,
    d_coef: float = 0.25,
    c_coef: float = 0.25,
    epsilon: float = 2.0**-125,
) -> optax.GradientTransformation:
    """Rescales gradients into Amos updates (no clip, no momentum); see the module docstring.

    Args:
      learning_rate: the global learning rate ``xi`` or a schedule, called with the 1-based
        step count. About ``1 / sqrt(number of independent batches)`` is recommended.
      eta_fn: ``(name, shape) -> float``, the expected scale of the parameter's entries.
      shape_fn: ``(name, shape) -> slot shape`` of ``v`` and ``b``: ``()`` for one scalar per
        tensor, or the parameter's shape with some axes set to 1 (averaged over). ``None``
        keeps full-size slots.
      beta: decay of the running mean of squared gradients.
      extra_l2: additional L2 decay rate (experimental in the reference).
      d_coef: coefficient of the learning-rate decay factor ``d``.
      c_coef: coefficient of the weight-decay decay factor ``c``.
      epsilon: floor on ``v`` (raised to the slot dtype's smallest normal).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAmosState`; the updates
      are additive.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = scale_by_amos(0.01, eta_fn=lambda name, shape: 1.0)
      >>> params = {"w": jnp.ones(3)}
      >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    """
    return _build(
        learning_rate,
        eta_fn,
        shape_fn,
        beta,
        extra_l2,
        d_coef,
        c_coef,
        epsilon,
        clip_value=None,
        momentum=None,
        momentum_dtype=None,
        with_momentum_state=False,
    )


def amos(
    learning_rate: ScalarOrSchedule,
    eta_fn: ParamsFn,
    shape_fn: ParamsFn | None = None,
    beta: float = 0.999,
    momentum: float | None = None,
    clip_value: float | None = None,
    extra_l2: float = 0.0,
    d_coef: float = 0.25,
    c_coef: float = 0.25,
    epsilon: float = 2.0**-125,
    *,
    momentum_dtype=None,
) -> optax.GradientTransformation:
    """The Amos optimizer: elementwise clip, :func:`scale_by_amos`, then momentum.

    Gives the numbers of ``optax.chain(optax.clip(clip_value), scale_by_amos(...),
    optax.ema(momentum, debias=False))`` (the reference's composition) in one fused pass per
    parameter. Paper settings for BERT-base: ``learning_rate`` 0.005 after a linear warmup,
    ``beta=0.999``, ``momentum=0.9``, ``clip_value=1.0``.

    Args:
      learning_rate, eta_fn, shape_fn, beta, extra_l2, d_coef, c_coef, epsilon: as in
        :func:`scale_by_amos`.
      momentum: decay of the moving average of updates; ``None`` or 0 for none.
      clip_value: clip gradients elementwise to ``[-clip_value, clip_value]`` before Amos;
        ``None`` or 0 for no clipping.
      momentum_dtype: dtype of the momentum slot; default: the parameter's dtype promoted to
        at least float32.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`AmosState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = amos(0.01, eta_fn=lambda name, shape: 0.5, shape_fn=lambda name, shape: (),
      ...           momentum=0.9, clip_value=1.0)
      >>> params = {"w": jnp.ones((2, 3))}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Tian & Parikh, "Amos: An Adam-style Optimizer with Adaptive Weight Decay towards
      Model-Oriented Scale", 2022, https://arxiv.org/abs/2210.11693
    """
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be None or in [0, 1), got {momentum!r}")
    if clip_value is not None and not (math.isfinite(clip_value) and clip_value >= 0):
        raise ValueError(f"clip_value must be None or a finite number >= 0, got {clip_value!r}")
    return _build(
        learning_rate,
        eta_fn,
        shape_fn,
        beta,
        extra_l2,
        d_coef,
        c_coef,
        epsilon,
        clip_value=clip_value or None,
        momentum=momentum or None,
        momentum_dtype=momentum_dtype,
        with_momentum_state=True,
    )
