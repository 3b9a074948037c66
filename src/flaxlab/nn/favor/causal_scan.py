r"""Causal softmax FAVOR+ one chunk at a time: the CPU form of :func:`causal_favor`.

Same function as the chunk-batched path in :mod:`flaxlab.nn.favor.causal` (strictly causal
running-max key stabiliser, the reference's per-token query max, ``epsilon`` after the
exponential, ``1/sqrt(M)`` features), computed by a ``lax.scan`` over chunks of ``C`` positions.
Each step builds the ``M``-wide query and key features of one chunk from the ``d``-wide inputs,
attends inside the chunk (quadratic in ``C``) and to the running ``[M, D + 1]`` state, and hands
the state on. The backward pass is a reverse scan that rebuilds each chunk's features from
``q``, ``k`` and the projection instead of storing them.

Why a second form: on a CPU every large temporary is fresh memory that the kernel must map page
by page on each call, and that costs more than the arithmetic of an elementwise pass
(``benchmarks/favor.py``). Here the ``M``-wide arrays exist for one chunk at a time and stay in
cache; what crosses chunks is ``d``- or ``D``-wide, plus one ``[M, D + 1]`` state per chunk kept
for the backward pass. Memory is ``O(L (d + D) + (L / C) M D)`` in both passes. On accelerators
the chunk-batched form (large batched matmuls) is the better fit.

Gradients (hand-written, exact): features ``phi = e^{l - |x_s|^2/2 - c} + eps`` give
``dl = dphi (phi - eps)``; the query max ``c_q`` routes ``-sum(dl)`` to its arg-max feature; the
squared norm gives ``-x_s sum(dl)``. The key offsets ``c_i`` (running max of key logits) enter
the output only through ``e^{-c_i}`` on the non-``epsilon`` part ``y_core``, so
``dc_i = -<dy_i, y_core_i>``, routed to the key position and feature that set the running max.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from flaxlab.nn.favor.features import MASKED_LOG_OFFSET, softmax_projection_terms


def _projection_terms(x, projection):
    """``(x_s, x_s W^T, |x_s|^2 / 2)`` with ``x_s = d^{-1/4} x`` (the scaled input is kept for
    the backward pass)."""
    logits, half, _ = softmax_projection_terms(x, projection)
    return x * (x.shape[-1] ** -0.25), logits, half


def _query_features(q, projection, eps):
    """Scaled query, logits, their max, ``e^{l - |q_s|^2/2 - max l}`` and that ``+ eps``."""
    scaled, logits, half = _projection_terms(q, projection)
    top = jnp.max(logits, axis=-1, keepdims=True)
    expo = jnp.exp(logits - half - top)
    return scaled, logits, top, expo, expo + eps


def _key_features(logits, half, offsets, keep):
    """``e^{l_j - |k_j|^2/2 - c_j}`` (0 for masked keys), relative to each key's own offset."""
    exponent = jnp.where(keep[..., None], logits - half - offsets[..., None], -jnp.inf)
    return jnp.exp(exponent)


def intra_chunk_decay(offsets: jax.Array) -> jax.Array:
    """``e^{c_j - c_i}`` for ``j <= i`` inside a chunk, 0 above the diagonal:
    ``[..., C] -> [..., C, C]``."""
    chunk = offsets.shape[-1]
    lower = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))
    return jnp.exp(jnp.where(lower, offsets[..., None, :] - offsets[..., :, None], -jnp.inf))


