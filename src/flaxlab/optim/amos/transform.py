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

* slots (``v``, ``b`` and the momentum) are kept in float32 for bfloat16/float16 parameters
  (the packed ``v``/``b`` are float64 when any parameter is),
  and ``epsilon`` is raised to the smallest normal of the slot dtype, so zero-gradient rows do
  not give ``0 * inf = NaN`` (the reference's ``2**-125`` underflows to 0 in float16);
* ``shape_fn`` results and ``eta_fn`` values are validated at ``init`` with errors that name
  the parameter;
* speed: the slots of all parameters are packed into one vector (``state.v``, ``state.b``;
  :func:`unpack_slots` gives the trees back), so the slot maths of every parameter runs as a
  few small kernels in total instead of about ten per parameter. Per parameter there is one
  reduction for ``g2`` -- the plain sum of squares, which equals the clipped one exactly when
  no slot's sum exceeds ``clip_value**2`` (otherwise a ``lax.cond`` runs the clipped
  reduction) -- and one elementwise pass
  ``m = momentum * m + theta_coef * theta + grad_coef * clip(g)`` whose two coefficients
  (slot-sized, carrying ``1 - momentum``) are computed once, not per entry. With factored
  slots and momentum this moves about 4/5 of AdamW's bytes; on a shared 2-core CPU the update
  step with factored slots, momentum and clip measured 0.93x to 1.14x ``optax.adamw``'s across
  runs, 1.00x in the recorded one
  (``benchmarks/amos.py``; results and method in ``docs/amos.md``).

Leaves of any pytree (nested dicts, lists, ``nnx.State``) are named by their path as a tuple
of strings: dict keys, list indices as ``str(i)``, attribute names; an ``nnx.Variable``
contributes no component of its own. A bare array is named ``()``.

The per-parameter rule helper lives in :mod:`flaxlab.optim.amos.rules`, the default rules
derived from names and shapes (and ``amos_with_defaults``) in :mod:`flaxlab.optim.amos.defaults`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxlab.optim.amos.packed_update import packed_slot_update, reduced_squares

Shape = tuple[int, ...]
ParamsFn = Callable[[tuple[str, ...], Shape], Any]
ScalarOrSchedule = float | optax.Schedule


class ScaleByAmosState(NamedTuple):
    """State of :func:`scale_by_amos`.

    ``v`` and ``b`` hold the slots of all parameters packed into one vector each (in
    ``jax.tree.leaves`` order, each slot flattened); :func:`unpack_slots` gives them back as
    trees of slot shapes.
    """

    count: jax.Array  # int32 scalar: number of updates done so far.
    v: jax.Array  # running mean of squared gradients, packed slots.
    b: jax.Array  # decay state, packed slots.


class AmosState(NamedTuple):
    """State of :func:`amos`: the packed Amos slots plus the momentum (``None`` without one)."""

    count: jax.Array
    v: jax.Array
    b: jax.Array
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


class _Layout(NamedTuple):
    """Where each parameter's slots sit in the packed ``v``/``b`` vectors."""

    names: list[tuple[str, ...]]
    slot_shapes: list[Shape]
    offsets: list[int]  # len(names) + 1 entries
    etas: list[float]
    dtype: Any  # slot dtype: at least float32, float64 if any parameter is


def _layout(params, eta_fn, shape_fn) -> _Layout:
    names = leaf_names(params)
    slot_shapes, offsets, etas, dtypes = [], [0], [], [jnp.float32]
    for name, theta in zip(names, jax.tree.leaves(params), strict=True):
        shape = tuple(theta.shape)
        etas.append(validated_eta(name, shape, eta_fn(name, shape)))
        slot_shape = (
            shape if shape_fn is None else validated_slot_shape(name, shape, shape_fn(name, shape))
        )
        slot_shapes.append(slot_shape)
        offsets.append(offsets[-1] + math.prod(slot_shape))
        dtypes.append(slot_dtype(theta.dtype))
    return _Layout(names, slot_shapes, offsets, etas, jnp.result_type(*dtypes))


