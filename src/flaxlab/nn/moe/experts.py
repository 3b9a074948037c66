"""The stacked expert MLPs of a mixture-of-experts layer: parameters and maths.

The expert MLP is the ViT MLP block, ``Dense -> tanh-GELU -> dropout -> Dense -> dropout`` with
biases, per expert, with parameters ``fc1_kernel (E, D, H)``, ``fc1_bias (E, H)``,
``fc2_kernel (E, H, O)``, ``fc2_bias (E, O)``. As in google-research/vmoe (``vit_moe.py``: the
experts are ``MlpBlock``s built with the encoder's ``dropout_rate``, or ``moe.dropout_rate``), the
experts apply dropout while training.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zeros each entry with probability ``rate``, scales the rest by
    ``1 / (1 - rate)``; the identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate!r} must be in [0, 1)")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def expert_mlp(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Per-expert MLP on buffers: ``(E, N, D) -> (E, N, O)``.

    ``y_e = drop(drop(gelu_tanh(x_e W1_e + b1_e)) W2_e + b2_e)``, where ``drop`` is dropout at
    ``dropout_rate`` with masks drawn from ``dropout_key`` (no dropout when the key is None).
    """
    k1, k2 = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h = jnp.einsum("end,edh->enh", x, params["fc1_kernel"]) + params["fc1_bias"][:, None]
    h = dropout(jax.nn.gelu(h, approximate=True), dropout_rate, k1)
    y = jnp.einsum("enh,eho->eno", h, params["fc2_kernel"]) + params["fc2_bias"][:, None]
    return dropout(y, dropout_rate, k2)


def _shared(initializer):
    """Draws one expert's slice and repeats it over the leading expert axis."""

    def init(key, shape, dtype):
        return jnp.broadcast_to(initializer(key, shape[1:], dtype), shape)

    return init


def _param(initializer, key, shape, dtype, axes):
    return nnx.Param(initializer(key, shape, dtype), out_sharding=axes, eager_sharding=False)


class MoeMlp(nnx.Module):
    """``E`` stacked expert MLPs ``Dense -> tanh-GELU -> Dense`` with biases.

    Initialisation as the ViT MLP block of the reference: Xavier-uniform kernels (fans per
    expert), biases ``N(0, 1e-6)``. With ``share_init`` every expert starts from the same draw
    (the V-MoE paper configs, ``split_rngs=False``); otherwise each expert gets its own.

    Args:
      num_experts: ``E``.
      in_features: ``D``.
      mlp_dim: ``H``.
      out_features: ``O`` (default ``D``).
      share_init: identical initial weights for all experts.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> mlp = MoeMlp(4, 8, 16, rngs=nnx.Rngs(0))
      >>> mlp(jnp.ones((4, 3, 8))).shape
      (4, 3, 8)
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        mlp_dim: int,
        *,
        out_features: int | None = None,
        share_init: bool = False,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_features = in_features if out_features is None else out_features
        self.num_experts = num_experts
        kernel_init = jax.nn.initializers.xavier_uniform(batch_axis=(0,))
        bias_init = jax.nn.initializers.normal(stddev=1e-6)
        if share_init:
            kernel_init, bias_init = _shared(kernel_init), _shared(bias_init)
        e, d, h, o = num_experts, in_features, mlp_dim, out_features
        self.fc1_kernel = _param(
            kernel_init, rngs.params(), (e, d, h), param_dtype, ("expert", "embed", "mlp")
        )
        self.fc1_bias = _param(bias_init, rngs.params(), (e, h), param_dtype, ("expert", "mlp"))
        self.fc2_kernel = _param(
            kernel_init, rngs.params(), (e, h, o), param_dtype, ("expert", "mlp", "embed")
        )
        self.fc2_bias = _param(bias_init, rngs.params(), (e, o), param_dtype, ("expert", "embed"))

    def param_dict(self) -> dict[str, jax.Array]:
        """The four parameter arrays by name, for the pure functions of the MoE package."""
        return {
            "fc1_kernel": self.fc1_kernel[...],
            "fc1_bias": self.fc1_bias[...],
            "fc2_kernel": self.fc2_kernel[...],
            "fc2_bias": self.fc2_bias[...],
        }

    def __call__(
        self, x: jax.Array, *, dropout_rate: float = 0.0, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """Applies expert ``e`` to ``x[e]``: ``(E, N, D) -> (E, N, O)`` (see :func:`expert_mlp`)."""
        return expert_mlp(self.param_dict(), x, dropout_rate=dropout_rate, dropout_key=dropout_key)