def _forward(q, k, v, keep, projection, eps):
    """Scan over chunks. Inputs in chunk layout ``[N, B, H, C, *]`` (``keep``: ``[N, B, 1, C]``);
    ``v`` carries a ones column. Returns the output and the residuals of the backward pass."""
    n, b, h, c, _ = q.shape
    m, width = projection.shape[0], v.shape[-1]
    ratio2 = 1.0 / m

    def step(carry, xs):
        state, c_prev, (position_prev, feature_prev), value_sum = carry
        qn, kn, vn, keepn, index = xs
        keepn = jnp.broadcast_to(keepn, (b, h, c))
        _, _, _, _, qf = _query_features(qn, projection, eps)
        _, logits, half = _projection_terms(kn, projection)
        key_max = jnp.where(keepn, jnp.max(logits, axis=-1), MASKED_LOG_OFFSET)
        # Running max inside the chunk and the (position, feature) that set it: a position sets
        # a record when its max beats every earlier one (ties keep the earliest).
        running = lax.cummax(key_max, axis=2)
        earlier = jnp.concatenate(
            [jnp.full_like(running[..., :1], -jnp.inf), running[..., :-1]], axis=-1
        )
        record = jnp.where(key_max > earlier, jnp.arange(c), -1)
        holder = lax.cummax(record, axis=2)
        feature = jnp.take_along_axis(jnp.argmax(logits, axis=-1), jnp.maximum(holder, 0), axis=-1)
        beats = running > c_prev[..., None]
        offsets = jnp.where(beats, running, c_prev[..., None])
        # Where the max was set: (position in the sequence, feature), -1 before any key.
        arg = (
            jnp.where(beats, index * c + holder, position_prev[..., None]).astype(jnp.int32),
            jnp.where(beats, feature, feature_prev[..., None]).astype(jnp.int32),
        )
        ke = _key_features(logits, half, offsets, keepn)
        weights = jnp.einsum("bhim,bhjm->bhij", qf, ke) * intra_chunk_decay(offsets)
        from_start = jnp.exp(c_prev[..., None] - offsets)[..., None]
        core = jnp.einsum("bhij,bhjd->bhid", weights, vn)
        core += from_start * jnp.einsum("bhim,bhmd->bhid", qf, state)
        end = offsets[..., -1]
        to_end = jnp.exp(offsets - end[..., None])[..., None]
        new_state = jnp.exp(c_prev - end)[..., None, None] * state
        new_state += jnp.einsum("bhjm,bhjd->bhmd", ke, vn * to_end)
        kept = vn * keepn[..., None].astype(vn.dtype)
        prefix = value_sum[..., None, :] + jnp.cumsum(kept, axis=2)
        out = ratio2 * (core + eps * jnp.sum(qf, axis=-1, keepdims=True) * prefix)
        carry = (new_state, end, (arg[0][..., -1], arg[1][..., -1]), value_sum + jnp.sum(kept, 2))
        return carry, (out, core, state, c_prev, value_sum, offsets, arg)

    init = (
        jnp.zeros((b, h, m, width), q.dtype),
        jnp.full((b, h), MASKED_LOG_OFFSET, q.dtype),
        (jnp.full((b, h), -1, jnp.int32), jnp.full((b, h), -1, jnp.int32)),
        jnp.zeros((b, h, width), q.dtype),
    )
    _, (out, core, states, starts, value_sums, offsets, args) = lax.scan(
        step, init, (q, k, v, keep, jnp.arange(n))
    )
    return out, (core, states, starts, value_sums, offsets, args)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _softmax_scan(q, k, v, keep, projection, eps):
    return _forward(q, k, v, keep, projection, eps)[0]


def _softmax_scan_fwd(q, k, v, keep, projection, eps):
    out, residuals = _forward(q, k, v, keep, projection, eps)
    return out, (q, k, v, keep, projection) + residuals


