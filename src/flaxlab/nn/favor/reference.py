"""The reference implementation's causal FAVOR+ formula, kept as a yardstick.

google-research ``performer/fast_attention/jax/fast_attention.py`` computes causal attention
with per-token ``lax.scan`` prefix sums over features whose key stabiliser spans every position.
:func:`reference_causal_favor` re-implements exactly that, so benchmarks compare like with like
and tests can measure the leak flaxlab fixes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flaxlab.nn.favor.causal import stabilize_denominator
from flaxlab.nn.favor.features import softmax_kernel_features


def reference_causal_favor(q, k, v, projection, numerical_stabilizer=1e-6):
    """The reference's causal FAVOR+, as its code computes it: key features stabilised by the
    max over *all* positions (so a future key moves past outputs), and per-token prefix-sum
    scans whose custom VJP walks the state back by subtraction.

    A yardstick for speed and for how far flaxlab's strictly causal form departs from it, not
    for use: :func:`flaxlab.nn.favor.favor_attention` with ``causal=True`` is the fixed form.
    ``[batch, length, heads, d]`` inputs, softmax kernel, ``projection`` ``[M, d]``.
    """
    qf = softmax_kernel_features(q, projection, is_query=True)
    kf = softmax_kernel_features(k, projection, is_query=False)
    qs, ks, vs = (jnp.moveaxis(x, 1, 0) for x in (qf, kf, v))  # [L, B, H, *]
    numerator = jnp.moveaxis(_scan_numerator(qs, ks, vs), 0, 1)
    denominator = jnp.moveaxis(_scan_denominator(qs, ks), 0, 1)
    denominator = stabilize_denominator(denominator, numerical_stabilizer)
    return numerator / denominator[..., None]


@jax.custom_vjp
def _scan_numerator(qs, ks, vs):
    return _scan_numerator_fwd(qs, ks, vs)[0]


def _scan_numerator_fwd(qs, ks, vs):
    def body(state, qkv):
        q, k, v = qkv
        state = state + jnp.einsum("bhm,bhd->bhmd", k, v)
        return state, jnp.einsum("bhm,bhmd->bhd", q, state)

    state0 = jnp.zeros(qs.shape[1:] + vs.shape[-1:], qs.dtype)
    state, out = lax.scan(body, state0, (qs, ks, vs))
    return out, (state, qs, ks, vs)


def _scan_numerator_bwd(residuals, d_out):
    state, qs, ks, vs = residuals

    def body(carry, xs):
        state, d_state = carry
        q, k, v, dy = xs
        dq = jnp.einsum("bhd,bhmd->bhm", dy, state)
        d_state = d_state + jnp.einsum("bhd,bhm->bhmd", dy, q)
        dk = jnp.einsum("bhmd,bhd->bhm", d_state, v)
        dv = jnp.einsum("bhmd,bhm->bhd", d_state, k)
        state = state - jnp.einsum("bhm,bhd->bhmd", k, v)
        return (state, d_state), (dq, dk, dv)

    _, grads = lax.scan(body, (state, jnp.zeros_like(state)), (qs, ks, vs, d_out), reverse=True)
    return grads


_scan_numerator.defvjp(_scan_numerator_fwd, _scan_numerator_bwd)


@jax.custom_vjp
def _scan_denominator(qs, ks):
    return _scan_denominator_fwd(qs, ks)[0]


def _scan_denominator_fwd(qs, ks):
    def body(state, qk):
        q, k = qk
        state = state + k
        return state, jnp.sum(q * state, axis=-1)

    state, out = lax.scan(body, jnp.zeros(qs.shape[1:], qs.dtype), (qs, ks))
    return out, (state, qs, ks)


def _scan_denominator_bwd(residuals, d_out):
    state, qs, ks = residuals

    def body(carry, xs):
        state, d_state = carry
        q, k, dy = xs
        dq = dy[..., None] * state
        d_state = d_state + dy[..., None] * q
        return (state - k, d_state), (dq, d_state)

    _, grads = lax.scan(body, (state, jnp.zeros_like(state)), (qs, ks, d_out), reverse=True)
    return grads


_scan_denominator.defvjp(_scan_denominator_fwd, _scan_denominator_bwd)