def unpack_slots(packed, params, shape_fn: ParamsFn | None = None):
    """The packed ``v`` or ``b`` vector of an Amos state as a tree shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.ones((2, 3))}
      >>> tx = scale_by_amos(0.1, lambda n, s: 1.0, lambda n, s: (1, 3))
      >>> unpack_slots(tx.init(params).v, params, lambda n, s: (1, 3))["w"].shape
      (1, 3)
    """
    layout = _layout(params, lambda name, shape: 1.0, shape_fn)
    if isinstance(packed, jax.ShapeDtypeStruct):  # from jax.eval_shape
        pieces = [jax.ShapeDtypeStruct(shape, packed.dtype) for shape in layout.slot_shapes]
        return jax.tree.structure(params).unflatten(pieces)
    pieces = [
        packed[start:stop].reshape(slot_shape)
        for start, stop, slot_shape in zip(
            layout.offsets[:-1], layout.offsets[1:], layout.slot_shapes, strict=True
        )
    ]
    return jax.tree.structure(params).unflatten(pieces)


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
        layout = _layout(params, eta_fn, shape_fn)
        count = jnp.zeros([], jnp.int32)
        v = jnp.zeros([layout.offsets[-1]], layout.dtype)
        b = jnp.zeros([layout.offsets[-1]], layout.dtype)
        if not with_momentum_state:
            return ScaleByAmosState(count=count, v=v, b=b)
        m = None
        if momentum:
            m = jax.tree.map(
                lambda theta: jnp.zeros(theta.shape, momentum_dtype or slot_dtype(theta.dtype)),
                params,
            )
        return AmosState(count=count, v=v, b=b, momentum=m)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("Amos needs the parameters: call update(grads, state, params)")
        layout = _layout(params, eta_fn, shape_fn)
        if state.v.shape != (layout.offsets[-1],):
            raise ValueError(
                f"Amos state holds {state.v.shape} slot entries but the parameters need "
                f"({layout.offsets[-1]},): the state was made for other parameters or shape_fn"
            )
        treedef = jax.tree.structure(params)
        thetas = treedef.flatten_up_to(params)
        grads = treedef.flatten_up_to(updates)
        ms = treedef.flatten_up_to(state.momentum) if momentum else [None] * len(thetas)
        count = jnp.asarray(optax.safe_int32_increment(state.count))
        xi = learning_rate(count) if callable(learning_rate) else learning_rate
        grads, g2 = reduced_squares(grads, layout.slot_shapes, layout.dtype, clip_value)
        v, b, theta_coef, grad_coef = packed_slot_update(
            g2,
            state.v,
            state.b,
            layout,
            count=count,
            xi=xi,
            beta=beta,
            extra_l2=extra_l2,
            d_coef=d_coef,
            c_coef=c_coef,
            epsilon=epsilon,
            update_scale=1 - momentum if momentum else 1.0,
        )
        out_u, out_m = [], []
        for i, (g, theta, m) in enumerate(zip(grads, thetas, ms, strict=True)):
            start, stop, slot_shape = (
                layout.offsets[i],
                layout.offsets[i + 1],
                layout.slot_shapes[i],
            )
            theta_c = theta_coef[start:stop].reshape(slot_shape)
            grad_c = grad_coef[start:stop].reshape(slot_shape)
            # The only full-size work: one pass per entry. With momentum the coefficients
            # already carry its (1 - momentum), so m' = momentum * m + theta_c * theta + grad_c * g.
            u = theta_c * theta.astype(layout.dtype) + grad_c * g
            if momentum:
                assert m is not None
                u = momentum * m.astype(layout.dtype) + u
                out_m.append(u.astype(m.dtype))
            out_u.append(u.astype(theta.dtype))
        new_updates = treedef.unflatten(out_u)
        if not with_momentum_state:
            return new_updates, ScaleByAmosState(count=count, v=v, b=b)
        m = treedef.unflatten(out_m) if momentum else None
        return new_updates, AmosState(count=count, v=v, b=b, momentum=m)

    return optax.GradientTransformation(init_fn, update_fn)  # type: ignore[arg-type]


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
