"""FAVOR+ random projections and kernel feature maps (Choromanski et al., arXiv 2009.14794).

Pure functions; the attention built on them lives in :mod:`flaxlab.nn.favor`. Conventions follow
google-research ``performer/fast_attention/jax/fast_attention.py`` exactly, so a projection drawn
from the same key gives the same features as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

FEATURE_TYPES = ("orthogonal", "iid", "deterministic")

# Log-offset used for keys that are masked out (and for "no key seen yet"): finite so that
# differences stay finite, small enough that exp(difference) underflows to exactly zero.
MASKED_LOG_OFFSET = -1e30


@partial(jax.jit, static_argnames=("num_features", "dim", "scaling"))
def gaussian_orthogonal_random_matrix(
    key: jax.Array, num_features: int, dim: int, scaling: int = 0
) -> jax.Array:
    r"""Draws a Gaussian orthogonal random projection ``W`` of shape ``[num_features, dim]``.

    Rows come in blocks of ``dim``: each block is ``Q^T`` from the QR decomposition of a
    ``dim x dim`` standard Gaussian matrix, so rows within a block are orthonormal (the last block
    keeps only its first ``num_features mod dim`` rows). Rows are then rescaled:

    * ``scaling=0``: row ``m`` gets norm ``||g_m||`` with ``g = N(0, 1)^{num_features x dim}``
      drawn from ``key`` itself, i.e. chi(dim)-distributed norms, so each row is marginally
      ``N(0, I)`` (unbiased softmax estimator, lower variance than iid rows);
    * ``scaling=1``: every row gets norm ``sqrt(dim)``.

    Key usage matches the reference (block ``b`` uses the ``b``-th chained ``split`` of ``key``),
    so the matrix is the reference's bit for bit; the blocks are built batched (one scan over
    the key chain, one batched QR), so any size builds in about a second, compile included.

    Args:
      key: a JAX PRNG key.
      num_features: number of random features ``M`` (rows), ``M >= 1``.
      dim: input dimension ``d`` (columns), ``d >= 1``.
      scaling: 0 (chi-distributed row norms) or 1 (row norms ``sqrt(d)``).

    Returns:
      A float32 array of shape ``[num_features, dim]``.

    Example:
      >>> w = gaussian_orthogonal_random_matrix(jax.random.key(0), 256, 64)
      >>> w.shape
      (256, 64)

    Reference: Choromanski et al., "Rethinking Attention with Performers", arXiv 2009.14794.
    """
    _check_sizes(num_features, dim)
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 (chi norms) or 1 (sqrt(dim) norms), got {scaling!r}")
    num_blocks = -(-num_features // dim)

    def next_key(chained, _):
        chained, block_key = jax.random.split(chained)
        return chained, block_key

    # The reference's chained splits as one scan (an unrolled loop compiles in time and memory
    # that grow with the number of blocks: minutes at M = 10000, d = 1), then every block's
    # Gaussian and one batched QR.
    _, block_keys = jax.lax.scan(next_key, key, None, length=num_blocks)
    gaussian_blocks = jax.vmap(lambda k: jax.random.normal(k, (dim, dim)))(block_keys)
    orthonormal_columns, _ = jnp.linalg.qr(gaussian_blocks)
    rows = jnp.swapaxes(orthonormal_columns, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
    if scaling == 0:
        row_norms = jnp.linalg.norm(jax.random.normal(key, (num_features, dim)), axis=1)
    else:
        row_norms = jnp.full((num_features,), jnp.sqrt(float(dim)))
    return row_norms[:, None] * rows


@partial(jax.jit, static_argnames=("num_features", "dim"))
def gaussian_random_matrix(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    r"""Draws an iid standard Gaussian projection ``W ~ N(0, 1)^{num_features x dim}``.

    The unstructured baseline of the paper (the reference's ``GaussianUnstructuredRandomMatrix``).

    Args:
      key: a JAX PRNG key.
      num_features: number of random features ``M``.
      dim: input dimension ``d``.

    Returns:
      A float32 array of shape ``[num_features, dim]``.

    Example:
      >>> w = gaussian_random_matrix(jax.random.key(0), 128, 64)
    """
    _check_sizes(num_features, dim)
    return jax.random.normal(key, (num_features, dim))


def draw_projection(
    key: jax.Array, num_features: int, dim: int, feature_type: str = "orthogonal"
) -> jax.Array | None:
    """Draws a projection by name: ``"orthogonal"`` (scaling 0), ``"iid"`` or ``"deterministic"``.

    ``"deterministic"`` returns ``None`` (the ReLU kernel's projection-free features).

    Args:
      key: a JAX PRNG key.
      num_features: number of random features ``M``.
      dim: input dimension ``d``.
      feature_type: one of ``"orthogonal"``, ``"iid"``, ``"deterministic"``.

    Returns:
      ``[num_features, dim]`` array, or ``None`` for ``"deterministic"``.
    """
    if feature_type == "orthogonal":
        return gaussian_orthogonal_random_matrix(key, num_features, dim, scaling=0)
    if feature_type == "iid":
        return gaussian_random_matrix(key, num_features, dim)
    if feature_type == "deterministic":
        return None
    raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")


def _check_sizes(num_features: int, dim: int) -> None:
    if int(num_features) < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    if int(dim) < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")


def _check_projection(x: jax.Array, projection: jax.Array) -> None:
    if projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(
            f"projection must have shape [num_features, {x.shape[-1]}] to match the input's last "
            f"dimension, got {projection.shape}"
        )


def softmax_projection_terms(
    x: jax.Array, projection: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The pieces of the positive softmax features before any stabilising max.

    With ``x_s = d^{-1/4} x``: ``logits = x_s W^T`` (``[..., M]``), the squared-norm term
    ``||x_s||^2 / 2`` (``[..., 1]``) and the ratio ``1 / sqrt(M)`` (a scalar).
    """
    _check_projection(x, projection)
    dim = x.shape[-1]
    scaled = x * (dim**-0.25)
    logits = jnp.einsum("...d,md->...m", scaled, projection.astype(x.dtype))
    half_sq_norm = 0.5 * jnp.sum(jnp.square(scaled), axis=-1, keepdims=True)
    ratio = projection.shape[0] ** -0.5
    return logits, half_sq_norm, ratio


def softmax_kernel_features(
    x: jax.Array,
    projection: jax.Array,
    *,
    is_query: bool,
    numerical_stabilizer: float = 1e-6,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Positive random features ``phi(x)`` with ``E[phi(q)^T phi(k)] ~ exp(q^T k / sqrt(d))``.

    For ``x`` in ``[batch, length, heads, d]`` and ``W`` in ``[M, d]``, with ``x_s = d^{-1/4} x``:

    .. math::
        \phi(x) = \frac{1}{\sqrt{M}}\left(\exp\left(x_s W^T - \tfrac{\|x_s\|^2}{2} - c\right)
        + \epsilon\right)

    where the stabiliser ``c`` is, for queries, the max of ``x_s W^T`` over features of each
    token, and for keys the max over all positions and features of each (batch, head). ``c``
    cancels between the numerator and denominator of attention up to the ``epsilon`` term.
    This is exactly the reference's ``nonnegative_softmax_kernel_feature_creator``; the causal
    path of :func:`flaxlab.nn.favor.favor_attention` uses a strictly causal running max instead.

    Args:
      x: queries or keys, ``[batch, length, heads, d]``.
      projection: ``[M, d]`` random matrix (e.g. :func:`gaussian_orthogonal_random_matrix`).
      is_query: per-token stabiliser (queries) or per-(batch, head) stabiliser (keys).
      numerical_stabilizer: ``epsilon`` added after the exponential.
      mask: optional bool ``[batch, length]``; for keys, ``False`` positions get zero features
        and are left out of the max (padding content cannot move any output).

    Returns:
      Features of shape ``[batch, length, heads, M]``.

    Example:
      >>> w = gaussian_orthogonal_random_matrix(jax.random.key(0), 128, 16)
      >>> k = jnp.ones((2, 10, 4, 16))
      >>> softmax_kernel_features(k, w, is_query=False).shape
      (2, 10, 4, 128)
    """
    _check_rank4(x, "x")
    logits, half_sq_norm, ratio = softmax_projection_terms(x, projection)
    if is_query:
        offset = jnp.max(logits, axis=-1, keepdims=True)
    else:
        per_token_max = jnp.max(logits, axis=-1)
        if mask is not None:
            per_token_max = jnp.where(_check_mask(mask, x)[..., None], per_token_max, -jnp.inf)
        offset = jnp.max(per_token_max, axis=1, keepdims=True)[..., None]
        offset = jnp.where(jnp.isfinite(offset), offset, 0.0)
    features = ratio * (jnp.exp(logits - half_sq_norm - offset) + numerical_stabilizer)
    if mask is not None and not is_query:
        features = features * _check_mask(mask, x)[:, :, None, None].astype(features.dtype)
    return features


def relu_kernel_features(
    x: jax.Array,
    projection: jax.Array | None = None,
    *,
    epsilon: float = 1e-3,
    kernel_fn: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Generalized-attention features ``f(x W^T) + epsilon`` (or ``f(x) + epsilon``).

    The reference's ``generalized_kernel_feature_creator`` with its defaults: no ``d^{-1/4}``
    scaling, no ``1/sqrt(M)`` ratio, ``f = relu``. Without a projection the features are the
    deterministic ``f(x) + epsilon`` (``M = d``).

    Args:
      x: ``[batch, length, heads, d]``.
      projection: optional ``[M, d]`` matrix.
      epsilon: additive positive term keeping every feature (and denominator) positive.
      kernel_fn: any elementwise function (``jax.nn.relu`` by default).
      mask: optional bool ``[batch, length]``; ``False`` positions get zero features.

    Returns:
      ``[batch, length, heads, M]`` (``M = d`` without a projection).

    Example:
      >>> relu_kernel_features(jnp.array([[[[-1.0, 2.0]]]]))
      Array([[[[0.001, 2.001]]]], dtype=float32)
    """
    _check_rank4(x, "x")
    if projection is None:
        features = kernel_fn(x) + epsilon
    else:
        _check_projection(x, projection)
        features = kernel_fn(jnp.einsum("...d,md->...m", x, projection.astype(x.dtype))) + epsilon
    if mask is not None:
        features = features * _check_mask(mask, x)[:, :, None, None].astype(features.dtype)
    return features


def _check_rank4(x: jax.Array, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have shape [batch, length, heads, dim] (rank 4), got shape {x.shape}"
        )


def _check_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask must be a bool array of shape [batch, length] = {x.shape[:2]}, "
            f"got shape {mask.shape}"
        )
    return mask.astype(bool)
