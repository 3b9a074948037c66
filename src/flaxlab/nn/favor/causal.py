r"""Strictly causal FAVOR+: chunked prefix sums with a custom VJP, and O(1) recurrent decoding.

The causal linear attention computed here is, per (batch, head) and query position ``i``,

.. math::
    y_i = \sum_{j \le i} \big(e^{c_j - c_i}\, Q_i \cdot E_j + (Q_i \cdot \mathbf 1)\, u_j\big)\, V_j

with query features ``Q``, key exponential features ``E`` (each relative to its own log-offset
``c_j``), a non-decreasing log-offset sequence ``c`` and an additive per-key weight ``u`` (the
softmax features' ``epsilon``). For the softmax kernel ``c_i`` is the running (causal) max of the
key logits, which replaces the reference's max over *all* positions: the key features seen by
query ``i`` are exactly ``(exp(x_s W^T - ||x_s||^2/2 - c_i) + eps) / sqrt(M)``, a function of keys
``j <= i`` only. All exponents ``c_j - c_i`` are ``<= 0``, so nothing overflows.

The ``e^{c_j-c_i} Q_i \cdot E_j`` part (:func:`causal_favor` in chunk layout, or
:func:`chunked_causal_linear_attention` for given features) is computed:
quadratic inside chunks of ``C`` positions, and a running ``[M, D]`` state between chunks. All
matmuls are batched over chunks (large, accelerator-friendly products); only the state
recurrence ``S_{n+1} = e^{cs_n - ce_n} S_n + (local sum of chunk n)`` is a ``lax.scan`` over the
``L / C`` chunks, with elementwise work per step. The hand-written backward pass has the same
structure (a reverse scan for the state gradient). Memory is ``O(L (M + D + C) + (L / C) M D)``
in both passes: never ``L x M x D`` (a cumulative sum of outer products) and never ``L x L``.
The values carry a ones column, so one pass gives numerator and denominator; the ``u`` part is
a chunked prefix sum of ``[L, D + 1]`` values.

That chunk-batched form suits accelerators. On CPU, :func:`causal_favor` with the softmax kernel
uses :mod:`flaxlab.nn.favor.causal_scan` instead (``implementation="scan"``): the same function, one
chunk at a time, so that no ``M``-wide array larger than a chunk is ever materialised.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flaxlab.nn.favor.causal_scan import intra_chunk_decay, softmax_causal_scan
from flaxlab.nn.favor.features import (
    MASKED_LOG_OFFSET,
    _check_projection,
    relu_kernel_features,
    softmax_kernel_features,
    softmax_projection_terms,
)

# Chunk sizes: the intra-chunk work grows as L C (M + D), the stored chunk states as (L / C) M D.
# On CPU (the "scan" implementation) 32-64 measured best at 4k and 16k tokens and 64 stores half
# the states of 32 (benchmarks/favor.py --chunk-sweep); GPUs prefer larger matmul tiles and have
# the bandwidth for the C x C blocks, so 256 there.
DEFAULT_CHUNK_SIZE = {"cpu": 64, "gpu": 256, "tpu": 256}

# How the causal softmax path is computed: "scan" builds one chunk's features at a time
# (flaxlab.nn.favor.causal_scan; small temporaries, best on CPU), "batched" all chunks at once
# (large batched matmuls, for accelerators).
IMPLEMENTATIONS = ("scan", "batched")
DEFAULT_IMPLEMENTATION = {"cpu": "scan"}


def default_implementation() -> str:
    """Causal softmax implementation used when none is given, by backend."""
    return DEFAULT_IMPLEMENTATION.get(jax.default_backend(), "batched")


def default_chunk_size(length: int) -> int:
    """Chunk size used when none is given: the backend's default, capped at ``length``."""
    preferred = DEFAULT_CHUNK_SIZE.get(jax.default_backend(), 256)
    return max(1, min(int(length), preferred))


