"""Multi-head attention with a pluggable attention kernel.

The module owns the query/key/value/output projections; the *kernel* turns projected
``q, k, v`` of layout ``[batch, length, heads, head_dim]`` into the attended values. Two kernels
ship with flaxlab:

* ``"softmax"``: exact attention, ``softmax(q k^T / sqrt(d)) v``, through
  :func:`jax.nn.dot_product_attention` (cuDNN flash attention on GPU when asked for), or an
  explicit einsum when attention-weight dropout is active (the fused kernel has no dropout).
* ``"favor"``: Performer FAVOR+ random-feature attention (linear in length), from
  :mod:`flaxlab.nn.favor`.

A new kernel is a class with the constructor ``Kernel(config, head_dim, *, rngs)`` and the call
``kernel(q, k, v, *, mask=None, causal=False, deterministic=True, rngs=None)``, registered with
:func:`register_attention_kernel`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_KINDS = ("softmax", "favor")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention kernel a transformer uses, and its settings.

    Attributes:
      kind: ``"softmax"`` (exact) or ``"favor"`` (Performer FAVOR+).
      dropout_rate: dropout on the attention weights (softmax kernel only).
      implementation: ``None`` (XLA), ``"cudnn"`` or ``"xla"``, passed to
        :func:`jax.nn.dot_product_attention`.
      num_features: FAVOR+ random features per head.
      favor_kernel: FAVOR+ feature map, ``"softmax"`` (positive random features) or ``"relu"``.
      feature_type: ``"orthogonal"``, ``"iid"`` or ``"deterministic"`` (ReLU without projection).
      redraw_every: redraw the FAVOR+ projection every N training calls (0 = never).
    """

    kind: str = "softmax"
    dropout_rate: float = 0.0
    implementation: str | None = None
    num_features: int = 256
    favor_kernel: str = "softmax"
    feature_type: str = "orthogonal"
    redraw_every: int = 0

    def __post_init__(self):
        if self.kind not in _KERNELS:
            raise ValueError(
                f"attention.kind={self.kind!r} is not a known attention kernel; "
                f"accepted: {sorted(_KERNELS)}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"attention.dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.num_features < 1:
            raise ValueError(f"attention.num_features={self.num_features} must be >= 1")


class SoftmaxKernel(nnx.Module):
    """Exact scaled dot-product attention."""

    takes_rngs = True  # attention-weight dropout draws from the caller's `rngs`

    def __init__(self, config: AttentionConfig, head_dim: int, *, rngs: nnx.Rngs):
        del rngs
        self.head_dim = head_dim
        self.dropout_rate = config.dropout_rate
        self.implementation = config.implementation

    def weights(self, q, k, *, mask=None, causal=False):
        """The attention weights ``softmax(q k^T / sqrt(d))``: ``[batch, heads, q_len, k_len]``
        (float32), for introspection."""
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.head_dim**-0.5
        if causal:
            tri = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
            logits = jnp.where(tri, logits, -1e30)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, -1e30)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, q, k, v, *, mask=None, causal=False, deterministic=True, rngs=None):
        # mask: bool [batch, key_length], True = attend.
        bias_mask = None if mask is None else mask[:, None, None, :]
        if self.dropout_rate > 0.0 and not deterministic:
            scale = self.head_dim**-0.5
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
            if causal:
                length = q.shape[1]
                tri = jnp.tril(jnp.ones((length, k.shape[1]), bool))
                logits = jnp.where(tri, logits, -1e30)
            if bias_mask is not None:
                logits = jnp.where(bias_mask, logits, -1e30)
            weights = jax.nn.softmax(logits, axis=-1)
            if rngs is None:
                raise ValueError("attention dropout in training mode needs `rngs`")
            keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.dropout_rate, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - self.dropout_rate), 0.0)
            return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=bias_mask,
            is_causal=causal,
            implementation=self.implementation,  # type: ignore[arg-type]
        )


_KERNELS: dict[str, Callable[..., Any] | str] = {
    "softmax": SoftmaxKernel,
    # Imported lazily so `attention` does not pull in the FAVOR+ code unless it is used.
    "favor": "flaxlab.nn.favor:FavorKernel",
}


def register_attention_kernel(name: str, factory: Callable[..., nnx.Module]) -> None:
    """Makes ``AttentionConfig(kind=name)`` build attention kernels with ``factory``."""
    _KERNELS[name] = factory


def make_attention_kernel(config: AttentionConfig, head_dim: int, *, rngs: nnx.Rngs):
    factory = _KERNELS[config.kind]
    if isinstance(factory, str):
        module_name, attr = factory.split(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory(config, head_dim, rngs=rngs)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention: projections to ``num_heads`` heads, a kernel, an output projection.

    Args:
      hidden_size: model width (input and output features).
      num_heads: number of heads; must divide ``hidden_size``.
      config: the attention kernel's settings.
      rngs: parameter initialisation (and FAVOR+ projection) randomness.

    Call: ``attn(x, *, mask=None, causal=False, deterministic=True, rngs=None)`` with ``x`` of
    shape ``[batch, length, hidden_size]`` and ``mask`` a bool ``[batch, length]`` key mask.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        config: AttentionConfig | None = None,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        config = config or AttentionConfig()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        init = nnx.initializers.xavier_uniform()
        dense = lambda: nnx.Linear(
            hidden_size, hidden_size, kernel_init=init, dtype=dtype, rngs=rngs
        )
        self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()
        self.kernel = make_attention_kernel(config, self.head_dim, rngs=rngs)

    def __call__(
        self, x, *, mask=None, causal=False, deterministic=True, rngs=None, return_weights=False
    ):
        """``[batch, length, hidden]`` outputs; with ``return_weights`` also the attention
        weights ``[batch, heads, length, length]`` (exact kernels only; no dropout then)."""
        batch, length, _ = x.shape
        heads = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if return_weights:
            weights_fn = getattr(self.kernel, "weights", None)
            if weights_fn is None:
                raise ValueError(
                    f"attention weights are not available from a {type(self.kernel).__name__} "
                    "(it never forms the length x length matrix); use attention.kind='softmax'"
                )
            weights = weights_fn(q, k, mask=mask, causal=causal)
            y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
            out = self.out(y.reshape(batch, length, self.num_heads * self.head_dim))
            return out, weights
        extra = {"rngs": rngs} if getattr(self.kernel, "takes_rngs", False) else {}
        y = self.kernel(q, k, v, mask=mask, causal=causal, deterministic=deterministic, **extra)
        return self.out(y.reshape(batch, length, self.num_heads * self.head_dim))
