"""VDM noise schedules ``gamma(t) = -log SNR(t)`` and the variance-minimising gradient.

Every schedule is an NNX module with the same protocol:

* ``schedule(t)``: ``gamma(t)``, float32, same shape as ``t``;
* ``schedule.derivative(t)``: ``gamma'(t)`` by ``jax.jvp``;
* ``schedule.endpoints()``: ``(gamma(0), gamma(1))`` as float32 scalars;
* ``schedule.shape(t)``: the normalised shape ``nu(t) = (gamma(t) - gamma_0) / (gamma_1 - gamma_0)``
  (``nu(0) = 0``, ``nu(1) = 1``), and ``schedule.has_shape_params``: whether ``nu`` has
  parameters of its own.

The continuous-time VLB depends on the schedule only through ``gamma_0`` and ``gamma_1``
(paper, Sec. 5.1), so VDM learns the endpoints on the VLB and the shape between them on
the variance of the loss estimate (paper, Sec. 5.2 and App. I.2):
:func:`with_variance_gradient`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

SCHEDULE_KINDS = ("fixed", "learned_scalar", "learned_net")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _check_range(gamma_min: float, gamma_max: float) -> None:
    if not gamma_min < gamma_max:
        raise ValueError(f"need gamma_min < gamma_max, got {gamma_min} and {gamma_max}")


class _Schedule(nnx.Module):
    """What every schedule shares; each one defines ``__call__(t) -> gamma(t)``."""

    has_shape_params = False

    def derivative(self, t) -> jax.Array:
        """``gamma'(t)`` by forward-mode differentiation."""
        t = _f32(t)
        return jax.jvp(self.__call__, (t,), (jnp.ones_like(t),))[1]

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        """``(gamma(0), gamma(1))``."""
        return self(jnp.float32(0.0)), self(jnp.float32(1.0))

    def shape(self, t) -> jax.Array:
        """``nu(t) = (gamma(t) - gamma(0)) / (gamma(1) - gamma(0))``."""
        g0, g1 = self.endpoints()
        return (self(t) - g0) / (g1 - g0)


class FixedLinearSchedule(_Schedule):
    """``gamma(t) = gamma_min + (gamma_max - gamma_min) t``, no parameters.

    Unlike the reference's ``gamma_type='fixed'``, it returns arrays (the reference returns a
    Python float for ``t = 0.`` and then crashes indexing it).
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        _check_range(gamma_min, gamma_max)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)

    def __call__(self, t) -> jax.Array:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * _f32(t)

    def shape(self, t) -> jax.Array:
        return _f32(t)


class LearnedScalarSchedule(_Schedule):
    """``gamma(t) = b + |w| t`` with ``b = gamma_min``, ``w = gamma_max - gamma_min`` at init.

    Parameters ``b`` and ``w`` have shape ``(1,)`` as in the reference. The endpoints are
    ``b`` and ``b + |w|``; the shape ``nu(t) = t`` has no parameters.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        _check_range(gamma_min, gamma_max)
        self.w = nnx.Param(jnp.full((1,), gamma_max - gamma_min, jnp.float32))
        self.b = nnx.Param(jnp.full((1,), gamma_min, jnp.float32))

    def __call__(self, t) -> jax.Array:
        return self.b[...][0] + jnp.abs(self.w[...][0]) * _f32(t)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        b = self.b[...][0]
        return b, b + jnp.abs(self.w[...][0])

    def shape(self, t) -> jax.Array:
        return _f32(t)


