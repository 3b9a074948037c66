"""Pre-LayerNorm transformer encoder: MLP block, drop-path, encoder block, encoder stack.

Follows the ViT reference (google-research/vision_transformer ``vit_jax/models_vit.py``):
LayerNorm with epsilon 1e-6 before attention and before the MLP, residual connections,
dropout after the attention output and after each MLP dense layer, tanh-approximate GELU, a
final LayerNorm. Stochastic depth (drop-path) is an addition: block ``i`` of ``L`` drops its
residual branch with probability ``drop_path_rate * i / (L - 1)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlab.nn.attention import AttentionConfig, MultiHeadAttention

LAYERNORM_EPSILON = 1e-6


def gelu(x):
    """GELU with the tanh approximation, as the reference models use."""
    return jax.nn.gelu(x, approximate=True)


class MlpBlock(nnx.Module):
    """Dense(mlp_dim) -> GELU -> dropout -> Dense(out) -> dropout."""

    def __init__(
        self,
        in_features: int,
        mlp_dim: int,
        out_features: int | None = None,
        *,
        dropout_rate: float = 0.0,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        kernel_init = nnx.initializers.xavier_uniform()
        bias_init = nnx.initializers.normal(stddev=1e-6)
        out_features = out_features or in_features
        self.fc1 = nnx.Linear(
            in_features,
            mlp_dim,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            rngs=rngs,
        )
        self.fc2 = nnx.Linear(
            mlp_dim,
            out_features,
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=dtype,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x, *, deterministic=True, rngs=None):
        x = self.dropout(gelu(self.fc1(x)), deterministic=deterministic, rngs=rngs)
        return self.dropout(self.fc2(x), deterministic=deterministic, rngs=rngs)


def drop_path(x, rate: float, *, deterministic: bool, rngs: nnx.Rngs | None):
    """Drops whole examples of a residual branch with probability ``rate`` (stochastic depth).

    Kept examples are scaled by ``1 / (1 - rate)`` so the expectation is unchanged.
    """
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("drop_path in training mode needs `rngs` with a 'dropout' stream")
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class EncoderBlock(nnx.Module):
    """x + Attention(LN(x)); x + MLP(LN(x)), with dropout and optional drop-path."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_dim: int,
        *,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attention: AttentionConfig | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.norm1 = nnx.LayerNorm(hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)
        self.attn = MultiHeadAttention(hidden_size, num_heads, attention, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)
        self.mlp = self.make_mlp(hidden_size, mlp_dim, dropout_rate, dtype, rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        self.drop_path_rate = drop_path_rate

    def make_mlp(self, hidden_size, mlp_dim, dropout_rate, dtype, rngs) -> nnx.Module:
        """The feed-forward sub-layer; subclasses (MoE) replace it."""
        return MlpBlock(hidden_size, mlp_dim, dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, mask=None, causal=False, deterministic=True, rngs=None):
        kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
        y = self.attn(self.norm1(x), mask=mask, causal=causal, **kw)
        return self._finish(x, y, kw)

    def with_weights(self, x, *, mask=None, causal=False, deterministic=True, rngs=None):
        """``(x', attention weights [B, heads, L, L])`` (exact attention, for introspection)."""
        kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
        y, weights = self.attn(self.norm1(x), mask=mask, causal=causal, return_weights=True)
        return self._finish(x, y, kw), weights

    def _finish(self, x, y, kw):
        x = x + drop_path(self.dropout(y, **kw), self.drop_path_rate, **kw)
        y = self.mlp(self.norm2(x), **kw)
        return x + drop_path(y, self.drop_path_rate, **kw)


class Encoder(nnx.Module):
    """A stack of pre-LN encoder blocks followed by a final LayerNorm."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        *,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attention: AttentionConfig | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.blocks = nnx.List(
            [
                EncoderBlock(
                    hidden_size,
                    num_heads,
                    mlp_dim,
                    dropout_rate=dropout_rate,
                    drop_path_rate=drop_path_rate * i / max(num_layers - 1, 1),
                    attention=attention,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.encoder_norm = nnx.LayerNorm(hidden_size, epsilon=LAYERNORM_EPSILON, rngs=rngs)

    def __call__(self, x, *, mask=None, causal=False, deterministic=True, rngs=None):
        for block in self.blocks:
            x = block(x, mask=mask, causal=causal, deterministic=deterministic, rngs=rngs)
        return self.encoder_norm(x)

    def capture(self, x, *, mask=None, causal=False, deterministic=True, rngs=None):
        """``(encoded, {"features": [each block's output], "attention": [each block's
        attention weights [B, heads, L, L]]})``."""
        kw: dict[str, Any] = dict(mask=mask, causal=causal, deterministic=deterministic, rngs=rngs)
        captured: dict[str, list] = {"features": [], "attention": []}
        for block in self.blocks:
            x, weights = block.with_weights(x, **kw)
            captured["features"].append(x)
            captured["attention"].append(weights)
        return self.encoder_norm(x), captured