# The scan form keeps one chunk's [B, H, C, M] feature arrays in cache: C is chosen so that one
# such array holds at most this many elements (512 KiB of float32). Measured on CPU: batch 1,
# 8 heads, M = 256 at 4k tokens -> C = 64; batch 32, 4 heads, M = 64 (the Performer LM preset's
# attention) -> C = 16, 54 ms per forward+backward against 102 ms with C = 64.
SCAN_CHUNK_ELEMENTS = 2**17


def scan_chunk_size(length: int, batch_heads: int, num_features: int) -> int:
    """Chunk size of the scan form when none is given: the largest power of two in [16, 64]
    with ``batch_heads * C * num_features <= SCAN_CHUNK_ELEMENTS`` (16 if none is), capped at
    ``length``."""
    chunk = 64
    while chunk > 16 and batch_heads * chunk * num_features > SCAN_CHUNK_ELEMENTS:
        chunk //= 2
    return max(1, min(int(length), chunk))


def _to_chunks(x: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """[B, L, H, ...] (L == num_chunks * chunk) -> [num_chunks, B, H, chunk, ...]."""
    b, _, h = x.shape[:3]
    x = x.reshape((b, num_chunks, chunk, h) + x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def _from_chunks(x: jax.Array) -> jax.Array:
    """[num_chunks, B, H, chunk, ...] -> [B, num_chunks * chunk, H, ...]."""
    n, b, h, c = x.shape[:4]
    x = jnp.moveaxis(jnp.moveaxis(x, 2, 3), 0, 1)
    return x.reshape((b, n * c, h) + x.shape[4:])


def _chunk_offsets(c):
    """Offsets of the state entering each chunk (the last offset of the chunk before; the first
    chunk's own first offset, its state being zero) and of the state leaving it."""
    end = c[..., -1]
    start = jnp.concatenate([c[:1, ..., 0], end[:-1]], axis=0)
    return start, end


def _forward_chunks(q, e, c, v):
    """Chunk-major forward pass ``[N, B, H, C, *]``; ``v`` may carry a ones column (then the
    last output column is the denominator).

    All matmuls are batched over chunks; only the ``[M, D]`` state recurrence
    ``S_{n+1} = e^{cs_n - ce_n} S_n + sum_{j in n} e^{c_j - ce_n} E_j V_j^T`` runs as a
    ``lax.scan`` over chunks (elementwise work only). Returns the output and the residuals
    (the state entering each chunk and the intra-chunk weights).
    """
    start, end = _chunk_offsets(c)
    to_end = jnp.exp(c - end[..., None])[..., None]
    from_start = jnp.exp(start[..., None] - c)[..., None]
    local_kv = jnp.einsum("nbhjm,nbhjd->nbhmd", e * to_end, v)
    carry_scale = jnp.exp(start - end)[..., None, None]

    def advance(state, chunk):
        scale, local = chunk
        return scale * state + local, state

    _, kv = lax.scan(advance, jnp.zeros_like(local_kv[0]), (carry_scale, local_kv))
    weights = jnp.einsum("nbhim,nbhjm->nbhij", q, e) * intra_chunk_decay(c)
    out = jnp.einsum("nbhij,nbhjd->nbhid", weights, v)
    out += from_start * jnp.einsum("nbhim,nbhmd->nbhid", q, kv)
    return out, (kv, weights)


def _backward_chunks(q, e, c, v, kv, weights, d_out):
    """Reverse of :func:`_forward_chunks`: batched matmuls plus a reverse scan over chunks for
    ``G_n = sum_{i after chunk n} e^{ce_n - c_i} Q_i dy_i^T`` (the leaving state's gradient)."""
    start, end = _chunk_offsets(c)
    to_end = jnp.exp(c - end[..., None])[..., None]
    from_start = jnp.exp(start[..., None] - c)[..., None]
    local_grad = jnp.einsum("nbhim,nbhid->nbhmd", q * from_start, d_out)
    carry_scale = jnp.exp(start - end)[..., None, None]

    def retreat(grad, chunk):
        scale, local = chunk
        return local + scale * grad, grad

    _, grad_kv = lax.scan(
        retreat, jnp.zeros_like(local_grad[0]), (carry_scale, local_grad), reverse=True
    )
    d_weights = jnp.einsum("nbhid,nbhjd->nbhij", d_out, v) * intra_chunk_decay(c)
    dq = jnp.einsum("nbhij,nbhjm->nbhim", d_weights, e)
    dq += from_start * jnp.einsum("nbhid,nbhmd->nbhim", d_out, kv)
    de = jnp.einsum("nbhij,nbhim->nbhjm", d_weights, q)
    de += to_end * jnp.einsum("nbhmd,nbhjd->nbhjm", grad_kv, v)
    dv = jnp.einsum("nbhij,nbhid->nbhjd", weights, d_out)
    dv += to_end * jnp.einsum("nbhjm,nbhmd->nbhjd", e, grad_kv)
    dc = jnp.sum(e * de, axis=-1) - jnp.sum(q * dq, axis=-1)
    return dq, de, dc, dv


@jax.custom_vjp
def _chunk_core(q, e, c, v):
    """Causal linear attention in chunk layout ``[N, B, H, C, *]`` (custom VJP, linear memory)."""
    return _forward_chunks(q, e, c, v)[0]


def _chunk_core_fwd(q, e, c, v):
    out, (kv, weights) = _forward_chunks(q, e, c, v)
    return out, (q, e, c, v, kv, weights)


def _chunk_core_bwd(residuals, d_out):
    q, e, c, v, kv, weights = residuals
    return _backward_chunks(q, e, c, v, kv, weights, d_out)


_chunk_core.defvjp(_chunk_core_fwd, _chunk_core_bwd)


def _pad_to_chunks(x, num_chunks, chunk_size, mode="constant"):
    pad = num_chunks * chunk_size - x.shape[1]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)
    return _to_chunks(x, num_chunks, chunk_size)


def _with_ones(v: jax.Array) -> jax.Array:
    """Values with a ones column appended: one pass yields numerator and denominator."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def chunked_causal_linear_attention(
    q: jax.Array,
    e: jax.Array,
    c: jax.Array,
    v: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Causal numerator and denominator with per-position log-offsets, chunked in both passes.

    .. math::
        y_i = \sum_{j \le i} e^{c_j - c_i} (Q_i \cdot E_j) V_j, \qquad
        z_i = \sum_{j \le i} e^{c_j - c_i} (Q_i \cdot E_j)

    Args:
      q: query features ``[batch, length, heads, M]``.
      e: key features ``[batch, length, heads, M]``, each relative to its own log-offset.
      c: log-offsets ``[batch, length, heads]``, non-decreasing along ``length`` (use zeros for
        plain causal linear attention).
      v: values ``[batch, length, heads, D]``.
      chunk_size: positions per chunk; ``None`` picks :func:`default_chunk_size`.

    Returns:
      ``(y, z)`` of shapes ``[batch, length, heads, D]`` and ``[batch, length, heads]``.
      Differentiable in all four inputs (custom VJP whose backward pass is a reverse scan over
      chunks storing one ``[M, D]`` state per chunk).

    Example:
      >>> q = e = jnp.ones((1, 5, 1, 3)); v = jnp.arange(5.0).reshape(1, 5, 1, 1)
      >>> y, z = chunked_causal_linear_attention(q, e, jnp.zeros((1, 5, 1)), v, chunk_size=2)
      >>> y[0, :, 0, 0]
      Array([ 0.,  3.,  9., 18., 30.], dtype=float32)
      >>> z[0, :, 0]
      Array([ 3.,  6.,  9., 12., 15.], dtype=float32)
    """
    length = q.shape[1]
    chunk = _chunk_size(length, chunk_size)
    num_chunks = -(-length // chunk)
    qc, ec, vc = (_pad_to_chunks(x, num_chunks, chunk) for x in (q, e, _with_ones(v)))
    cc = _pad_to_chunks(c, num_chunks, chunk, mode="edge")
    out = _from_chunks(_chunk_core(qc, ec, cc, vc))[:, :length]
    return out[..., :-1], out[..., -1]


def _chunk_size(length: int, chunk_size: int | None) -> int:
    chunk = default_chunk_size(length) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk


def _chunk_prefix_sum(x: jax.Array) -> jax.Array:
    """Inclusive prefix sum over positions of a chunk-layout ``[N, B, H, C, D]`` array."""
    chunk = x.shape[3]
    lower = jnp.tril(jnp.ones((chunk, chunk), x.dtype))
    within = jnp.einsum("ij,nbhjd->nbhid", lower, x)
    totals = within[:, :, :, -1]
    before = jnp.cumsum(totals, axis=0) - totals
    return within + before[:, :, :, None]


def _chunk_running_max(x: jax.Array) -> jax.Array:
    """Running max over positions of a chunk-layout ``[N, B, H, C]`` array."""
    # associative_scan, not lax.cummax: XLA's CPU cummax is a reduce-window, quadratic in L.
    within = lax.associative_scan(jnp.maximum, x, axis=3)
    totals = lax.associative_scan(jnp.maximum, within[..., -1], axis=0)
    before = jnp.concatenate([jnp.full_like(totals[:1], MASKED_LOG_OFFSET), totals[:-1]], axis=0)
    return jnp.maximum(within, before[..., None])


def causal_favor(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    projection: jax.Array | None,
    *,
    kernel: str,
    numerical_stabilizer: float,
    mask: jax.Array | None,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal FAVOR+ numerator ``[B, L, H, D]`` and denominator ``[B, L, H]``, strictly causal.

    Everything runs in chunk layout ``[N, B, H, C, *]``: the inputs (``d`` wide) are rearranged
    once, the ``M``-wide features are computed there and never transposed, values carry a ones
    column so one pass gives numerator and denominator, and only the ``D + 1``-wide result is
    rearranged back.
    """
    b, length, h, _ = q.shape
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
    if kernel == "softmax":
        if projection is None:
            raise ValueError("kernel='softmax' needs a projection matrix [num_features, head_dim]")
        _check_projection(q, projection)
    implementation = default_implementation() if implementation is None else implementation
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if chunk_size is None and kernel == "softmax" and implementation == "scan":
        assert projection is not None
        chunk_size = scan_chunk_size(length, b * h, projection.shape[0])
    chunk = _chunk_size(length, chunk_size)
    num_chunks = -(-length // chunk)
    # Padded positions come after every real one: strict causality keeps them out of the outputs.
    qc, kc, vc = (_pad_to_chunks(x, num_chunks, chunk) for x in (q, k, _with_ones(v)))
    keep = None
    if mask is not None:
        keep = _pad_to_chunks(mask.astype(bool)[:, :, None], num_chunks, chunk)  # [N, B, 1, C]
    if kernel == "relu":
        flat = (num_chunks * b, h, chunk)
        qf, kf = (
            relu_kernel_features(x.reshape(flat + x.shape[-1:]), projection).reshape(
                x.shape[:-1] + (-1,)
            )
            for x in (qc, kc)
        )
        if keep is not None:
            kf = kf * keep[..., None].astype(kf.dtype)
        out = _chunk_core(qf, kf, jnp.zeros(kf.shape[:-1], kf.dtype), vc)
    elif implementation == "scan":
        if keep is None:
            keep = _pad_to_chunks(jnp.ones((b, length, 1), bool), num_chunks, chunk)
        out = softmax_causal_scan(qc, kc, vc, keep, projection, numerical_stabilizer)
    else:
        assert projection is not None
        # The features' 1/sqrt(M) ratio multiplies the numerator and denominator by ratio^2: it
        # is applied once to the (D + 1)-wide result instead of to every M-wide feature array.
        logits, half_sq_norm, ratio = softmax_projection_terms(qc, projection)
        qf = (
            jnp.exp(logits - half_sq_norm - jnp.max(logits, axis=-1, keepdims=True))
            + numerical_stabilizer
        )
        logits, half_sq_norm, _ = softmax_projection_terms(kc, projection)
        key_max = jnp.max(logits, axis=-1)
        if keep is not None:
            key_max = jnp.where(keep, key_max, MASKED_LOG_OFFSET)
        offsets = _chunk_running_max(key_max)
        # Each pair's weight q_i . kf_j e^{c_j - c_i} = q_i . e^{logit_j - |k_j|^2/2 - c_i}
        # depends on the offsets only through e^{-c_i}: so the core and the key features use
        # constant offsets, and the exact gradient with respect to c_i (-<dy_i, y_i>) comes from
        # one factor e^{sg(c_i) - c_i} = 1 on the D-wide output (no M-wide gradient passes).
        fixed = lax.stop_gradient(offsets)
        exponent = logits - half_sq_norm - fixed[..., None]
        if keep is not None:
            exponent = jnp.where(keep[..., None], exponent, -jnp.inf)
        out = _chunk_core(qf, jnp.exp(exponent), fixed, vc) * jnp.exp(fixed - offsets)[..., None]
        # The stabiliser's additive part is not relative to the offsets: plain prefix sums.
        eps_values = numerical_stabilizer * vc
        if keep is not None:
            eps_values = eps_values * keep[..., None].astype(vc.dtype)
        out += jnp.sum(qf, axis=-1, keepdims=True) * _chunk_prefix_sum(eps_values)
        out *= ratio**2
    out = _from_chunks(jnp.asarray(out))[:, :length]
    return out[..., :-1], out[..., -1]


def stabilize_denominator(denominator: jax.Array, numerical_stabilizer: float) -> jax.Array:
    """The reference's ``den + 2 s 1[|den| <= s]``: keeps tiny denominators away from zero."""
    s = numerical_stabilizer
    return denominator + 2 * s * (jnp.abs(denominator) <= s).astype(denominator.dtype)


class FavorCausalState(NamedTuple):
    """Running sums of causal FAVOR+ for recurrent decoding (all per batch and head).

    ``key_value`` ``[B, H, M, D]`` and ``key_sum`` ``[B, H, M]`` hold the key features relative to
    ``log_offset`` ``[B, H]`` (the running max of key logits; 0 for the ReLU kernel);
    ``eps_value`` ``[B, H, D]`` and ``eps_sum`` ``[B, H]`` the additive-stabiliser part.
    """

    key_value: jax.Array
    key_sum: jax.Array
    eps_value: jax.Array
    eps_sum: jax.Array
    log_offset: jax.Array


def favor_causal_init_state(
    batch_size: int,
    num_heads: int,
    num_features: int,
    value_dim: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    kernel: str = "softmax",
) -> FavorCausalState:
    """Empty decoding state (no token seen yet).

    Args:
      batch_size, num_heads: leading sizes.
      num_features: ``M`` (the projection's rows; the head dim for projection-free ReLU).
      value_dim: ``D``, the value head dimension.
      dtype: state dtype (use float32 or wider).
      kernel: ``"softmax"`` or ``"relu"`` (sets the initial log-offset).

    Returns:
      A :class:`FavorCausalState` for :func:`favor_causal_step`.
    """
    if kernel not in ("softmax", "relu"):
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
    start = MASKED_LOG_OFFSET if kernel == "softmax" else 0.0
    b, h = batch_size, num_heads
    return FavorCausalState(
        key_value=jnp.zeros((b, h, num_features, value_dim), dtype),
        key_sum=jnp.zeros((b, h, num_features), dtype),
        eps_value=jnp.zeros((b, h, value_dim), dtype),
        eps_sum=jnp.zeros((b, h), dtype),
        log_offset=jnp.full((b, h), start, dtype),
    )


def favor_causal_step(
    state: FavorCausalState,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    projection: jax.Array | None,
    *,
    kernel: str = "softmax",
    numerical_stabilizer: float = 1e-6,
    renormalize: bool = True,
    mask_t: jax.Array | None = None,
) -> tuple[FavorCausalState, jax.Array]:
    r"""One decoding step of causal FAVOR+ in O(M D) time and memory per (batch, head).

    Feeds token ``t`` (``q_t``, ``k_t`` ``[B, H, d]``, ``v_t`` ``[B, H, D]``) and returns the new
    state and the attention output ``[B, H, D]`` for that token. Running the steps over a
    sequence reproduces ``favor_attention(..., causal=True)`` token by token: the softmax state is
    kept relative to the running max ``c_t`` of key logits and rescaled by ``exp(c_{t-1} - c_t)``
    when the max grows.

    Args:
      state: from :func:`favor_causal_init_state` or a previous step.
      q_t, k_t, v_t: this token's query, key and value.
      projection: the ``[M, d]`` projection (``None`` for projection-free ReLU features).
      kernel: ``"softmax"`` or ``"relu"``.
      numerical_stabilizer: as in :func:`flaxlab.nn.favor.favor_attention`.
      renormalize: divide by the (stabilised) denominator.
      mask_t: optional bool ``[B]``; ``False`` feeds a padding key (it is not attended to).

    Returns:
      ``(new_state, output)``.

    Example:
      >>> w = gaussian_orthogonal_random_matrix(jax.random.key(0), 32, 8)
      >>> s = favor_causal_init_state(1, 2, 32, 8)
      >>> s, y = favor_causal_step(s, *(jnp.ones((1, 2, 8)),) * 3, w)
    """
    q4, k4 = q_t[:, None], k_t[:, None]
    mask4 = None if mask_t is None else mask_t[:, None]
    dtype = state.key_value.dtype
    if kernel == "relu":
        qf = relu_kernel_features(q4, projection)[:, 0].astype(dtype)
        kf = relu_kernel_features(k4, projection, mask=mask4)[:, 0].astype(dtype)
        new_offset, eps_weight = state.log_offset, jnp.zeros_like(state.eps_sum)
    elif kernel == "softmax":
        if projection is None:
            raise ValueError("kernel='softmax' needs a projection matrix [num_features, head_dim]")
        qf = softmax_kernel_features(
            q4, projection, is_query=True, numerical_stabilizer=numerical_stabilizer
        )[:, 0].astype(dtype)
        logits, half_sq_norm, ratio = softmax_projection_terms(k4, projection)
        logits, half_sq_norm = logits[:, 0].astype(dtype), half_sq_norm[:, 0].astype(dtype)
        keep = jnp.ones(k_t.shape[:1], bool) if mask_t is None else mask_t.astype(bool)
        keep = jnp.broadcast_to(keep[:, None], state.log_offset.shape)
        key_max = jnp.where(keep, jnp.max(logits, axis=-1), MASKED_LOG_OFFSET)
        new_offset = jnp.maximum(state.log_offset, key_max)
        exponent = jnp.where(
            keep[..., None], logits - half_sq_norm - new_offset[..., None], -jnp.inf
        )
        kf = ratio * jnp.exp(exponent)
        eps_weight = ratio * numerical_stabilizer * keep.astype(dtype)
    else:
        raise ValueError(f"kernel must be 'softmax' or 'relu', got {kernel!r}")
    v_t = v_t.astype(dtype)
    rescale = jnp.exp(state.log_offset - new_offset)
    new_state = FavorCausalState(
        key_value=rescale[..., None, None] * state.key_value + kf[..., :, None] * v_t[..., None, :],
        key_sum=rescale[..., None] * state.key_sum + kf,
        eps_value=state.eps_value + eps_weight[..., None] * v_t,
        eps_sum=state.eps_sum + eps_weight,
        log_offset=new_offset,
    )
    query_sum = jnp.sum(qf, axis=-1)
    numerator = jnp.einsum("bhm,bhmd->bhd", qf, new_state.key_value)
    numerator += query_sum[..., None] * new_state.eps_value
    if not renormalize:
        return new_state, numerator
    denominator = jnp.einsum("bhm,bhm->bh", qf, new_state.key_sum) + query_sum * new_state.eps_sum
    denominator = stabilize_denominator(denominator, numerical_stabilizer)
    return new_state, numerator / denominator[..., None]
