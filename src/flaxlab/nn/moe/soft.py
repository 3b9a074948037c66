"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts",
https://arxiv.org/abs/2308.00951; reference google-research/vmoe ``projects/soft_moe/router.py``).

Every expert has ``P`` slots; each slot's input is a convex combination of all tokens of a group
and each token's output a convex combination of all slot outputs. With ``n(v) = v * rsqrt(
sum(v**2) + 1e-6)`` (tokens normalised over ``D``, slot parameters ``mu (D, E, P)`` over ``D``) and
a learned scalar ``scale``:

  ``logits[s, e, p] = scale * n(x_s) . n(mu)[:, e, p]``
  ``dispatch = softmax over tokens s``;  ``combine = softmax over all slots (e, p)``
  ``slots[e, p] = sum_s dispatch[s, e, p] x_s`` (un-normalised ``x``)
  ``y_s = sum_{e, p} combine[s, e, p] expert_e(slots[e, p])``

Fix: the reference always casts the dispatched data to bfloat16; here the dispatch/combine
einsums run in ``dispatch_dtype`` (float32 by default, ``jnp.bfloat16`` optional).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.nn.moe.experts import MoeMlp, expert_mlp


def _l2_normalize(v, axis):
    return v * jax.lax.rsqrt(jnp.sum(jnp.square(v), axis=axis, keepdims=True) + 1e-6)


def soft_moe_weights(
    x: jax.Array, mu: jax.Array, scale: jax.Array, noise: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Soft MoE dispatch and combine weights (float32).

    Args:
      x: ``(G, S, D)`` tokens.
      mu: ``(D, E, P)`` slot parameters.
      scale: scalar logit scale.
      noise: optional ``(G, S, E, P)`` additive logit noise (already scaled).

    Returns:
      ``(dispatch, combine)``, both ``(G, S, E, P)``: ``dispatch`` sums to 1 over ``S``,
      ``combine`` over ``(E, P)``.
    """
    x = _l2_normalize(x.astype(jnp.float32), axis=-1)
    mu = _l2_normalize(mu.astype(jnp.float32), axis=0)
    logits = scale.astype(jnp.float32) * jnp.einsum("gsd,dep->gsep", x, mu)
    if noise is not None:
        logits = logits + noise
    dispatch = jax.nn.softmax(logits, axis=1)
    combine = jax.nn.softmax(logits, axis=(2, 3))
    return dispatch, combine


def soft_moe(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    mu: jax.Array,
    scale: jax.Array,
    *,
    noise: jax.Array | None = None,
    dispatch_dtype=jnp.float32,
) -> jax.Array:
    """Soft MoE MLP: ``(G, S, D) -> (G, S, O)``.

    Args:
      params: expert MLP parameters (see :func:`~flaxlab.nn.moe.experts.expert_mlp`).
      x: ``(G, S, D)`` tokens.
      mu: ``(D, E, P)`` slot parameters.
      scale: scalar logit scale.
      noise: optional additive logit noise ``(G, S, E, P)``.
      dispatch_dtype: dtype of the dispatch and combine einsums (data and weights).

    Returns:
      ``(G, S, O)`` in ``x``'s dtype.

    Example:
      >>> params = {"fc1_kernel": jnp.ones((2, 4, 8)), "fc1_bias": jnp.zeros((2, 8)),
      ...           "fc2_kernel": jnp.ones((2, 8, 4)), "fc2_bias": jnp.zeros((2, 4))}
      >>> soft_moe(params, jnp.ones((1, 6, 4)), jnp.ones((4, 2, 3)), jnp.ones(())).shape
      (1, 6, 4)
    """
    dispatch_w, combine_w = soft_moe_weights(x, mu, scale, noise)
    num_groups, _, num_experts, num_slots = dispatch_w.shape
    slots = jnp.einsum(
        "gsep,gsd->egpd", dispatch_w.astype(dispatch_dtype), x.astype(dispatch_dtype)
    )
    slots = slots.astype(x.dtype).reshape(num_experts, num_groups * num_slots, -1)
    out = expert_mlp(params, slots).reshape(num_experts, num_groups, num_slots, -1)
    y = jnp.einsum("gsep,egpd->gsd", combine_w.astype(dispatch_dtype), out.astype(dispatch_dtype))
    return y.astype(x.dtype)


class SoftMoeLayer(nnx.Module):
    """Soft MoE MLP block; each sequence of ``(B, T, D)`` is one group.

    Parameters: ``mu (D, E, P)`` (LeCun-normal, as the reference), ``scale ()`` (init 1) and the
    stacked experts ``experts`` (:class:`~flaxlab.nn.moe.experts.MoeMlp`). The Soft MoE paper sets
    ``P = round(T * capacity_factor / E)`` slots per expert.

    Args:
      in_features: ``D``.
      mlp_dim: expert hidden width.
      num_experts: ``E``.
      num_slots: ``P`` slots per expert.
      out_features: ``O`` (default ``D``).
      noise_std: standard deviation of logit noise while training (0: none).
      dispatch_dtype: dtype of the dispatch/combine einsums (``jnp.bfloat16`` saves bandwidth).
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> layer = SoftMoeLayer(8, 16, num_experts=4, num_slots=2, rngs=nnx.Rngs(0))
      >>> y, aux = layer(jnp.ones((2, 5, 8)))
      >>> y.shape
      (2, 5, 8)
    """

    def __init__(
        self,
        in_features: int,
        mlp_dim: int,
        num_experts: int,
        num_slots: int,
        *,
        out_features: int | None = None,
        noise_std: float = 0.0,
        dispatch_dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} must be >= 1.")
        self.noise_std = noise_std
        self.dispatch_dtype = dispatch_dtype
        mu = jax.nn.initializers.lecun_normal()(
            rngs.params(), (in_features, num_experts, num_slots), param_dtype
        )
        self.mu = nnx.Param(mu, out_sharding=("embed", None, None), eager_sharding=False)
        self.scale = nnx.Param(jnp.ones((), param_dtype))
        self.experts = MoeMlp(
            num_experts,
            in_features,
            mlp_dim,
            out_features=out_features,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(B, T, D) -> (y (B, T, O), aux)``; ``aux`` has a zero ``auxiliary_loss``."""
        if x.ndim != 3:
            raise ValueError(f"SoftMoeLayer takes (batch, tokens, hidden) inputs; got {x.shape}.")
        mu, scale = self.mu[...], self.scale[...]
        noise = None
        if not deterministic and self.noise_std > 0:
            if rngs is None:
                raise ValueError("noise_std > 0 while training needs rngs=nnx.Rngs(gating=...).")
            shape = (*x.shape[:2], *mu.shape[1:])
            noise = self.noise_std * jax.random.normal(rngs.gating(), shape, jnp.float32)
        y = soft_moe(
            self.experts.param_dict(),
            x,
            mu,
            scale,
            noise=noise,
            dispatch_dtype=self.dispatch_dtype,
        )
        dispatch_w, combine_w = soft_moe_weights(x, mu, scale, noise)
        aux = {
            "auxiliary_loss": jnp.zeros((), jnp.float32),
            "combine_weights_max_mean": jnp.mean(jnp.max(combine_w, axis=(2, 3))),
            "dispatch_weights_max_mean": jnp.mean(jnp.max(dispatch_w, axis=1)),
        }
        return y, aux
