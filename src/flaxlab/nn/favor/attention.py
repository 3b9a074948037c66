r"""FAVOR+ (Performer) attention: linear-time softmax attention with positive random features.

Choromanski et al., "Rethinking Attention with Performers", arXiv 2009.14794. Softmax attention
``softmax(q k^T / sqrt(d)) v`` is approximated by ``D^{-1} Q' (K'^T v)`` with positive random
features ``Q' = phi(q)``, ``K' = phi(k)`` (:func:`softmax_kernel_features`) and
``D = diag(Q' (K'^T 1))``, in ``O(L M d)`` time instead of ``O(L^2 d)``.

Conventions match google-research ``performer/fast_attention/jax/fast_attention.py``; flaxlab fixes
its defects: the causal path is strictly causal (the reference's key stabiliser spans future
keys), the causal prefix sums are chunked with a chunked custom VJP (not a per-token scan),
padded keys can be masked, features are never seeded from data, and there is an O(1)-per-token
decoding state. Layout is ``[batch, length, heads, dim]`` throughout.

The package: ``features.py`` (projections, feature maps), ``causal.py`` (chunk-batched causal
attention, decoding), ``causal_scan.py`` (the causal scan form), this file
(:func:`favor_attention`, the bidirectional form, :class:`FavorKernel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from flaxlab.nn.favor.causal import causal_favor, stabilize_denominator
from flaxlab.nn.favor.features import (
    FEATURE_TYPES,
    draw_projection,
    relu_kernel_features,
    softmax_kernel_features,
)

KERNELS = ("softmax", "relu")


def _check_inputs(q, k, v, mask, causal):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have shape [batch, length, heads, dim] (rank 4), got {x.shape}"
            )
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q and k must agree in batch, heads and head dim, got {q.shape} and {k.shape}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in batch, length and heads, got {k.shape}, {v.shape}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"causal attention needs equal query and key lengths, got {q.shape[1]}, {k.shape[1]}"
        )
    if mask is not None and mask.shape != k.shape[:2]:
        raise ValueError(
            f"mask must be a bool array [batch, key length] = {k.shape[:2]}, got {mask.shape}"
        )


def favor_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    projection: jax.Array | None = None,
    *,
    kernel: str = "softmax",
    causal: bool = False,
    numerical_stabilizer: float = 1e-6,
    renormalize: bool = True,
    mask: jax.Array | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""FAVOR+ attention, bidirectional or causal.

    Bidirectional: ``num = Q' (K'^T v)``, ``den = Q' (K'^T 1)``. Causal: the same with prefix
    sums, ``num_i = sum_{j<=i} (Q'_i . K'_j) v_j``, computed chunk-wise
    (:func:`chunked_causal_linear_attention`). The output is ``num / den~`` with the reference's
    stabilised denominator ``den~ = den + 2 s 1[|den| <= s]`` (``s = numerical_stabilizer``), or
    ``num`` when ``renormalize=False``.

    The softmax kernel's key stabiliser (a max of key logits that cancels between ``num`` and
    ``den`` up to the ``s`` terms) is the reference's max over all positions when bidirectional,
    and the running max over positions ``<= i`` for query ``i`` when causal, so a future token
    never changes a past output (the reference leaks here); on ordinary inputs the two agree to
    ~1e-4. ``kernel="relu"`` uses :func:`relu_kernel_features` with ``epsilon=1e-3`` (projection
    ``None``: deterministic features ``relu(x) + 1e-3``).

    Args:
      q: queries ``[batch, q_length, heads, d]``.
      k: keys ``[batch, k_length, heads, d]``.
      v: values ``[batch, k_length, heads, d_v]``.
      projection: ``[M, d]`` random matrix (required for softmax; optional for relu).
      kernel: ``"softmax"`` (FAVOR+) or ``"relu"`` (generalized attention).
      causal: autoregressive attention (``q_length == k_length``).
      numerical_stabilizer: softmax features' ``epsilon`` and the denominator's ``s``.
      renormalize: divide by the denominator (``False`` returns the raw numerator).
      mask: optional bool ``[batch, k_length]`` key-padding mask; ``False`` keys get zero
        features (a query with no valid key outputs 0).
      chunk_size: causal chunk length; ``None`` = :func:`scan_chunk_size` for the softmax scan
        form, else :func:`default_chunk_size`.
      implementation: causal softmax only: ``"scan"`` (one chunk's features at a time, small
        temporaries; the CPU default), ``"batched"`` (all chunks at once in large batched
        matmuls; the accelerator default) or ``None`` (:func:`default_implementation`). Both
        compute the same function.

    Returns:
      ``[batch, q_length, heads, d_v]`` in ``v``'s dtype (computed in at least float32).

    Example:
      >>> key = jax.random.key(0)
      >>> w = gaussian_orthogonal_random_matrix(key, 256, 64)
      >>> q = k = v = jax.random.normal(key, (2, 1024, 8, 64))
      >>> favor_attention(q, k, v, w, causal=True).shape
      (2, 1024, 8, 64)
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "softmax" and projection is None:
        raise ValueError("kernel='softmax' needs a projection matrix [num_features, head_dim]")
    _check_inputs(q, k, v, mask, causal)
    out_dtype = v.dtype
    compute_dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
    if projection is not None:
        projection = projection.astype(compute_dtype)
    if causal:
        numerator, denominator = causal_favor(
            q,
            k,
            v,
            projection,
            kernel=kernel,
            numerical_stabilizer=numerical_stabilizer,
            mask=mask,
            chunk_size=chunk_size,
            implementation=implementation,
        )
    else:
        numerator, denominator = _bidirectional(
            q, k, v, projection, kernel, numerical_stabilizer, mask
        )
    if not renormalize:
        return numerator.astype(out_dtype)
    denominator = stabilize_denominator(denominator, numerical_stabilizer)
    return (numerator / denominator[..., None]).astype(out_dtype)


def _bidirectional(q, k, v, projection, kernel, numerical_stabilizer, mask):
    if kernel == "softmax":
        qf = softmax_kernel_features(
            q, projection, is_query=True, numerical_stabilizer=numerical_stabilizer
        )
        kf = softmax_kernel_features(
            k, projection, is_query=False, numerical_stabilizer=numerical_stabilizer, mask=mask
        )
    else:
        qf = relu_kernel_features(q, projection)
        kf = relu_kernel_features(k, projection, mask=mask)
    key_value = jnp.einsum("blhm,blhd->bhmd", kf, v)
    numerator = jnp.einsum("blhm,bhmd->blhd", qf, key_value)
    denominator = jnp.einsum("blhm,bhm->blh", qf, jnp.sum(kf, axis=1))
    return numerator, denominator


class FavorProjection(nnx.Variable):
    """The ``[M, d]`` random projection of a :class:`FavorKernel` (not trainable)."""


class FavorCounter(nnx.Variable):
    """Number of training (non-deterministic) calls a :class:`FavorKernel` has seen."""


class FavorSeed(nnx.Variable):
    """Raw PRNG key data from which every projection of a :class:`FavorKernel` is drawn."""


def _favor_rng_key(rngs: nnx.Rngs) -> jax.Array:
    """A key from the ``favor`` stream, else ``default``, else ``params`` (never from data)."""
    for stream in ("favor", "default", "params"):
        try:
            return getattr(rngs, stream)()
        except AttributeError:
            continue
    raise ValueError("FavorKernel needs an nnx.Rngs with a 'favor', 'default' or 'params' stream")


class FavorKernel(nnx.Module):
    r"""FAVOR+ attention kernel for flaxlab's attention seam, with scheduled feature redraws.

    Holds the projection in a non-trainable :class:`FavorProjection`, a training-call counter
    (:class:`FavorCounter`) and a seed (:class:`FavorSeed`, from the ``favor`` rng stream, else
    ``default``/``params``). Projection number ``r`` is ``draw(fold_in(seed, r))``; number 0 is
    drawn at construction. On each call with ``deterministic=False`` the counter ``n`` goes up by
    one and, when ``redraw_every > 0`` and ``n % redraw_every == 0``, projection
    ``n // redraw_every`` is drawn and stored before attending. Evaluation calls
    (``deterministic=True``) change nothing. Works in a functional train step (``nnx.split`` ->
    ``jax.jit`` -> ``nnx.merge`` -> call -> ``nnx.split``): the redraw is a ``lax.cond``.

    Args:
      config: any object with ``num_features`` (int), ``favor_kernel`` (``"softmax"`` |
        ``"relu"``), ``feature_type`` (``"orthogonal"`` | ``"iid"`` | ``"deterministic"``, the
        last only for relu) and ``redraw_every`` (int, 0 = never).
      head_dim: per-head query/key dimension ``d``.
      rngs: the module's rng streams.

    Example:
      >>> kern = FavorKernel(cfg, 64, rngs=nnx.Rngs(0))
      >>> y = kern(q, k, v, causal=True, deterministic=False)   # [B, L, H, D]
    """

    def __init__(self, config, head_dim: int, *, rngs: nnx.Rngs):
        kernel = config.favor_kernel
        feature_type = config.feature_type
        num_features = int(config.num_features)
        redraw_every = int(config.redraw_every)
        if kernel not in KERNELS:
            raise ValueError(f"favor_kernel must be one of {KERNELS}, got {kernel!r}")
        if feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
        if feature_type == "deterministic" and kernel != "relu":
            raise ValueError(
                "feature_type='deterministic' (no projection) is only valid with "
                f"favor_kernel='relu', got favor_kernel={kernel!r}"
            )
        if num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if redraw_every < 0:
            raise ValueError(f"redraw_every must be >= 0 (0 = never), got {redraw_every!r}")
        if int(head_dim) < 1:
            raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
        self.kernel = kernel
        self.feature_type = feature_type
        self.num_features = num_features
        self.head_dim = int(head_dim)
        self.redraw_every = redraw_every
        key = _favor_rng_key(rngs)
        self.key_impl = str(jax.random.key_impl(key))
        self.seed = FavorSeed(jax.random.key_data(key))
        self.calls = FavorCounter(jnp.zeros((), jnp.int32))
        if feature_type == "deterministic":
            self.projection = None
        else:
            self.projection = FavorProjection(self.draw(0))

    def draw(self, index: jax.Array | int) -> jax.Array | None:
        """Projection number ``index`` (a pure function of the seed and the index)."""
        key = jax.random.wrap_key_data(self.seed[...], impl=self.key_impl)
        return draw_projection(
            jax.random.fold_in(key, index), self.num_features, self.head_dim, self.feature_type
        )

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        mask: jax.Array | None = None,
        causal: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """FAVOR+ attention ``[B, L, H, D]``; training calls advance the redraw schedule."""
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q has head dim {q.shape[-1]}, this kernel was built for {self.head_dim}"
            )
        projection = None
        if not deterministic:
            calls = self.calls[...] + 1
            self.calls[...] = calls
        if self.projection is not None:
            projection = self.projection[...]
            if not deterministic and self.redraw_every > 0:
                due = calls % self.redraw_every == 0
                index = calls // self.redraw_every
                current = projection
                projection = lax.cond(due, lambda: self.draw(index), lambda: current)
                self.projection[...] = projection
        return favor_attention(q, k, v, projection, kernel=self.kernel, causal=causal, mask=mask)