def _softmax_scan_bwd(eps, residuals, d_out):
    q, k, v, keep, projection, core, states, starts, value_sums, offsets, args = residuals
    n, b, h, c, dim = q.shape
    m = projection.shape[0]
    scale = dim**-0.25
    d_out = d_out / m  # the ratio^2 on the output

    def step(carry, xs):
        grad, d_value_sum, d_proj = carry
        qn, kn, vn, keepn, state, c_prev, value_sum, offs, g = xs
        keepn = jnp.broadcast_to(keepn, (b, h, c))
        q_scaled, q_logits, q_top, q_exp, qf = _query_features(qn, projection, eps)
        k_scaled, k_logits, k_half = _projection_terms(kn, projection)
        ke = _key_features(k_logits, k_half, offs, keepn)
        decay = intra_chunk_decay(offs)
        weights = jnp.einsum("bhim,bhjm->bhij", qf, ke) * decay
        from_start = jnp.exp(c_prev[..., None] - offs)[..., None]
        end = offs[..., -1]
        to_end = jnp.exp(offs - end[..., None])[..., None]
        g_start = g * from_start
        d_weights = jnp.einsum("bhid,bhjd->bhij", g, vn) * decay
        d_qf = jnp.einsum("bhij,bhjm->bhim", d_weights, ke)
        d_qf += jnp.einsum("bhid,bhmd->bhim", g_start, state)
        d_ke = jnp.einsum("bhij,bhim->bhjm", d_weights, qf)
        d_ke += jnp.einsum("bhjd,bhmd->bhjm", vn * to_end, grad)
        dv = jnp.einsum("bhij,bhid->bhjd", weights, g)
        dv += to_end * jnp.einsum("bhjm,bhmd->bhjd", ke, grad)
        d_state = jnp.exp(c_prev - end)[..., None, None] * grad
        d_state += jnp.einsum("bhim,bhid->bhmd", qf, g_start)
        # epsilon part: eps * sum(qf_i) * (value_sum + sum_{j <= i} keep_j v_j)
        kept = vn * keepn[..., None].astype(vn.dtype)
        prefix = value_sum[..., None, :] + jnp.cumsum(kept, axis=2)
        d_qf += eps * jnp.sum(g * prefix, axis=-1, keepdims=True)
        weighted = eps * jnp.sum(qf, axis=-1, keepdims=True) * g
        later = jnp.flip(jnp.cumsum(jnp.flip(weighted, axis=2), axis=2), axis=2)
        dv += (later + d_value_sum[..., None, :]) * keepn[..., None].astype(vn.dtype)
        d_value_sum = d_value_sum + jnp.sum(weighted, axis=2)
        # features
        d_ql = d_qf * q_exp
        q_total = jnp.sum(d_ql, axis=-1, keepdims=True)
        # the max's gradient, shared among tied features (as jnp.max's own)
        at_top = q_logits == q_top
        ties = jnp.sum(at_top, axis=-1, keepdims=True).astype(d_ql.dtype)
        d_ql = d_ql - jnp.where(at_top, q_total / ties, 0.0)
        dq = scale * (jnp.einsum("bhcm,md->bhcd", d_ql, projection) - q_scaled * q_total)
        d_kl = d_ke * ke
        k_total = jnp.sum(d_kl, axis=-1, keepdims=True)
        dk = scale * (jnp.einsum("bhcm,md->bhcd", d_kl, projection) - k_scaled * k_total)
        d_proj += jnp.einsum("bhcm,bhcd->md", d_ql, q_scaled)
        d_proj += jnp.einsum("bhcm,bhcd->md", d_kl, k_scaled)
        return (d_state, d_value_sum, d_proj), (dq, dk, dv)

    init = (
        jnp.zeros_like(states[0]),
        jnp.zeros_like(value_sums[0]),
        jnp.zeros_like(projection),
    )
    xs = (q, k, v, keep, states, starts, value_sums, offsets, d_out)
    (_, _, d_proj), (dq, dk, dv) = lax.scan(step, init, xs, reverse=True)
    # Offsets: out = core e^{sg(c) - c} / M + ..., so dc_i = -<dy_i, core_i> / M, which reaches
    # the key logit (position, feature) that set the running max c_i.
    d_offsets = -jnp.sum(d_out * core, axis=-1)
    position, feature = args
    d_offsets = jnp.where(position >= 0, d_offsets, 0.0)
    position, feature = jnp.maximum(position, 0), jnp.maximum(feature, 0)
    k_flat = jnp.moveaxis(k, (0, 3), (2, 3)).reshape(b, h, n * c, dim)  # [B, H, N C, d]
    position = jnp.moveaxis(position, 0, 2).reshape(b, h, n * c)
    feature = jnp.moveaxis(feature, 0, 2).reshape(b, h, n * c)
    d_offsets = jnp.moveaxis(d_offsets, 0, 2).reshape(b, h, n * c)
    picked = projection[feature]  # [B, H, N C, d]
    d_k_flat = jnp.zeros_like(k_flat)
    batch_index = jnp.arange(b)[:, None, None]
    head_index = jnp.arange(h)[None, :, None]
    d_k_flat = d_k_flat.at[batch_index, head_index, position].add(
        scale * d_offsets[..., None] * picked
    )
    scaled_keys = scale * k_flat[batch_index, head_index, position]
    d_proj = d_proj.at[feature.reshape(-1)].add(
        (d_offsets[..., None] * scaled_keys).reshape(-1, dim)
    )
    dk = dk + jnp.moveaxis(d_k_flat.reshape(b, h, n, c, dim), 2, 0)
    return dq, dk, dv, None, d_proj


_softmax_scan.defvjp(_softmax_scan_fwd, _softmax_scan_bwd)


def softmax_causal_scan(q, k, v, keep, projection, numerical_stabilizer):
    """Causal softmax FAVOR+ numerator and denominator (as the last column) in chunk layout.

    Args:
      q, k: ``[N, B, H, C, d]`` queries and keys.
      v: ``[N, B, H, C, D + 1]`` values with a ones column.
      keep: ``[N, B, 1, C]`` bool, ``False`` for masked (or padding) keys.
      projection: ``[M, d]``.
      numerical_stabilizer: ``epsilon``.

    Returns:
      ``[N, B, H, C, D + 1]``: numerator columns and the denominator.
    """
    if isinstance(numerical_stabilizer, jax.Array):
        raise ValueError(
            "the scan implementation of causal FAVOR+ needs numerical_stabilizer as a Python "
            "number (it is a static argument of its custom VJP), got a traced value; pass a "
            "float, or use implementation='batched'"
        )
    return _softmax_scan(q, k, v, keep, projection, float(numerical_stabilizer))
