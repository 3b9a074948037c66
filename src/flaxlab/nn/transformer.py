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
from flaxlab.nn.layers_scan import check_remat, run_blocks

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


def drop_path(x, rate, *, deterministic: bool, rngs: nnx.Rngs | None):
    """Drops whole examples of a residual branch with probability ``rate`` (stochastic depth).

    Kept examples are scaled by ``1 / (1 - rate)`` so the expectation is unchanged. ``rate`` is a
    Python float, or a traced scalar (a block's rate inside a layer scan); a traced rate draws
    its key only when it is positive, so the ``dropout`` stream advances as with the float.
    """
    static = isinstance(rate, int | float)
    if deterministic or (static and rate == 0.0):
        return x
    if rngs is None:
        raise ValueError("drop_path in training mode needs `rngs` with a 'dropout' stream")
    # Computed in float32 from a float32 rate either way, so both forms give the same bits.
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    if static:
        key = rngs.dropout()
    else:
        stream = rngs.dropout
        count = stream.count[...]
        key = jax.random.fold_in(stream.key[...], count)
        stream.count[...] = count + (rate > 0).astype(count.dtype)
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    # A product with the reciprocal: XLA would turn a division by a constant rate into one
    # anyway, and then the constant (unrolled) and traced (scanned) rates round alike.
    return jnp.where(keep, x * (1.0 / keep_prob).astype(x.dtype), jnp.zeros_like(x))


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

    def __call__(
        self, x, *, mask=None, causal=False, deterministic=True, rngs=None, drop_path_rate=None
    ):
        """``drop_path_rate`` overrides the block's own (a layer scan passes each block's)."""
        kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
        y = self.attn(self.norm1(x), mask=mask, causal=causal, **kw)
        return self._finish(x, y, kw, drop_path_rate)

    def with_weights(
        self, x, *, mask=None, causal=False, deterministic=True, rngs=None, drop_path_rate=None
    ):
        """``(x', attention weights [B, heads, L, L])`` (exact attention, for introspection)."""
        kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
        y, weights = self.attn(self.norm1(x), mask=mask, causal=causal, return_weights=True)
        return self._finish(x, y, kw, drop_path_rate), weights

    def _finish(self, x, y, kw, rate=None):
        rate = self.drop_path_rate if rate is None else rate
        x = x + drop_path(self.dropout(y, **kw), rate, **kw)
        y = self.mlp(self.norm2(x), **kw)
        return x + drop_path(y, rate, **kw)


class Encoder(nnx.Module):
    """A stack of pre-LN encoder blocks followed by a final LayerNorm.

    ``remat`` (``"none"``, ``"full"``, ``"dots"``, ``"dots_no_batch"``) rematerialises each
    block's forward; ``scan_layers`` runs the blocks with one :func:`jax.lax.scan` (one block
    compiled instead of ``num_layers``) without changing the parameter layout. Both give the
    same outputs and gradients as the plain loop (see :mod:`flaxlab.nn.layers_scan`).
    """

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
        remat: str = "none",
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        self.remat = check_remat(remat)
        self.scan_layers = bool(scan_layers)
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

    def run(self, x, call, rngs):
        """``call(block, x, rngs, **overrides) -> (x, extra)`` over the blocks, with this
        encoder's remat and scan settings: ``(x, [extra per block])``."""
        return run_blocks(
            self.blocks,
            x,
            call,
            rngs=rngs,
            remat=self.remat,
            scan=self.scan_layers,
            varying=("drop_path_rate",),
            owner="Encoder",
        )

    def __call__(self, x, *, mask=None, causal=False, deterministic=True, rngs=None):
        kw: dict[str, Any] = dict(mask=mask, causal=causal, deterministic=deterministic)

        def call(block, x, rngs, **overrides):
            return block(x, rngs=rngs, **kw, **overrides), None

        x, _ = self.run(x, call, rngs)
        return self.encoder_norm(x)

    def capture(self, x, *, mask=None, causal=False, deterministic=True, rngs=None):
        """``(encoded, {"features": [each block's output], "attention": [each block's
        attention weights [B, heads, L, L]]})``."""
        kw: dict[str, Any] = dict(mask=mask, causal=causal, deterministic=deterministic)

        def call(block, x, rngs, **overrides):
            x, weights = block.with_weights(x, rngs=rngs, **kw, **overrides)
            return x, (x, weights)

        x, extras = self.run(x, call, rngs)
        captured = {
            "features": [features for features, _ in extras],
            "attention": [weights for _, weights in extras],
        }
        return self.encoder_norm(x), captured