class MonotoneDense(nnx.Module):
    """Dense layer with kernel ``|W|`` (non-negative, hence monotone non-decreasing).

    Args:
      kernel: initial ``W``, ``[in, out]``.
      bias: initial bias ``[out]`` or None for no bias.
    """

    def __init__(self, kernel: jax.Array, bias: jax.Array | None = None):
        self.kernel = nnx.Param(_f32(kernel))
        self.bias = nnx.Param(_f32(bias)) if bias is not None else None

    def __call__(self, x) -> jax.Array:
        y = _f32(x) @ jnp.abs(self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class MonotoneNetSchedule(_Schedule):
    r"""The reference's learned monotone network schedule (``NoiseSchedule_NNet``).

    .. math:: \hat\gamma(t) = l_1(t) + l_3\bigl(2\,\mathrm{sigmoid}(l_2(2(t - \tfrac12))) - 1\bigr)
              / n_{\text{features}}

    with ``l_1: 1 -> 1`` (kernel ``gamma_max - gamma_min``, bias ``gamma_min``),
    ``l_2: 1 -> n_features`` (kernel ~ N(0, s^2), bias 0; the reference's ``s = 0.01``) and
    ``l_3: n_features -> 1`` (kernel ~ N(0, 0.01^2), no bias); every kernel enters as ``|W|``,
    so ``gamma`` is non-decreasing for any parameters.

    With the reference's ``s = 0.01`` the hidden units sit at ``sigmoid(~0)`` and the shape's
    gradients are ~1e-8 (below Adam's epsilon), so the shape barely moves in a short run;
    ``hidden_init=1`` spreads the units' slopes while the initial shape stays linear to
    ~1e-3 (``l_3`` is still small).

    With ``pin_endpoints=True`` (default) the endpoints are separate parameters
    ``gamma_0 = b`` and ``gamma_1 = b + |w|`` (initialised to ``gamma_min``/``gamma_max``) and the
    network only gives the shape ``nu``:

    .. math:: \gamma(t) = \gamma_0 + (\gamma_1 - \gamma_0)\,
              \frac{\hat\gamma(t) - \hat\gamma(0)}{\hat\gamma(1) - \hat\gamma(0)}

    This keeps ``gamma(0)``/``gamma(1)`` where the VLB puts them and lets the shape be trained on
    the variance of the loss (:func:`with_variance_gradient`); ``l_1`` then starts at unit
    scale (kernel 1, bias 0), since the network's range is divided out.
    ``pin_endpoints=False`` is the reference exactly (``gamma = gamma_hat``, endpoints drift
    with every parameter).

    Args:
      gamma_min, gamma_max: initial endpoints.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      features: hidden width (1024 in the reference).
      pin_endpoints: see above.
      hidden_init: standard deviation ``s`` of ``l_2``'s initial kernel (0.01 in the reference).
    """

    def __init__(
        self,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        *,
        rngs: nnx.Rngs,
        features: int = 1024,
        pin_endpoints: bool = True,
        hidden_init: float = 0.01,
    ):
        _check_range(gamma_min, gamma_max)
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        if not hidden_init > 0:
            raise ValueError(f"hidden_init must be > 0, got {hidden_init}")
        self.features = features
        self.pin_endpoints = pin_endpoints
        self.has_shape_params = pin_endpoints
        scale = gamma_max - gamma_min
        normal = jax.random.normal
        # Pinned, the network's own range is divided out of the shape, so l_1 starts at unit
        # scale: then Adam's steps (~ the learning rate) are a real fraction of the shape's
        # scale instead of 1/18 of it.
        l1_kernel, l1_bias = (1.0, 0.0) if pin_endpoints else (scale, gamma_min)
        self.l1 = MonotoneDense(jnp.full((1, 1), l1_kernel), jnp.full((1,), l1_bias))
        self.l2 = MonotoneDense(
            hidden_init * normal(rngs.params(), (1, features)), jnp.zeros(features)
        )
        self.l3 = MonotoneDense(0.01 * normal(rngs.params(), (features, 1)))
        if pin_endpoints:
            self.w = nnx.Param(jnp.full((1,), scale, jnp.float32))
            self.b = nnx.Param(jnp.full((1,), gamma_min, jnp.float32))

    def raw(self, t) -> jax.Array:
        """The reference network ``gamma_hat(t)``, same shape as ``t``."""
        t = _f32(t)
        x = t.reshape(-1, 1)
        h = self.l1(x)
        hidden = 2.0 * (jax.nn.sigmoid(self.l2(2.0 * (x - 0.5))) - 0.5)
        h = h + self.l3(hidden) / self.features
        return h.reshape(t.shape)

    def shape(self, t) -> jax.Array:
        ends = self.raw(jnp.array([0.0, 1.0], jnp.float32))
        return (self.raw(t) - ends[0]) / (ends[1] - ends[0])

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        if not self.pin_endpoints:
            ends = self.raw(jnp.array([0.0, 1.0], jnp.float32))
            return ends[0], ends[1]
        b = self.b[...][0]
        return b, b + jnp.abs(self.w[...][0])

    def __call__(self, t) -> jax.Array:
        if not self.pin_endpoints:
            return self.raw(t)
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * self.shape(t)


def make_schedule(
    kind: str, gamma_min: float, gamma_max: float, *, rngs: nnx.Rngs, **kwargs
) -> _Schedule:
    """Builds a schedule by name: one of ``SCHEDULE_KINDS``.

    Example:
      >>> make_schedule("learned_scalar", -13.3, 5.0, rngs=nnx.Rngs(0))
    """
    if kind == "fixed":
        return FixedLinearSchedule(gamma_min, gamma_max)
    if kind == "learned_scalar":
        return LearnedScalarSchedule(gamma_min, gamma_max)
    if kind == "learned_net":
        return MonotoneNetSchedule(gamma_min, gamma_max, rngs=rngs, **kwargs)
    raise ValueError(f"unknown schedule kind {kind!r}; accepted: {', '.join(SCHEDULE_KINDS)}")


def with_variance_gradient(
    per_example_loss: Callable[[Any, Any], jax.Array], shape_values, other_args, scale=1.0
) -> jax.Array:
    r"""``per_example_loss(shape_values, other_args)`` with the variance-minimising gradient.

    The forward value is unchanged. In the backward pass, the arguments in ``other_args``
    (score network, endpoints ``gamma_0``/``gamma_1``, ...) receive the ordinary gradient of the
    loss, while ``shape_values`` (per-example quantities of the schedule's shape, e.g.
    ``nu(t_i)`` and ``nu'(t_i)``, leaves with leading axis ``B``) receive the gradient of the
    *second moment* of the loss estimate:

    .. math:: \bar\nu_i = 2 s L_i \; c_i \frac{\partial L_i}{\partial \nu_i}
              \quad\text{instead of}\quad c_i \frac{\partial L_i}{\partial \nu_i}

    where ``c_i`` is the cotangent reaching example ``i``. With the
    objective ``mean_i(s L_i)`` (``s = 1 / (D log 2)`` for bits/dim), the shape parameters thus
    descend ``mean_i (s L_i)^2``, whose gradient equals the gradient of the variance of the
    estimate because its mean does not depend on the shape (VDM paper, Sec. 5.2 and App. I.2:
    ``d/d eta E[L^2] = E[2 L dL/d eta]``, computed in the same backward pass). The endpoints
    are trained on the VLB. Examples must not interact (no batch statistics), which holds for
    VDM's score network.

    Args:
      per_example_loss: pure function ``(shape_values, other_args) -> [B]`` losses.
      shape_values: pytree of ``[B, ...]`` arrays.
      other_args: pytree of arrays.
      scale: the factor ``s`` between the returned losses and the objective's units.

    Returns:
      ``[B]`` per-example losses.
    """
    return _variance_gradient(per_example_loss, shape_values, other_args, _f32(scale))


def _variance_gradient_impl(per_example_loss, shape_values, other_args, scale):
    return per_example_loss(shape_values, other_args)


_variance_gradient = jax.custom_vjp(_variance_gradient_impl, nondiff_argnums=(0,))


def _variance_gradient_fwd(per_example_loss, shape_values, other_args, scale):
    losses, vjp = jax.vjp(per_example_loss, shape_values, other_args)
    return losses, (losses, vjp, scale)


def _variance_gradient_bwd(per_example_loss, residuals, cotangent):
    losses, vjp, scale = residuals
    ct_shape, ct_other = vjp(cotangent)
    factor = 2.0 * scale * losses

    def rescale(g):
        return g * factor.reshape(factor.shape + (1,) * (g.ndim - 1)).astype(g.dtype)

    ct_shape = jax.tree.map(rescale, ct_shape)
    return ct_shape, ct_other, jnp.zeros_like(scale)


_variance_gradient.defvjp(_variance_gradient_fwd, _variance_gradient_bwd)


def _path_names(path) -> list[str]:
    """The names along a parameter path (tuple of pytree keys or strings)."""
    return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def is_schedule_path(path) -> bool:
    """Whether a parameter path (tuple of keys or strings) belongs to a noise schedule."""
    return "schedule" in _path_names(path)


def is_shape_path(path) -> bool:
    """Whether a parameter path belongs to a schedule's shape network (``l1``/``l2``/``l3``)."""
    names = _path_names(path)
    return "schedule" in names and any(n in ("l1", "l2", "l3") for n in names)


def weight_decay_mask(params) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies.

    Everything is decayed (as the reference's AdamW) except the noise schedule, whose
    endpoints set the likelihood and must not be pulled towards 0.

    Example:
      >>> params = nnx.state(model, nnx.Param)
      >>> tx = optax.adamw(2e-4, b2=0.99, weight_decay=0.01, mask=weight_decay_mask(params))
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: not is_schedule_path(path), params)
